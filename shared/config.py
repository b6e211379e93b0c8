"""Typed run configuration, built from Flower's ``run_config`` (``[tool.flwr.app.config]``).

Owns: the one place where configuration keys, defaults and checks live. Keys are kebab-case,
grouped with dots (``dp.target-epsilon``), exactly as in ``pyproject.toml`` and ``--run-config``.
Unknown keys are rejected and every problem is reported at once, with the bad value.

Must not: import ``fedrec.server`` or ``fedrec.client``, or read files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedrec.shared.errors import FedrecError

STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedprox")
ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("ghost", "hooks", "functorch", "ew")
OPTIMIZERS = ("sgd", "adam")
SCORE_DTYPES = ("auto", "float32", "bfloat16")
HEADS = ("channel-tower", "channel", "shared")
ITEM_PRIORS = ("popularity", "none")
TOWERS = ("mean", "attention")
# why a federation refuses model.item-table = true
FEDERATED_ITEM_TABLE = (
    "model.item-table = true is for a platform's own model; the federation does not carry "
    "per-item tables. Fix: drop --set model.item-table=true, or train one platform alone "
    "(fedrec train --item-table, python -m fedrec.simulations.bench.ml1m --set "
    "model.item-table=true)."
)


class ConfigError(FedrecError, ValueError):
    """One or more configuration values are wrong; ``problems`` lists each of them."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} configuration problem(s):\n{lines}")


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.1


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64
    hidden: int = 0  # width of the profile MLP residual; 0 = none (best under DP here)
    # "channel-tower": per platform, a head and a tower added to the shared tower;
    # "channel": a head per platform on the shared tower; "shared": one head, all shared
    heads: str = "channel-tower"
    max_history: int = 50
    # "popularity": each platform scores items with its own item popularity added (log of the
    # user-level counts, released once with the Gaussian mechanism under DP), weighted by a
    # learned beta in the head; it never leaves the platform. "none": text only
    item_prior: str = "popularity"
    # the head reads the profile times this (its weights start divided by it): the same
    # function at the start, but W_o's share of each user's clipped gradient grows by its
    # square, so DP-SGD's clipping spends more of the bound on W_o (with Adam, W_o's
    # effective learning rate also grows by it: lower train.head-lr-scale to keep it)
    head_scale: float = 2.0
    # the user tower: "mean" (summaries of the history) or "attention" (the same plus a causal
    # self-attention residual over the ordered history, trained at every position)
    tower: str = "mean"
    blocks: int = 1  # attention blocks (model.tower = "attention")
    attention_heads: int = 2  # must divide model.dim
    # per-item tables (items x model.dim each, zero at the start): a learned row per item in
    # the history (averaged into the profile) and one added to each item's projected text
    # vector; a platform's own model only (fedrec train --item-table, bench.ml1m); fedrec
    # simulate and deploy local refuse them (a head per catalogue size is not built)
    item_table: bool = False


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 30
    batch_size: int = 512
    negatives: int = 0  # 0: softmax over the whole public catalogue
    positions: int = 12  # next-item predictions per user per step, averaged before clipping
    lr: float = 0.003
    # the head's projection W_o (``to_items.weight``) learns at lr x this (and, under Adam, x
    # model.head-scale): under DP-SGD its noise costs most, and it learns too slowly at the
    # shared rate (README, "Where DP-SGD costs quality"); 1.25 x head scale 2 = 2.5
    head_lr_scale: float = 1.25
    # MR-MTL's lambda: each platform's head is pulled toward the mean of every platform's head
    # (a data-independent proximal step after each update; 0 = heads fully separate)
    head_pull: float = 0.0
    # personalisation: each node starts every round (and evaluates) from the federation's
    # shared weights mixed with its own from its last round, (1 - this) x global + this x own;
    # its own weights are its DP outputs kept on its disk (no ε). 0 = plain FedAvg
    personal_mix: float = 0.5
    optimizer: str = "adam"
    # dtype of the (predictions x catalogue) scores in training: "auto" takes bfloat16 where
    # the CPU has native bfloat16 matrix instructions (about 3x faster there), else float32
    scores_dtype: str = "auto"


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings, named as Opacus names them.

    ``noise_multiplier < 0`` means: derive it from ``target_epsilon`` for the whole planned run
    (all rounds x local steps). A non-negative value is used as given, and ``target_epsilon``
    stays the budget that training may not exceed.
    """

    enabled: bool = True
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float = -1.0
    # PRV (Gopi et al. 2021) bounds ε within 0.01 of the exact privacy curve; RDP is looser
    # (about 10% more ε at these settings, so about 5% more σ for the same target). The audit
    # recomputes every history with an independent PLD accountant and RDP.
    accountant: str = "prv"
    grad_sample_mode: str = "ghost"
    # model.item-prior = popularity: the popularity release alone costs at most this share of
    # target_epsilon (its σ is the smallest that does); DP-SGD's σ is then planned for the rest
    prior_share: float = 0.1


@dataclass(frozen=True)
class EvalConfig:
    max_users: int = 2000


@dataclass(frozen=True)
class AuditConfig:
    """White-box privacy audit (``fedrec audit --empirical-run`` sets these; off by default).

    ``canaries`` > 0: in every DP-SGD step the client adds gradient canaries, ``C * u_j`` for
    fixed random unit directions (Andrew et al., ICLR 2024), the first half of
    ``canaries`` directions each Poisson-included at the users' sample rate, the second half
    never (the auditor's null). ``seed`` fixes the directions.

    ``disable_noise`` is FAULT INJECTION ONLY: the client adds no DP noise while it still
    records and reports the planned noise multiplier and ε. It exists so an audit can show it
    catches a run whose noise is off. A run with it set is NOT private; the key is recorded in
    the run's config.json.
    """

    canaries: int = 0
    seed: int = 0
    disable_noise: bool = False


@dataclass(frozen=True)
class FedrecConfig:
    num_server_rounds: int = 5
    channels: tuple[str, ...] = ("ecommerce", "finance", "social")
    data_dir: str = ""
    run_dir: str = ""
    cache_dir: str = ""
    encoder_dir: str = ""
    seed: int = 0
    min_nodes: int = 3
    round_timeout: float = 600.0
    resume: bool = False
    # "NODE_ID=channel,...": the only SuperLink node id allowed to serve each channel
    # (what `flwr supernode register` printed for its key); "" = no binding
    node_channels: str = ""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def planned_steps(self) -> int:
        """DP-SGD steps each channel plans for the whole run (sizes the noise)."""
        return self.num_server_rounds * self.train.local_steps

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flatten back to Flower's run-config keys (inverse of :func:`from_run_config`)."""
        out: dict[str, bool | int | float | str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for g in dataclasses.fields(value):
                    key = f"{f.name}.{_kebab(g.name)}"
                    if f.name == "strategy" and g.name == "name":
                        key = "strategy"
                    out[key] = getattr(value, g.name)
            elif isinstance(value, tuple):
                out[_kebab(f.name)] = ",".join(value)
            else:
                out[_kebab(f.name)] = value
        return out


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _expected_keys() -> dict[str, tuple[str, str | None, type]]:
    """run-config key -> (field, group or None, python type)."""
    keys: dict[str, tuple[str, str | None, type]] = {}
    for f in dataclasses.fields(FedrecConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            for g in dataclasses.fields(default):
                key = f"{f.name}.{_kebab(g.name)}"
                if f.name == "strategy" and g.name == "name":
                    key = "strategy"
                keys[key] = (g.name, f.name, type(getattr(default, g.name)))
        else:
            keys[_kebab(f.name)] = (f.name, None, type(default))
    return keys


def _coerce(key: str, value: Any, want: type, problems: list[str]) -> Any:
    if want is tuple:
        if not isinstance(value, str):
            problems.append(f"{key} must be a comma-separated string. Found {value!r}.")
            return None
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if want is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key} must be true or false. Found {value!r}.")
        return None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, want) or isinstance(value, bool) != (want is bool):
        problems.append(f"{key} must be a {want.__name__}. Found {value!r}.")
        return None
    return value


def from_run_config(run_config: Mapping[str, Any]) -> FedrecConfig:
    """Build and check a :class:`FedrecConfig`; missing keys take the defaults.

    Raises:
        ConfigError: listing every unknown key and every bad value at once.
    """
    expected = _expected_keys()
    problems: list[str] = []
    top: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, value in run_config.items():
        if key not in expected:
            close = [k for k in expected if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.append(f"unknown key {key!r}.{hint}")
            continue
        name, group, want = expected[key]
        coerced = _coerce(key, value, want, problems)
        if coerced is None:
            continue
        if group is None:
            top[name] = coerced
        else:
            groups.setdefault(group, {})[name] = coerced
    built: dict[str, Any] = dict(top)
    defaults = FedrecConfig()
    for group, values in groups.items():
        built[group] = dataclasses.replace(getattr(defaults, group), **values)
    cfg = dataclasses.replace(defaults, **built)  # keys that parsed; the rest stay default
    problems.extend(check(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def check(cfg: FedrecConfig) -> list[str]:
    """Value checks that do not need data (user counts are checked where data is loaded)."""
    p: list[str] = [
        f"{key} must be a finite number. Found {value}."
        for key, value in cfg.to_run_config().items()
        if isinstance(value, float) and not math.isfinite(value)
    ]

    def positive(name: str, value: float) -> None:
        if not value > 0 and math.isfinite(value):
            p.append(f"{name} must be > 0. Found {value}.")

    positive("num-server-rounds", cfg.num_server_rounds)
    if not 0 <= cfg.seed < 2**32:
        p.append(f"seed must be in [0, 2**32). Found {cfg.seed}.")
    positive("min-nodes", cfg.min_nodes)
    positive("round-timeout", cfg.round_timeout)
    if not cfg.channels:
        p.append("channels must name at least one channel. Found ''.")
    bad = [c for c in cfg.channels if not c.replace("-", "").replace("_", "").isalnum()]
    if bad:
        p.append(f"channels must be letters, digits, '-' or '_'. Found {bad}.")
    if len(set(cfg.channels)) != len(cfg.channels):
        p.append(f"channels must not repeat. Found {list(cfg.channels)}.")
    bindings, problems = node_bindings(cfg.node_channels)
    p += problems
    unknown = sorted(set(bindings.values()) - set(cfg.channels))
    if unknown:
        p.append(
            f"node-channels binds channels that are not in channels {list(cfg.channels)}. "
            f"Found {unknown}."
        )
    if cfg.strategy.name not in STRATEGIES:
        p.append(f"strategy must be one of {list(STRATEGIES)}. Found {cfg.strategy.name!r}.")
    if cfg.strategy.proximal_mu < 0:
        p.append(f"strategy.proximal-mu must be >= 0. Found {cfg.strategy.proximal_mu}.")
    positive("strategy.server-lr", cfg.strategy.server_lr)
    positive("model.dim", cfg.model.dim)
    positive("model.head-scale", cfg.model.head_scale)
    if cfg.model.heads not in HEADS:
        p.append(f"model.heads must be one of {list(HEADS)}. Found {cfg.model.heads!r}.")
    if cfg.model.item_prior not in ITEM_PRIORS:
        p.append(
            f"model.item-prior must be one of {list(ITEM_PRIORS)}. Found {cfg.model.item_prior!r}."
        )
    if cfg.model.tower not in TOWERS:
        p.append(f"model.tower must be one of {list(TOWERS)}. Found {cfg.model.tower!r}.")
    positive("model.blocks", cfg.model.blocks)
    positive("model.attention-heads", cfg.model.attention_heads)
    attention = cfg.model.tower == "attention"
    if attention and cfg.model.attention_heads > 0 and cfg.model.dim % cfg.model.attention_heads:
        p.append(
            f"model.dim ({cfg.model.dim}) must be a multiple of model.attention-heads. "
            f"Found {cfg.model.attention_heads}."
        )
    if cfg.model.hidden < 0:
        p.append(f"model.hidden must be >= 0. Found {cfg.model.hidden}.")
    positive("model.max-history", cfg.model.max_history)
    positive("train.local-steps", cfg.train.local_steps)
    positive("train.batch-size", cfg.train.batch_size)
    positive("train.positions", cfg.train.positions)
    if cfg.train.negatives < 0:
        p.append(
            f"train.negatives must be >= 0 (0: softmax over the whole catalogue). Found {cfg.train.negatives}."
        )
    positive("train.lr", cfg.train.lr)
    positive("train.head-lr-scale", cfg.train.head_lr_scale)
    if not 0 <= cfg.train.personal_mix < 1:
        p.append(f"train.personal-mix must be in [0, 1). Found {cfg.train.personal_mix}.")
    if cfg.train.head_pull < 0:
        p.append(f"train.head-pull must be >= 0. Found {cfg.train.head_pull}.")
    if cfg.train.scores_dtype not in SCORE_DTYPES:
        p.append(
            f"train.scores-dtype must be one of {list(SCORE_DTYPES)}. Found {cfg.train.scores_dtype!r}."
        )
    if cfg.train.optimizer not in OPTIMIZERS:
        p.append(
            f"train.optimizer must be one of {list(OPTIMIZERS)}. Found {cfg.train.optimizer!r}."
        )
    dp = cfg.dp
    positive("dp.target-epsilon", dp.target_epsilon)
    if not 0 < dp.target_delta < 1:
        p.append(f"dp.target-delta must be in (0, 1). Found {dp.target_delta}.")
    positive("dp.max-grad-norm", dp.max_grad_norm)
    if not 0 < dp.prior_share < 1:
        p.append(f"dp.prior-share must be in (0, 1). Found {dp.prior_share}.")
    if dp.accountant not in ACCOUNTANTS:
        p.append(f"dp.accountant must be one of {list(ACCOUNTANTS)}. Found {dp.accountant!r}.")
    if dp.grad_sample_mode not in GRAD_SAMPLE_MODES:
        p.append(
            f"dp.grad-sample-mode must be one of {list(GRAD_SAMPLE_MODES)}. "
            f"Found {dp.grad_sample_mode!r}."
        )
    positive("eval.max-users", cfg.eval.max_users)
    if cfg.audit.canaries < 0:
        p.append(f"audit.canaries must be >= 0. Found {cfg.audit.canaries}.")
    if (cfg.audit.canaries > 0 or cfg.audit.disable_noise) and not dp.enabled:
        p.append(
            "audit.canaries and audit.disable-noise act on DP-SGD steps and need "
            f"dp.enabled = true. Found dp.enabled = {dp.enabled}."
        )
    return p


def node_bindings(text: str) -> tuple[dict[int, str], list[str]]:
    """``node-channels`` (``"NODE_ID=channel,NODE_ID=channel"``) as node id -> channel, and
    what is wrong with it. A node id is the integer the SuperLink gave the node's key
    (``flwr supernode register`` prints it); one node serves one channel."""
    out: dict[int, str] = {}
    problems: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        node, eq, channel = (s.strip() for s in item.partition("="))
        if not eq or not node.isdigit() or not channel:
            problems.append(
                f"node-channels entries must be NODE_ID=channel, e.g. '7382910=finance'. "
                f"Found {item!r}."
            )
        elif int(node) in out and out[int(node)] != channel:
            problems.append(
                f"node-channels binds node {node} to both {out[int(node)]!r} and {channel!r}."
            )
        else:
            out[int(node)] = channel
    return out, problems


def check_delta(target_delta: float, num_users: int, channel: str) -> str | None:
    """δ must be below 1/users, or one user's data could leak outright with probability δ."""
    if num_users > 0 and not target_delta < 1.0 / num_users:
        return (
            f"dp.target-delta must be < 1/users = {1.0 / num_users:.3g} for channel "
            f"{channel!r} ({num_users} users). Found {target_delta}. Lower dp.target-delta."
        )
    return None


def parse_value(text: str) -> Any:
    """A ``--set key=value`` value: TOML (``3``, ``true``, ``"text"``), else the bare text."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"] if text else ""
    except tomllib.TOMLDecodeError:
        return text  # a bare string such as a path: --set encoder-dir=/models/x

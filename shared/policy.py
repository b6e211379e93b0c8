"""A platform's privacy policy: what its node accepts, whatever the server asks.

The run config is written by whoever submits the run (the server side). A node reads its policy
from its own configuration instead (a TOML file: ``--node-config policy="..."`` in deployment,
the ``FEDREC_NODE_POLICY`` environment variable of the node process in simulation) and refuses
every request outside it: :func:`refusals` lists what a run asks for that the policy does not
allow, before anything is trained or evaluated.

Defaults (no policy file) and the rule behind each:

* ``dp-required = true``: a node never trains without DP unless its operator says so.
* ``lifetime-epsilon = 10`` at ``max-delta = 1e-5``: ε per user on this platform across every
  run, composed by the node's accountant from its ledger. 10 is the upper end of the ε range
  the DP literature calls meaningful for user-level guarantees.
* ``min-noise-multiplier = 0.5``: a single full-batch step below it spends more than ε = 10
  at δ = 1e-5 by itself.
* ``max-sample-rate = 1.0``: DP-SGD may train on every user at once.
* ``accountants = ["prv", "rdp"]``: the two Opacus accountants fedrec's audit recomputes.
* ``allow-canaries = false``, ``allow-noise-off = false``: audit switches are refused.
* ``max-evaluations-per-run = 20``, ``max-evaluations = 200``: evaluation replies are exact
  aggregates over the platform's held-out items (not noised), so each one is a query the server
  chooses; the cap bounds how many it gets.
* ``send-loss = false``: the training loss is an un-noised aggregate; it stays on the node.
* ``secure-noise = true``: DP noise from a ChaCha20 CSPRNG keyed from the OS (see
  ``fedrec.client.noise``), not torch's Mersenne Twister.
* ``ledger-key = ""``: a file whose bytes key the ledger's anchor (HMAC-SHA256); empty: unkeyed.

Must not: import ``fedrec.server`` or ``fedrec.client``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.shared.config import ACCOUNTANTS, FedrecConfig
from fedrec.shared.errors import FedrecError

POLICY_ENV = "FEDREC_NODE_POLICY"  # simulation: the node process's policy file
NODE_CONFIG_KEY = "policy"  # deployment: --node-config policy="/path/policy.toml"


class PolicyError(FedrecError, ValueError):
    """The policy file cannot be read or holds a bad value."""

    exit_code = 2


@dataclass(frozen=True)
class NodePolicy:
    dp_required: bool = True
    lifetime_epsilon: float = 10.0
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.5
    max_sample_rate: float = 1.0
    accountants: tuple[str, ...] = ACCOUNTANTS
    allow_canaries: bool = False
    allow_noise_off: bool = False
    max_evaluations_per_run: int = 20
    max_evaluations: int = 200
    send_loss: bool = False
    secure_noise: bool = True
    ledger_key: str = ""
    source: str = "built-in default"  # where it was read from (not a policy key)

    def to_dict(self) -> dict[str, Any]:
        """The policy's keys as in its file (``source`` apart)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name != "source":
                value = getattr(self, f.name)
                out[f.name.replace("_", "-")] = list(value) if isinstance(value, tuple) else value
        return out

    def digest(self) -> str:
        """sha256 of the policy's canonical JSON: which policy a ledger line was kept under."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


_FIELDS = {
    f.name.replace("_", "-"): f for f in dataclasses.fields(NodePolicy) if f.name != "source"
}


def parse_policy(data: dict[str, Any], source: str) -> NodePolicy:
    """A policy from a TOML document's table (all keys optional; unknown keys refused).

    Raises:
        PolicyError: listing every unknown key and bad value, with ``source``.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in data.items():
        f = _FIELDS.get(key)
        if f is None:
            problems.append(f"unknown key {key!r} (known: {', '.join(sorted(_FIELDS))})")
            continue
        default = getattr(NodePolicy(), f.name)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, tuple):
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            value = tuple(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            problems.append(f"{key} must be a {type(default).__name__}. Found {value!r}.")
            continue
        values[f.name] = value
    policy = NodePolicy(**values, source=source)
    problems += _check(policy)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise PolicyError(f"node policy {source}: {len(problems)} problem(s):\n{lines}")
    return policy


def _check(p: NodePolicy) -> list[str]:
    out = []
    if not (p.lifetime_epsilon > 0 and math.isfinite(p.lifetime_epsilon)):
        out.append(f"lifetime-epsilon must be a finite number > 0. Found {p.lifetime_epsilon}.")
    if not 0 < p.max_delta < 1:
        out.append(f"max-delta must be in (0, 1). Found {p.max_delta}.")
    if not (p.min_noise_multiplier >= 0 and math.isfinite(p.min_noise_multiplier)):
        out.append(f"min-noise-multiplier must be >= 0. Found {p.min_noise_multiplier}.")
    if not 0 < p.max_sample_rate <= 1:
        out.append(f"max-sample-rate must be in (0, 1]. Found {p.max_sample_rate}.")
    bad = sorted(set(p.accountants) - set(ACCOUNTANTS))
    if bad or not p.accountants:
        out.append(f"accountants must be a non-empty subset of {list(ACCOUNTANTS)}. Found {bad}.")
    for name in ("max_evaluations_per_run", "max_evaluations"):
        if getattr(p, name) < 0:
            out.append(f"{name.replace('_', '-')} must be >= 0. Found {getattr(p, name)}.")
    return out


def load_policy(path: str | Path) -> NodePolicy:
    """The policy in the TOML file ``path``.

    Raises:
        PolicyError: the file is missing, not TOML, or holds a bad key or value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(
            f"node policy {path}: cannot read it ({exc.strerror}). Fix: point the node's "
            f'policy (--node-config policy="...", or {POLICY_ENV}) at a readable TOML file.'
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"node policy {path}: not valid TOML ({exc})") from None
    return parse_policy(data, str(path.resolve()))


def resolve_policy(node_config: dict[str, Any]) -> NodePolicy:
    """The node's policy: ``policy`` in its node-config, else :data:`POLICY_ENV` of its process,
    else the built-in default. Never the run config."""
    path = str(node_config.get(NODE_CONFIG_KEY, "") or os.environ.get(POLICY_ENV, ""))
    return load_policy(path) if path else NodePolicy()


def refusals(cfg: FedrecConfig, policy: NodePolicy) -> list[str]:
    """What the run ``cfg`` asks of this node that ``policy`` does not allow (empty: nothing).

    These need no data; σ and the sample rate, which depend on the node's users, are checked
    by the DP session (:func:`sampling_refusals`).
    """
    out: list[str] = []
    dp = cfg.dp
    if not dp.enabled:
        if policy.dp_required:
            out.append("dp.enabled = false: this node's policy requires DP (dp-required = true)")
        return out
    if dp.target_delta > policy.max_delta:
        out.append(
            f"dp.target-delta = {dp.target_delta:g} is above the policy's max-delta "
            f"{policy.max_delta:g}"
        )
    if dp.accountant not in policy.accountants:
        out.append(
            f"dp.accountant = {dp.accountant!r} is not among the policy's accountants "
            f"{list(policy.accountants)}"
        )
    if 0 <= dp.noise_multiplier < policy.min_noise_multiplier:
        out.append(
            f"dp.noise-multiplier = {dp.noise_multiplier:g} is below the policy's "
            f"min-noise-multiplier {policy.min_noise_multiplier:g}"
        )
    if cfg.audit.canaries > 0 and not policy.allow_canaries:
        out.append(
            f"audit.canaries = {cfg.audit.canaries}: this node's policy does not accept audit "
            "canaries (allow-canaries = false)"
        )
    if cfg.audit.disable_noise and not policy.allow_noise_off:
        out.append(
            "audit.disable-noise = true: this node's policy does not accept training without "
            "noise (allow-noise-off = false)"
        )
    return out


def sampling_refusals(policy: NodePolicy, noise_multiplier: float, sample_rate: float) -> list[str]:
    """σ and q, as the node planned them from its users, against the policy."""
    out = []
    if noise_multiplier < policy.min_noise_multiplier:
        out.append(
            f"the planned noise multiplier {noise_multiplier:.4g} is below the policy's "
            f"min-noise-multiplier {policy.min_noise_multiplier:g} (the run plans too many "
            "steps or too high an ε for this platform)"
        )
    if sample_rate > policy.max_sample_rate:
        out.append(
            f"the sample rate {sample_rate:.4g} is above the policy's max-sample-rate "
            f"{policy.max_sample_rate:g} (lower train.batch-size)"
        )
    return out


def to_toml(policy: NodePolicy) -> str:
    """``policy`` as the text of a policy file."""
    lines = ["# fedrec node privacy policy", f"# source: {policy.source}"]
    lines += [f"{key} = {_toml(value)}" for key, value in policy.to_dict().items()]
    return "\n".join(lines) + "\n"


def write_policy(path: Path, policy: NodePolicy) -> None:
    """``policy`` as a TOML file (what a simulation's nodes were given, kept in its run dir)."""
    from fedrec.shared.fsio import atomic_write_text

    atomic_write_text(path, to_toml(policy))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))

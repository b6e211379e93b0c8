"""Client message handlers as plain functions of (content, context) -> reply content.

Owns: what one platform does with each message: cache the item matrix, train with DP and keep
the accountant, evaluate; and the reply, built only through ``shared.wire.build_reply``.

Must not: import ``server/``; put user ids, interactions, per-user values or gradients in a
reply (the allowlist refuses them anyway).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from typing import NoReturn, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedrec.client import node as nodes
from fedrec.client.dp import DPSession
from fedrec.client.ledger import EVALUATED, REFUSED, TRAINED, NodeLedger
from fedrec.client.training import (
    GradHook,
    TrainSpec,
    canary_directions,
    canary_grad_hook,
    evaluate,
    leave_last_out,
    model_scorer,
    train_local,
    trainable_users,
)
from fedrec.shared import hashlog, privacy, wire
from fedrec.shared.config import FedrecConfig, from_run_config
from fedrec.shared.data import Sequences
from fedrec.shared.errors import FedrecError
from fedrec.shared.model import (
    CrossPlatformModel,
    RecModel,
    build_model,
    mix_shared,
    param_shapes,
    shared_weights,
    with_prior,
)
from fedrec.shared.policy import NodePolicy, refusals, resolve_policy
from fedrec.shared.prior import popularity_counts, prior_logits

log = logging.getLogger(__name__)

ITEMS_QUERY = wire.ITEMS_QUERY
REFUSED_CODE = wire.REFUSED_CODE
BUDGET_REFUSED = "privacy-refused"


class Refused(RuntimeError):
    """This node will not train or evaluate (budget spent, outside its policy, untrusted
    ledger); says why."""


def _setup(context: Context) -> tuple[FedrecConfig, nodes.Node]:
    torch.set_num_threads(int(context.node_config.get("torch-threads", 1)))
    cfg = from_run_config(context.run_config)
    return cfg, nodes.resolve_node(dict(context.node_config), cfg)


def _guard(
    cfg: FedrecConfig, node: nodes.Node, context: Context, server_round: int, kind: str
) -> tuple[NodePolicy, NodeLedger]:
    """The node's own policy and its checked ledger; refuses (recorded in the ledger when it
    can be trusted) a run that asks for anything the policy does not allow."""
    try:
        policy = resolve_policy(dict(context.node_config))
        key = hashlog.load_key(policy.ledger_key) if policy.ledger_key else None
        ledger = NodeLedger(node.ledger, node.channel, key)
        ledger.check()
    except FedrecError as exc:
        raise Refused(f"{BUDGET_REFUSED}: {exc}") from None
    refused = refusals(cfg, policy)
    if refused:
        reason = "node policy: " + "; ".join(refused)
        _refuse(ledger, _run(cfg, context), server_round, reason, kind)
    return policy, ledger


def _refuse(ledger: NodeLedger, run: str, server_round: int, reason: str, kind: str) -> NoReturn:
    """Record the refusal of a ``kind`` (train, evaluate) request on the node, then raise it
    for the error reply."""
    ledger.append(
        {
            "run": run,
            "round": server_round,
            "kind": kind,
            "status": REFUSED,
            "steps": 0,
            "reason": reason,
        }
    )
    raise Refused(f"{BUDGET_REFUSED}: {reason}")


def _run(cfg: FedrecConfig, context: Context) -> str:
    """Which run a ledger line belongs to: the server's run directory (a resumed run keeps
    it) or, without one, Flower's run id. The server names it; the node's lifetime budget
    does not depend on it."""
    return cfg.run_dir or f"flower-run-{context.run_id}"


def _tag(cfg: FedrecConfig, context: Context) -> str:
    """The run's name in the node's own files (optimizer state, item prior, personal
    weights): stable across a resume, which Flower gives a new run id."""
    return hashlib.sha256(_run(cfg, context).encode()).hexdigest()[:16]


_R = TypeVar("_R", ArrayRecord, ConfigRecord)


def _record(content: RecordDict, name: str, kind: type[_R]) -> _R:
    """The server message's ``name`` record, which must be a ``kind``."""
    record = content.get(name)
    if not isinstance(record, kind):
        raise ValueError(f"the server's message has no {name!r} {kind.__name__}")
    return record


def _config(content: RecordDict, key: str, default: str | int | float = "") -> str:
    """A scalar of the server message's config record, as text (the caller converts it)."""
    return str(_record(content, wire.CONFIG, ConfigRecord).get(key, default))


def _model(cfg: FedrecConfig, content: RecordDict, item_dim: int) -> CrossPlatformModel:
    model = build_model(cfg, item_dim)
    arrays = _record(content, wire.ARRAYS, ArrayRecord)
    state = {k: torch.from_numpy(np.array(arrays[k].numpy())) for k in arrays.keys()}
    model.load_state_dict(state, strict=True)
    return model


def _items(content: RecordDict, node: nodes.Node) -> torch.Tensor:
    fp = _config(content, f"{wire.ITEMS_FINGERPRINT}.{node.channel}")
    try:
        matrix = nodes.load_items(node, fp)
    except nodes.NodeConfigError as exc:  # a fingerprint that would name any file
        raise Refused(f"{BUDGET_REFUSED}: {exc}") from None
    return torch.from_numpy(np.array(matrix, dtype=np.float32))


def handle_items(content: RecordDict, context: Context) -> RecordDict:
    """Two-step delivery: without a matrix, report what is cached; with one, store it."""
    _, node = _setup(context)
    if wire.ITEMS in content:
        fp = _config(content, wire.ITEMS_FINGERPRINT)
        matrix = _record(content, wire.ITEMS, ArrayRecord)[wire.ITEMS].numpy()
        nodes.save_items(node, fp, matrix)
        rows = len(matrix)
    else:
        want = _config(content, f"{wire.ITEMS_FINGERPRINT}.{node.channel}")
        cached = want in nodes.cached_fingerprints(node)
        fp = want if cached else ""
        rows = len(nodes.load_items(node, fp)) if cached else 0
    return wire.build_reply(
        wire.ITEMS,
        metrics={wire.ROWS: rows},
        info={wire.CHANNEL: node.channel, wire.SHARD: node.shard, wire.ITEMS_FINGERPRINT: fp},
    )


def handle_train(content: RecordDict, context: Context) -> RecordDict:
    cfg, node = _setup(context)
    t0 = time.perf_counter()
    server_round = int(_config(content, wire.SERVER_ROUND))
    policy, ledger = _guard(cfg, node, context, server_round, "train")
    run = _run(cfg, context)
    label = node.channel if node.shard == 0 else f"{node.channel}-{node.shard}"
    kept = _config(content, f"{wire.LEDGER_HEAD}.{label}")
    if kept and not ledger.holds(kept):
        _refuse(
            ledger,
            run,
            server_round,
            f"this node's last train reply reported ledger head {kept[:12]}…, which its "
            f"ledger {ledger.path} no longer holds: the ledger was truncated or replaced since",
            "train",
        )
    items = _items(content, node)
    seqs, n_items = nodes.load_sequences(node)
    if n_items != len(items):
        raise ValueError(f"{node.channel}: catalogue has {n_items} items, item matrix {len(items)}")
    split = leave_last_out(seqs)
    federated = _model(cfg, content, items.shape[1])
    _personalise(cfg, node, context, federated)
    model = federated.channel_model(node.channel)  # the shared tower and this platform's head
    session = (
        _dp_session(cfg, node, split.train, context, policy, ledger, server_round)
        if cfg.dp.enabled
        else None
    )
    if cfg.model.item_prior != "none":
        prior = _prior(
            node, context, _tag(cfg, context), split.train, len(items), session, server_round
        )
        items = with_prior(items, prior)
    mu = float(_config(content, wire.PROXIMAL_MU, 0.0))
    spec = TrainSpec.from_config(
        cfg,
        steps=cfg.train.local_steps,
        seed=cfg.seed * 100_003 + server_round * 101 + node.shard,
        proximal_mu=mu,
    )
    global_params = model.state_dict() if mu > 0 else None  # train_local copies it
    train = functools.partial(
        train_local,
        model,
        items,
        split.train,
        spec,
        global_params=global_params,
        head_mean=federated.head_mean() if cfg.train.head_pull > 0 else None,
        optimizer_state=nodes.load_optimizer(node, _tag(cfg, context)),
    )
    report: dict[str, float | int | str | bool] = {
        wire.DP_ENABLED: cfg.dp.enabled,
        wire.POLICY: policy.digest(),
    }
    if session is not None:
        try:
            result = train(dp=session, grad_hook=_audit_hook(cfg, node, model, session, spec))
        except privacy.BudgetExceeded as exc:
            session.record(
                round_=server_round, steps=0, status=REFUSED, reason=str(exc), kind="train"
            )
            raise Refused(f"{BUDGET_REFUSED}: {exc}") from exc
        session.record(round_=server_round, steps=result.steps, status=TRAINED)
        context.state[nodes.STATE_KEY] = ConfigRecord({"json": session.to_json()})
        report.update(
            {
                wire.EPSILON: result.epsilon,
                wire.DELTA: session.delta,
                wire.NOISE_MULTIPLIER: session.noise_multiplier,
                wire.MAX_GRAD_NORM: session.max_grad_norm,
                wire.SAMPLE_RATE: session.sample_rate,
                wire.STEPS: result.steps,
                wire.TOTAL_STEPS: session.total_steps(),
                wire.ACCOUNTANT: session.accountant_name,
                wire.GRAD_SAMPLE_MODE: session.grad_sample_mode,
                wire.PRIOR_NOISE_MULTIPLIER: session.prior_noise_multiplier,
                wire.PRIOR_RELEASES: len(session.releases),
                wire.NOISE_SOURCE: session.noise_source,
            }
        )
    else:
        result = train()
        _record_without_dp(ledger, cfg, run, server_round, result.steps)
        report.update({wire.EPSILON: math.inf, wire.STEPS: result.steps})
    report[wire.LEDGER_HEAD] = hashlog.head(ledger.path)
    nodes.save_optimizer(node, _tag(cfg, context), result.optimizer_state)
    if cfg.train.personal_mix > 0:
        nodes.save_personal(node, _tag(cfg, context), shared_weights(federated))
    seconds = time.perf_counter() - t0
    nodes.record_timing(node, server_round, "train", seconds)
    log.info("%s round %d trained in %.1fs", node.channel, server_round, seconds)
    weights = {k: v.detach().numpy() for k, v in federated.state_dict().items()}
    metrics: dict[str, float | int] = {wire.NUM_EXAMPLES: wire.bucket_count(len(split.train))}
    if policy.send_loss:
        metrics[wire.TRAIN_LOSS] = result.loss
    return wire.build_reply(
        "train",
        param_shapes=param_shapes(federated),
        arrays=weights,
        metrics=metrics,
        privacy=report,
        info={wire.CHANNEL: node.channel, wire.SHARD: node.shard},
    )


def _record_without_dp(
    ledger: NodeLedger, cfg: FedrecConfig, run: str, server_round: int, steps: int
) -> None:
    """A training call without DP (allowed by the node's policy) is on the ledger too, as an
    event of noise multiplier 0: ε is infinite from then on, and every later DP run on this
    node is refused for its lifetime budget, as it must be."""
    found = ledger.last_history()
    history = [list(e) for e in found[1]] if found else []
    ledger.append(
        {
            "run": run,
            "round": server_round,
            "status": TRAINED,
            "dp": False,
            "steps": steps,
            "epsilon": math.inf,
            "accountant": found[0] if found else cfg.dp.accountant,
            "history": [*history, [0.0, 1.0, steps]],
            "releases": [],
        }
    )


def _personalise(
    cfg: FedrecConfig, node: nodes.Node, context: Context, federated: CrossPlatformModel
) -> None:
    """``train.personal-mix``: mix this node's own last shared weights into the federation's."""
    if cfg.train.personal_mix <= 0:
        return
    own = nodes.load_personal(node, _tag(cfg, context))
    if own is not None:
        mix_shared(federated, own, cfg.train.personal_mix)


def _prior(
    node: nodes.Node,
    context: Context,
    tag: str,
    train: Sequences,
    n_items: int,
    session: DPSession | None,
    server_round: int,
) -> np.ndarray:
    """This platform's item prior for this run: released once (under DP, through the session,
    recorded in the ledger) and kept on the node's disk for the rounds after."""
    prior = nodes.load_prior(node, tag)
    if prior is not None:
        return prior
    counts = popularity_counts(train, n_items)
    if session is not None:
        try:
            counts = session.release_prior(counts, round_=server_round)
        except privacy.BudgetExceeded as exc:
            session.record(
                round_=server_round, steps=0, status=REFUSED, reason=str(exc), kind="release"
            )
            raise Refused(f"{BUDGET_REFUSED}: {exc}") from exc
        context.state[nodes.STATE_KEY] = ConfigRecord({"json": session.to_json()})
    prior = prior_logits(counts)
    nodes.save_prior(node, tag, prior)
    return prior


def _dp_session(
    cfg: FedrecConfig,
    node: nodes.Node,
    train: Sequences,
    context: Context,
    policy: NodePolicy,
    ledger: NodeLedger,
    server_round: int,
    kind: str = "train",
) -> DPSession:
    """This node's DP session under its policy: the accountant restored from this run's
    state and the node's ledger; a refusal is recorded in the ledger."""
    record = context.state.config_records.get(nodes.STATE_KEY)
    saved = json.loads(str(record["json"])) if record else None
    run = _run(cfg, context)
    if saved is not None and saved.get("run") != run:
        saved = None  # another run's state (Flower reuses a context per node and run)
    try:
        return DPSession(
            cfg.dp,
            users=trainable_users(train),
            batch_size=cfg.train.batch_size,
            planned_steps=cfg.planned_steps(),
            channel=node.channel,
            ledger=ledger,
            saved=saved,
            item_prior=cfg.model.item_prior != "none",
            policy=policy,
            run=run,
            expected_steps=max(server_round - 1, 0) * cfg.train.local_steps,
        )
    except privacy.PrivacyConfigError as exc:
        _refuse(ledger, run, server_round, str(exc), kind)


def _audit_hook(
    cfg: FedrecConfig, node: nodes.Node, model: RecModel, session: DPSession, spec: TrainSpec
) -> GradHook | None:
    """The white-box audit's gradient canaries (and its noise-off fault injection), if asked."""
    if cfg.audit.canaries <= 0 and not cfg.audit.disable_noise:
        return None
    if cfg.audit.disable_noise:
        log.warning("%s: audit.disable-noise: FAULT INJECTION, NO DP NOISE", node.channel)
    shapes = [tuple(p.shape) for p in model.parameters()]
    directions = canary_directions(shapes, cfg.audit.canaries, cfg.audit.seed, node.channel)
    return canary_grad_hook(
        model,
        directions[: cfg.audit.canaries // 2],  # the second half is the auditor's null
        max_grad_norm=session.max_grad_norm,
        sample_rate=session.sample_rate,
        seed=spec.seed,
        disable_noise=cfg.audit.disable_noise,
    )


def handle_evaluate(content: RecordDict, context: Context) -> RecordDict:
    """Ranking metrics of the global model on this channel's held-out items, within the
    policy's evaluation caps; each evaluation is recorded in the ledger before it is sent."""
    cfg, node = _setup(context)
    t0 = time.perf_counter()
    server_round = int(_config(content, wire.SERVER_ROUND, 0))
    policy, ledger = _guard(cfg, node, context, server_round, "evaluate")
    run = _run(cfg, context)
    in_run, lifetime = ledger.evaluations(run)
    if in_run >= policy.max_evaluations_per_run or lifetime >= policy.max_evaluations:
        _refuse(
            ledger,
            run,
            server_round,
            f"evaluation cap: this run has had {in_run} evaluation(s) (policy "
            f"max-evaluations-per-run {policy.max_evaluations_per_run}), this node "
            f"{lifetime} (max-evaluations {policy.max_evaluations})",
            "evaluate",
        )
    items = _items(content, node)
    seqs, _ = nodes.load_sequences(node)
    split = leave_last_out(seqs)
    federated = _model(cfg, content, items.shape[1])
    _personalise(cfg, node, context, federated)
    model = federated.channel_model(node.channel)
    if cfg.model.item_prior != "none":
        prior = nodes.load_prior(node, _tag(cfg, context))
        if prior is None:  # evaluated before it trained: release the prior now
            session = (
                _dp_session(
                    cfg, node, split.train, context, policy, ledger, server_round, "evaluate"
                )
                if cfg.dp.enabled
                else None
            )
            prior = _prior(
                node, context, _tag(cfg, context), split.train, len(items), session, server_round
            )
        items = with_prior(items, prior)
    metrics, n = evaluate(
        model_scorer(model, items),
        len(items),
        split,
        max_history=cfg.model.max_history,
        max_users=cfg.eval.max_users,
        seed=cfg.seed,
    )
    ledger.append({"run": run, "round": server_round, "status": EVALUATED, "steps": 0, "users": n})
    nodes.record_timing(node, server_round, "evaluate", time.perf_counter() - t0)
    return wire.build_reply(
        "evaluate",
        metrics={**metrics, wire.NUM_EXAMPLES: wire.bucket_count(n)},
        info={wire.CHANNEL: node.channel, wire.SHARD: node.shard},
    )

"""Client message handlers as plain functions of (content, context) -> reply content.

Owns: what one platform does with each message: cache the item matrix, train with DP and keep
the accountant, evaluate; and the reply, built only through ``shared.wire.build_reply``.

Must not: import ``server/``; put user ids, interactions, per-user values or gradients in a
reply (the allowlist refuses them anyway).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedrec.client import node as nodes
from fedrec.client.training import (
    DPSpec,
    TrainSpec,
    canary_directions,
    canary_grad_hook,
    evaluate,
    leave_last_out,
    model_scorer,
    train_local,
)
from fedrec.shared import privacy, wire
from fedrec.shared.config import FedrecConfig, check_delta, from_run_config
from fedrec.shared.model import CrossPlatformModel, build_model, param_shapes

log = logging.getLogger(__name__)

ITEMS_QUERY = wire.ITEMS_QUERY
REFUSED_CODE = wire.REFUSED_CODE
BUDGET_REFUSED = "privacy-refused"


class Refused(RuntimeError):
    """This node will not train this round (budget spent, bad DP setting); says why."""


def _setup(context: Context) -> tuple[FedrecConfig, nodes.Node]:
    torch.set_num_threads(int(context.node_config.get("torch-threads", 1)))
    cfg = from_run_config(context.run_config)
    return cfg, nodes.resolve_node(dict(context.node_config), cfg)


def _model(cfg: FedrecConfig, content: RecordDict, item_dim: int) -> CrossPlatformModel:
    model = build_model(cfg, item_dim)
    arrays = content[wire.ARRAYS]
    state = {k: torch.from_numpy(np.array(arrays[k].numpy())) for k in arrays.keys()}
    model.load_state_dict(state, strict=True)
    return model


def _items(content: RecordDict, node: nodes.Node) -> torch.Tensor:
    fp = str(content[wire.CONFIG][f"{wire.ITEMS_FINGERPRINT}.{node.channel}"])
    return torch.from_numpy(np.array(nodes.load_items(node, fp), dtype=np.float32))


def handle_items(content: RecordDict, context: Context) -> RecordDict:
    """Two-step delivery: without a matrix, report what is cached; with one, store it."""
    _, node = _setup(context)
    if wire.ITEMS in content:
        fp = str(content[wire.CONFIG][wire.ITEMS_FINGERPRINT])
        matrix = content[wire.ITEMS][wire.ITEMS].numpy()
        nodes.save_items(node, fp, matrix)
        rows = len(matrix)
    else:
        want = str(content[wire.CONFIG].get(f"{wire.ITEMS_FINGERPRINT}.{node.channel}", ""))
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
    items = _items(content, node)
    seqs, n_items = nodes.load_sequences(node)
    if n_items != len(items):
        raise ValueError(f"{node.channel}: catalogue has {n_items} items, item matrix {len(items)}")
    split = leave_last_out(seqs)
    federated = _model(cfg, content, items.shape[1])
    model = federated.channel_model(node.channel)  # the shared tower and this platform's head
    config = content[wire.CONFIG]
    server_round = int(config[wire.SERVER_ROUND])
    mu = float(config.get(wire.PROXIMAL_MU, 0.0))
    spec = TrainSpec.from_config(
        cfg,
        steps=cfg.train.local_steps,
        seed=cfg.seed * 100_003 + server_round * 101 + node.shard,
        proximal_mu=mu,
    )
    global_params = model.state_dict() if mu > 0 else None  # train_local copies it
    report: dict[str, float | int | str | bool] = {wire.DP_ENABLED: cfg.dp.enabled}
    if cfg.dp.enabled:
        state_record = context.state.config_records.get(nodes.STATE_KEY)
        state = nodes.restore_privacy(node, dict(state_record) if state_record else None, cfg)
        users = int((split.train.lengths() >= 2).sum())
        problem = check_delta(cfg.dp.target_delta, users, node.channel)
        if problem:
            raise Refused(f"{BUDGET_REFUSED}: {problem}")
        q = privacy.sample_rate_for(users, spec.batch_size)
        sigma = cfg.dp.noise_multiplier
        if sigma < 0:
            sigma = privacy.plan_noise_multiplier(
                target_epsilon=cfg.dp.target_epsilon,
                target_delta=cfg.dp.target_delta,
                sample_rate=q,
                steps=cfg.planned_steps(),
                accountant=cfg.dp.accountant,
            )
        dp = DPSpec(sigma, cfg.dp.max_grad_norm, cfg.dp.target_epsilon, cfg.dp.grad_sample_mode)
        hook = None
        if cfg.audit.canaries > 0 or cfg.audit.disable_noise:
            if cfg.audit.disable_noise:
                log.warning("%s: audit.disable-noise: FAULT INJECTION, NO DP NOISE", node.channel)
            shapes = [tuple(p.shape) for p in model.parameters()]
            directions = canary_directions(
                shapes, cfg.audit.canaries, cfg.audit.seed, node.channel
            )[: cfg.audit.canaries // 2]  # the second half is the auditor's null
            hook = canary_grad_hook(
                model,
                directions,
                max_grad_norm=cfg.dp.max_grad_norm,
                sample_rate=q,
                seed=spec.seed,
                disable_noise=cfg.audit.disable_noise,
            )
        try:
            result = train_local(
                model,
                items,
                split.train,
                spec,
                dp=dp,
                state=state,
                global_params=global_params,
                grad_hook=hook,
                optimizer_state=nodes.load_optimizer(node, context.run_id),
            )
        except privacy.BudgetExceeded as exc:
            privacy.append_ledger(
                node.ledger,
                state=state,
                round_=server_round,
                steps=0,
                noise_multiplier=sigma,
                sample_rate=q,
                status="refused",
                channel=node.channel,
            )
            raise Refused(f"{BUDGET_REFUSED}: {exc}") from exc
        privacy.append_ledger(
            node.ledger,
            state=state,
            round_=server_round,
            steps=result.steps,
            noise_multiplier=sigma,
            sample_rate=q,
            status="trained",
            channel=node.channel,
        )
        context.state[nodes.STATE_KEY] = ConfigRecord({"json": state.to_json()})
        report.update(
            {
                wire.EPSILON: result.epsilon,
                wire.DELTA: cfg.dp.target_delta,
                wire.NOISE_MULTIPLIER: sigma,
                wire.MAX_GRAD_NORM: cfg.dp.max_grad_norm,
                wire.SAMPLE_RATE: q,
                wire.STEPS: result.steps,
                wire.TOTAL_STEPS: state.total_steps(),
                wire.ACCOUNTANT: cfg.dp.accountant,
                wire.GRAD_SAMPLE_MODE: cfg.dp.grad_sample_mode,
            }
        )
    else:
        result = train_local(
            model,
            items,
            split.train,
            spec,
            global_params=global_params,
            optimizer_state=nodes.load_optimizer(node, context.run_id),
        )
        report.update({wire.EPSILON: math.inf, wire.STEPS: result.steps})
    nodes.save_optimizer(node, context.run_id, result.optimizer_state)
    seconds = time.perf_counter() - t0
    nodes.record_timing(node, server_round, "train", seconds)
    log.info("%s round %d trained in %.1fs", node.channel, server_round, seconds)
    weights = {k: v.detach().numpy() for k, v in federated.state_dict().items()}
    return wire.build_reply(
        "train",
        param_shapes=param_shapes(federated),
        arrays=weights,
        metrics={
            wire.TRAIN_LOSS: result.loss,
            wire.NUM_EXAMPLES: wire.bucket_count(len(split.train)),
        },
        privacy=report,
        info={wire.CHANNEL: node.channel, wire.SHARD: node.shard},
    )


def handle_evaluate(content: RecordDict, context: Context) -> RecordDict:
    cfg, node = _setup(context)
    t0 = time.perf_counter()
    items = _items(content, node)
    seqs, _ = nodes.load_sequences(node)
    split = leave_last_out(seqs)
    model = _model(cfg, content, items.shape[1]).channel_model(node.channel)
    metrics, n = evaluate(
        model_scorer(model, items),
        len(items),
        split,
        max_history=cfg.model.max_history,
        max_users=cfg.eval.max_users,
        seed=cfg.seed,
    )
    server_round = int(content[wire.CONFIG].get(wire.SERVER_ROUND, 0))
    nodes.record_timing(node, server_round, "evaluate", time.perf_counter() - t0)
    return wire.build_reply(
        "evaluate",
        metrics={**metrics, wire.NUM_EXAMPLES: wire.bucket_count(n)},
        info={wire.CHANNEL: node.channel, wire.SHARD: node.shard},
    )

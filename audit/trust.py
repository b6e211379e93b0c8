"""What holds against the server, and what does not, derived from the node policy in force.

The run config is the server's; a node's policy (:mod:`fedrec.shared.policy`) is its own, and
only what the policy makes the node refuse holds against a server that asks for more. So the
statement is built key by key from the policy: each key gives one sentence, under "holds" when
the node enforces it against the server, under "does not hold" when the server can get past it.
Some limits hold under every policy (the server picks the weights it sends, evaluation replies
are exact, the node runs the app bundle it is sent, counts leak to their bucket).

Must not: import ``server/`` or ``client/``; read files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedrec.shared import wire
from fedrec.shared.policy import NodePolicy

SECURE_SOURCE = "chacha20-os-key"  # fedrec.client.noise.SOURCE_SECURE
FIXED_SEED_SOURCE = "torch-mt19937-fixed-seed"  # benchmarks only: reproducible noise
# Evaluation caps above these (5x the policy defaults) are reported as effectively unbounded:
# each evaluation is an exact query the server chooses.
EVALUATIONS_PER_RUN_BOUND = 100
EVALUATIONS_BOUND = 1000


def unbounded_evaluations(policy: NodePolicy) -> bool:
    """Caps so high that they do not limit the server's exact queries in practice."""
    return (
        policy.max_evaluations_per_run > EVALUATIONS_PER_RUN_BOUND
        or policy.max_evaluations > EVALUATIONS_BOUND
    )


ALWAYS_OPEN = (
    "The server chooses the model weights it sends. Per-user clipping bounds what any DP-SGD "
    "update reveals about one user whatever the weights, but a crafted model can make the "
    "exact replies (evaluation metrics, counts, and the loss where it is sent) reveal more "
    "than an honest model would.",
    "The node runs the app bundle (FAB) the server sends it: unless its SuperNode verifies "
    "bundles (flower-supernode --trusted-entities), a server can ship a client that ignores "
    "this policy. Everything under 'holds' assumes the node runs fedrec's own client code.",
    f"Counts leak to their bucket: '{wire.NUM_EXAMPLES}' is rounded up to a multiple of "
    f"{wire.COUNT_BUCKET}, so the server learns each platform's user count at that "
    "granularity, and which platforms took part in which round, and when.",
    "No secure aggregation: the server sees each platform's DP-noised update on its own.",
)


def _noise(policy: NodePolicy, sources: Sequence[str]) -> tuple[list[str], list[str]]:
    holds, open_ = [], []
    others = sorted(set(sources) - {SECURE_SOURCE})
    if policy.secure_noise and not others:
        holds.append(
            f"DP noise comes from ChaCha20 keyed from the OS ({SECURE_SOURCE}, "
            "secure-noise = true): a cryptographic generator the server cannot predict."
        )
    elif not policy.secure_noise:
        open_.append(
            "secure-noise = false: DP noise may come from torch's Mersenne Twister, which is "
            "not a cryptographic generator (its state can be recovered from its outputs)."
        )
    if others:
        fixed = FIXED_SEED_SOURCE in others
        open_.append(
            f"The nodes reported noise source(s) {', '.join(others)}, not {SECURE_SOURCE}"
            + (": a fixed seed makes the noise reproducible, so ε does not hold." if fixed else ".")
        )
    return holds, open_


def _evaluations(policy: NodePolicy, max_users: object) -> tuple[list[str], list[str]]:
    users = f"up to {max_users} users'" if isinstance(max_users, int) else "the users'"
    caps = (
        f"{policy.max_evaluations_per_run} per run and {policy.max_evaluations} over the "
        "node's lifetime"
    )
    exact = (
        f"Evaluation replies are exact: ranking metrics over {users} held-out items, without "
        f"noise and not covered by ε, on a model the server chooses; the server gets {caps}."
    )
    if unbounded_evaluations(policy):
        return [], [
            f"Evaluations are effectively unbounded ({caps}; above {EVALUATIONS_PER_RUN_BOUND} "
            f"per run or {EVALUATIONS_BOUND} in a lifetime).",
            exact,
        ]
    return [f"Evaluations are capped at {caps} (then refused)."], [exact]


def against_the_server(
    policy: NodePolicy | None,
    *,
    digest: str | None = None,
    nodes: Sequence[str] = (),
    noise_sources: Sequence[str] = (),
    run_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The statement for the nodes ``nodes`` that held ``policy`` (``None``: not known).

    Args:
        policy: the policy in force, or ``None`` when the audit knows only its ``digest``.
        digest: the policy's digest as the nodes reported it.
        nodes: the nodes it covers (labels as in the ledger).
        noise_sources: the noise sources these nodes reported.
        run_config: the run's flattened config (``eval.max-users``).

    Returns:
        ``{"policy", "nodes", "holds", "does_not_hold"}``: ``policy`` names the policy.
    """
    cfg = run_config or {}
    if policy is None:
        name = f"unknown (digest {digest[:12]}…)" if digest else "unknown (no digest reported)"
        return {
            "policy": name,
            "nodes": list(nodes),
            "holds": [],
            "does_not_hold": [
                "No node policy is known for these nodes (no node-policy.toml in the run "
                "directory, none given with --node-policy): nothing can be said about what "
                "they refuse. Give the audit the platforms' policy files to check against the "
                "digests they reported.",
                *ALWAYS_OPEN,
            ],
        }
    holds = [
        "A request outside this policy is refused by the node before anything is trained or "
        "evaluated, recorded in the node's own ledger and answered with an error "
        f"(policy {policy.digest()[:12]}…, {policy.source}).",
    ]
    open_: list[str] = []
    if policy.dp_required:
        holds.append("Training is always DP-SGD: a run without DP is refused (dp-required).")
    else:
        open_.append(
            "dp-required = false: the node trains WITHOUT DP when the run asks; such a run has "
            "no guarantee (ε = ∞)."
        )
    holds.append(
        f"ε per user on this platform, across every run, is kept ≤ {policy.lifetime_epsilon:g} "
        f"at δ = {policy.max_delta:g} by the node's own accountant "
        f"({', '.join(policy.accountants)}) over its ledger; a run asking for a larger δ or "
        "another accountant is refused, one that would pass the ceiling is planned with more "
        "noise or refused."
    )
    holds.append(
        f"Every DP step adds noise of multiplier ≥ {policy.min_noise_multiplier:g}, at a sample "
        f"rate ≤ {policy.max_sample_rate:g} counted from the bucketed user count (a multiple "
        f"of {wire.COUNT_BUCKET})."
    )
    if policy.allow_noise_off:
        open_.append(
            "Noise-off requests (audit.disable-noise) are ACCEPTED (allow-noise-off = true): "
            "the server can have the node train without noise while its ledger records the "
            "planned σ, so ε does not hold against the server."
        )
    else:
        holds.append("Noise-off requests (audit.disable-noise) are refused.")
    if policy.allow_canaries:
        open_.append(
            "Audit canaries (audit.canaries) are ACCEPTED (allow-canaries = true): the server "
            "can have the node add gradient canaries to its updates. They do not depend on the "
            "users' data (ε is unchanged), but the updates carry signals the server chose."
        )
    else:
        holds.append("Audit canaries (audit.canaries) are refused.")
    h, o = _evaluations(policy, cfg.get("eval.max-users"))
    holds += h
    open_ += o
    if policy.send_loss:
        open_.append(
            "The training loss is sent (send-loss = true): an aggregate over the sampled users "
            "without noise, not covered by ε."
        )
    else:
        holds.append("The training loss stays on the node (send-loss = false).")
    h, o = _noise(policy, noise_sources)
    holds += h
    open_ += o
    holds.append(
        "The node's ledger fails closed: a missing, truncated, edited, reordered or another "
        "node's ledger is refused; only an explicit, logged reset starts it again."
    )
    if policy.ledger_key:
        holds.append(
            "The ledger's anchor is keyed (ledger-key): nobody without the key can re-anchor "
            "an edited ledger."
        )
    else:
        open_.append(
            "The ledger's anchor is not keyed (ledger-key empty): whoever can write the node's "
            "disk can rewrite its ledger and anchor consistently."
        )
    return {
        "policy": f"{policy.digest()[:12]}… ({policy.source})",
        "nodes": list(nodes),
        "holds": holds,
        "does_not_hold": [*open_, *ALWAYS_OPEN],
    }

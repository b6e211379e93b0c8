"""``fedrec audit-empirical``: audit the privacy of the real federated pipeline by running it.

Owns: building an *audited dataset* from a world (black-box canary users, each included with
probability 1/2, and a held-out half of the real users), running it through Flower's
Simulation Engine (:func:`simulations.flower.run_simulation`) with DP on, as a non-private
control, and as a fault-injected run whose noise is off, then scoring the final global model:

* black box, one run (Steinke, Nasr, Jagielski, NeurIPS 2023): canary user i has a fixed
  random history h_i of existing items and a secret target t_i (no two canaries share either);
  y_i = s(t_i | h_i) minus the means over the other canaries of s(t_j | h_i) and s(t_i | h_j)
  (:func:`one_run_scores`);
* white box (Andrew et al., ICLR 2024): the clients add gradient canaries C·u_j to the clipped
  sum in each DP step (``audit.canaries``); cosines of the *aggregate* model update (initial
  minus final global weights, the descent direction; the only thing the server sees) with the inserted and the
  never-inserted directions of each channel give a μ-GDP estimate;
* loss-threshold membership inference (Yeom et al. 2018) on held-in vs held-out real users:
  score = −cross-entropy over the whole catalogue of each user's last *trained* item (the
  second-to-last; the very last is never trained on, leave-last-out) given the items before it.

Power of the white-box audit. The cosine of a canary with the model update measures it
against everything else in the update. With DP noise that is mostly the noise, and
μ ≈ q·√T / σ, the claim's own GDP μ (an under-estimate here: FedAvg over channels and Adam
dilute it). Without noise it is only the other users' gradients projected on a random
direction in P dimensions: measured on the default world (P = 123,264 per platform) the
noise-off run gets ε estimates of 157 to 403 against a claim of 8 (3 seeds). Few parameters
and many users with aligned gradients weaken it (roughly μ ∝ √P / (N·g), g the norm of their
mean clipped gradient); ``AuditPlan.max_users`` shrinks N.

Layout of ``out``: ``data/`` (what the clients read), ``secrets/`` (inclusion bits, canary
targets, held-out users: the auditor's only, never under ``data/``), ``runs/<name>/`` (run
directories), ``audit/`` (report), ``summary.json``.

Must not: be imported by ``server/``, ``client/`` or ``shared/``; pass anything from
``secrets/`` to a client. Runs with ``audit.disable-noise`` are fault injection, not private.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared.fsio import atomic_write_text
from fedrec.shared.policy import NodePolicy

log = logging.getLogger(__name__)

SECRETS = "secrets"
DATA = "data"
CANARY_PREFIX = "zz-audit-canary"  # sorts after real ids; says nothing about inclusion
CANARY_T0 = 1_700_000_000  # canary timestamps: any valid, increasing times
GUESS_KS = (10, 20, 50, 100)  # pre-registered one-run guesses: (k, 0) and (k, k)
MIA_MAX_USERS = 2000  # per group and channel


@dataclass(frozen=True)
class AuditPlan:
    """Sizes of the audit. ``canaries`` None: min(300, max(50, users // 5)) per channel.

    ``max_users`` subsamples each channel's real users first: a smaller population makes the
    white-box audit able to see a noise-off run (see the module notes).
    """

    canaries: int | None = None
    history: int = 1  # items in a canary's history (1: every draw of the canary trains t | h)
    holdout: float = 0.5  # share of each channel's real users removed (MIA non-members)
    grad_canaries: int = 200  # white-box directions per channel; half inserted
    seed: int = 0
    max_users: int | None = None  # real users kept per channel (members + held out); None: all


# --- audited dataset ------------------------------------------------------------------------


def _canaries_for(users: int, plan: AuditPlan) -> int:
    # 300 leaves 100 canaries to abstain on between the largest guesses (k = 100 each way), so
    # a few ranked out of place there cost nothing. Finance's control certified 3.29-3.64 over
    # 3 seeds with 300 canaries and per-platform towers (2.58 with 200 and a shared tower).
    return plan.canaries if plan.canaries is not None else min(300, max(50, users // 5))


def build_audited_dataset(world_dir: Path, out: Path, plan: AuditPlan) -> dict[str, Any]:
    """Write ``out/data`` (the audited dataset) and ``out/secrets/canaries.json``.

    Per channel: a random ``plan.holdout`` share of real users is dropped (MIA non-members);
    ``m`` canary users are made, canary i with history ``plan.history`` distinct random items
    and a random target not in it; it is written iff S_i = 1 (probability 1/2), as
    ``history..., target, target``: leave-last-out holds back the final copy, so ``target``
    is trained on given ``history``.

    Returns:
        The secrets (also written to ``out/secrets/canaries.json``).
    """
    from fedrec.shared.data import Interactions
    from fedrec.shared.datasets import load_channel, load_manifest, write_dataset

    manifest = load_manifest(world_dir)
    rng = np.random.default_rng([plan.seed, 0xA0D17])
    cats, inters, secrets = {}, {}, {"plan": dataclasses.asdict(plan), "channels": {}}
    for ch in manifest.channels:
        cat, inter = load_channel(world_dir, ch)
        users = np.unique(inter.user_ids)
        dropped = np.zeros(0, dtype=users.dtype)
        if plan.max_users is not None and len(users) > plan.max_users:
            kept = rng.choice(users, size=plan.max_users, replace=False)
            dropped, users = np.setdiff1d(users, kept), np.sort(kept)
        out_users = np.sort(rng.choice(users, size=int(len(users) * plan.holdout), replace=False))
        keep = ~np.isin(inter.user_ids, out_users) & ~np.isin(inter.user_ids, dropped)
        m = _canaries_for(len(users), plan)
        hist, target = canary_items(rng, len(cat), m, plan.history)
        included = rng.random(m) < 0.5
        ids, items, times = [], [], []
        for i in np.flatnonzero(included):
            seq = [*hist[i].tolist(), int(target[i]), int(target[i])]
            ids += [f"{CANARY_PREFIX}-{ch}-{i:04d}"] * len(seq)
            items += seq
            times += [CANARY_T0 + 100 * int(i) + k for k in range(len(seq))]
        event = str(inter.events[0]) if len(inter) else "view"
        c = len(ids)
        inters[ch] = Interactions(
            ch,
            np.concatenate([inter.user_ids[keep], np.array(ids, dtype=object)]).astype(str),
            np.concatenate([inter.item_index[keep], np.array(items, dtype=np.int64)]),
            np.concatenate([inter.timestamps[keep], np.array(times, dtype=np.int64)]),
            np.concatenate([inter.events[keep], np.full(c, event, dtype=object)]).astype(str),
            np.concatenate([inter.queries[keep], np.full(c, "", dtype=object)]).astype(str),
        )
        cats[ch] = cat
        secrets["channels"][ch] = {
            "canary_history": hist.tolist(),
            "canary_target": target.tolist(),
            "canary_included": included.tolist(),
            "heldout_users": out_users.tolist(),  # auditor-only file, never sent
            "dropped_users": dropped.tolist(),  # neither trained on nor scored
            "real_users": int(len(users)),
        }
    write_dataset(
        out / DATA,
        name=f"{manifest.name}-audited",
        catalogues=cats,
        interactions=inters,
        source={"audited_from": str(world_dir), "note": "fedrec audit-empirical"},
    )
    atomic_write_text(out / SECRETS / "canaries.json", json.dumps(secrets))
    return secrets


def canary_items(
    rng: np.random.Generator, n: int, m: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Histories (m, length) and targets (m,) of m canaries over a catalogue of n items.

    Items are dealt from shuffled decks, so no item is in more histories, and no item is more
    canaries' target, than ``ceil(m * length / n)`` and ``ceil(m / n)``: none at all when the
    catalogue is large enough. Two included canaries with one history and two targets cannot
    both be memorised, which weakens the non-private control; on the default world's
    250-item finance catalogue, independent draws made such pairs common. A target is never in
    its own history, and a history never repeats an item.
    """

    def deal(size: int) -> np.ndarray:
        return np.concatenate([rng.permutation(n) for _ in range(-(-size // n))])[:size]

    for _ in range(100):
        hist = deal(m * length).reshape(m, length)
        if any(len(set(h)) < length for h in hist.tolist()):
            continue  # a history spans two decks and repeats an item
        target = deal(m)
        for i in np.flatnonzero((hist == target[:, None]).any(1)):
            # swap with a canary j whose target is not in i's history and can take i's target
            for j in rng.permutation(m):
                if target[j] not in hist[i] and target[i] not in hist[j]:
                    target[i], target[j] = target[j], target[i]
                    break
        if not (hist == target[:, None]).any():
            return hist, target
    raise ValueError(
        f"cannot make {m} canaries of {length} history items over {n} catalogue items; "
        "use fewer canaries or a shorter canary history"
    )


# --- scoring ----------------------------------------------------------------------------------


def one_run_scores(
    score: Callable[[np.ndarray, np.ndarray], np.ndarray], hist: np.ndarray, target: np.ndarray
) -> np.ndarray:
    """y_i = s(t_i | h_i) − mean_{j≠i} s(t_j | h_i) − mean_{j≠i} s(t_i | h_j).

    With the first mean alone, y_i says how much the model prefers t_i to the other canaries'
    targets after h_i. The second mean removes how much the model likes t_i after any canary
    history (mostly its text-carried prior); rescoring one non-private control run on the
    default world, it raised finance's canary AUC from 0.953 to 0.978. The score reads
    only the trained model and the canary set, never an inclusion bit, so the one-run bound
    stays valid.

    ``score(hist, mask)`` returns (B, N) full-catalogue scores; ``hist`` is (m, L) items.
    """
    s = score(hist, np.ones(hist.shape, dtype=bool))[:, target].astype(np.float64)  # (m, m)
    m = len(target)
    own = np.diag(s)
    return own - (s.sum(1) - own) / max(m - 1, 1) - (s.sum(0) - own) / max(m - 1, 1)


def last_trained_item_scores(
    score: Callable[[np.ndarray, np.ndarray], np.ndarray],
    seqs: list[np.ndarray],
    max_history: int,
) -> np.ndarray:
    """−cross-entropy (whole catalogue) of ``seq[-2]`` given ``seq[:-2]``, per sequence.

    The loss-threshold attack's score (Yeom et al. 2018): higher means "member".
    """
    out = []
    for s in range(0, len(seqs), 512):
        chunk = seqs[s : s + 512]
        hist = np.zeros((len(chunk), max_history), dtype=np.int64)
        mask = np.zeros_like(hist, dtype=bool)
        for i, q in enumerate(chunk):
            h = q[:-2][-max_history:]
            hist[i, max_history - len(h) :] = h
            mask[i, max_history - len(h) :] = True
        logits = score(hist, mask).astype(np.float64)  # (B, N)
        tgt = np.array([q[-2] for q in chunk])
        mx = logits.max(1)
        lse = mx + np.log(np.exp(logits - mx[:, None]).sum(1))
        out.append(logits[np.arange(len(chunk)), tgt] - lse)
    return np.concatenate(out) if out else np.zeros(0)


def canary_cosines(delta: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """cos(Δ, u_j) for unit directions ``u_j``: (P,), (K, P) -> (K,).

    Gradient canaries push the weights along −u_j, so pass Δ = initial − final weights.
    """
    norm = float(np.linalg.norm(delta))
    return directions @ delta / norm if norm > 0 else np.zeros(len(directions))


def one_run_guesses(m: int) -> tuple[list[int], list[int]]:
    """Pre-registered (k₊, k₋): (k, 0) and (k, k) for k in GUESS_KS with 2k ≤ m."""
    ks = [k for k in GUESS_KS if 2 * k <= m] or [max(m // 2, 1)]
    return [k for k in ks for _ in (0, 1)], [kn for k in ks for kn in (0, k)]


# --- reading a finished run -------------------------------------------------------------------


def _final_model(run_dir: Path, matrices: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(config, initial model, final model) of a finished run."""
    import torch
    from safetensors.numpy import load_file

    from fedrec.shared.config import from_run_config
    from fedrec.shared.model import build_model

    cfg = from_run_config(json.loads((run_dir / "config.json").read_text())["run_config"])
    dim = next(iter(matrices.values())).matrix.shape[1]
    initial = build_model(cfg, dim)
    final = build_model(cfg, dim)
    ckpts = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}: no checkpoint; the run trained nothing")
    state = {k: torch.from_numpy(v) for k, v in load_file(ckpts[-1]).items()}
    final.load_state_dict(state, strict=True)
    return cfg, initial, final


def _flat(model: Any) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


def score_run(
    run_dir: Path, secrets: dict[str, Any], world_dir: Path, matrices: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Every audit statistic's inputs for one finished run, per channel."""
    import torch

    from fedrec.client.node import NODES
    from fedrec.client.training import canary_directions, model_scorer
    from fedrec.shared.data import to_sequences
    from fedrec.shared.datasets import load_channel
    from fedrec.shared.model import with_prior
    from fedrec.shared.prior import released_prior

    cfg, initial_all, final_all = _final_model(run_dir, matrices)
    out: dict[str, dict[str, Any]] = {}
    for ch, sec in secrets["channels"].items():
        # what this channel trained: the shared tower and its head (canaries live there)
        initial, final = initial_all.channel_model(ch), final_all.channel_model(ch)
        # the canaries are added to gradients, so the model moves along -u_j: use initial − final
        delta = _flat(initial) - _flat(final)
        shapes = [tuple(p.shape) for p in final.parameters()]
        items = torch.from_numpy(np.array(matrices[ch].matrix, dtype=np.float32))  # writable copy
        if final.spec.item_prior:  # the prior the channel's node released and trained with
            prior = released_prior([run_dir / NODES / ch])
            if prior is None:
                raise FileNotFoundError(f"{run_dir / NODES / ch}: no item prior kept")
            items = with_prior(items, prior)
        score = model_scorer(final, items)
        res: dict[str, Any] = {
            "one_run_scores": one_run_scores(
                score, np.asarray(sec["canary_history"]), np.asarray(sec["canary_target"])
            ).tolist(),
            "included": list(sec["canary_included"]),
        }
        seqs = to_sequences(load_channel(world_dir, ch)[1])
        heldout = set(sec["heldout_users"])
        dropped = set(sec.get("dropped_users", []))
        rows: dict[bool, list[np.ndarray]] = {True: [], False: []}
        for u, s, e in zip(seqs.users, seqs.offsets[:-1], seqs.offsets[1:], strict=True):
            if e - s >= 3 and str(u) not in dropped:
                rows[str(u) not in heldout].append(seqs.item_index[s:e])
        rng = np.random.default_rng([secrets["plan"]["seed"], zlib.crc32(ch.encode())])
        for member, name in ((True, "mia_in"), (False, "mia_out")):
            group = rows[member]
            if len(group) > MIA_MAX_USERS:
                group = [group[i] for i in rng.choice(len(group), MIA_MAX_USERS, replace=False)]
            res[name] = last_trained_item_scores(score, group, cfg.model.max_history).tolist()
        k = cfg.audit.canaries
        if k >= 4:
            cos = canary_cosines(delta, canary_directions(shapes, k, cfg.audit.seed, ch))
            res["cos_in"], res["cos_out"] = cos[: k // 2].tolist(), cos[k // 2 :].tolist()
        out[ch] = res
    return out


# --- runs ---------------------------------------------------------------------------------------


RUNS = {
    # name: (run-config overrides, role)
    "dp": ({"dp.enabled": True}, "dp"),
    "control": ({"dp.enabled": False}, "control"),
    "noise-off": ({"dp.enabled": True, "audit.disable-noise": True}, "fault-injection"),
}


def _run(
    name: str,
    base: dict[str, Any],
    out: Path,
    channels: list[str],
    console: Any,
    control_steps_factor: int = 1,
) -> tuple[Path, float]:
    from fedrec.shared.config import TrainConfig
    from fedrec.simulations.flower import run_simulation

    overrides, _ = RUNS[name]
    run_dir = out / "runs" / name
    if run_dir.exists():  # an unfinished attempt: its logs would chain onto the new run's
        shutil.rmtree(run_dir)
    cfg = {**base, **overrides, "run-dir": str(run_dir)}
    if not cfg["dp.enabled"]:
        cfg["audit.canaries"] = 0
        steps = int(cfg.get("train.local-steps", TrainConfig().local_steps))
        cfg["train.local-steps"] = steps * control_steps_factor
    t = time.perf_counter()

    def show(line: str) -> None:
        if "[fedrec]" in line:
            console.print(f"  [{name}] " + line.split("[fedrec]", 1)[1].strip(), markup=False)

    run_simulation(
        run_dir, cfg, num_nodes=len(channels), on_line=show, node_policy=auditor_policy(cfg)
    )
    return run_dir, time.perf_counter() - t


def auditor_policy(run_config: dict[str, Any]) -> NodePolicy:
    """The policy of the audit's own simulated nodes: they accept the audit's switches (the
    canaries, and noise off for the fault-injection run), its ε and no-DP control. These are
    the auditor's nodes on a copy of the data, never a platform's."""
    return NodePolicy(
        dp_required=bool(run_config["dp.enabled"]),
        lifetime_epsilon=max(
            NodePolicy().lifetime_epsilon, float(run_config.get("dp.target-epsilon", 0.0))
        ),
        max_delta=max(NodePolicy().max_delta, float(run_config.get("dp.target-delta", 0.0))),
        min_noise_multiplier=0.0,
        allow_canaries=True,
        allow_noise_off=bool(run_config.get("audit.disable-noise", False)),
        source="fedrec audit --empirical: the auditor's own simulated nodes",
    )


def _specs(
    scores: dict[str, dict[str, dict[str, Any]]], delta: float, claims: dict[str, float]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(main report specs, fault-injection report specs)."""
    main: dict[str, dict[str, Any]] = {}
    fault: dict[str, dict[str, Any]] = {}
    labels = {
        "dp": "",
        "control": " control (no DP, Adam)",
        "noise-off": " noise off (FAULT INJECTION)",
    }
    for run, per_ch in scores.items():
        control = run != "dp"
        for ch, r in per_ch.items():
            common = {"channel": ch, "delta": delta, "control": control}
            if run == "dp":
                common["epsilon_theory"] = claims[ch]
            kp, kn = one_run_guesses(len(r["included"]))
            main[f"black-box one-run [{ch}]{labels[run]}"] = {
                "method": "one-run",
                "scores": r["one_run_scores"],
                "included": r["included"],
                "k_pos": kp,
                "k_neg": kn,
                **common,
            }
            if "cos_in" in r:
                spec = {"method": "canary-cosine", "cos_in": r["cos_in"], "cos_out": r["cos_out"]}
                main[f"white-box canaries [{ch}]{labels[run]}"] = {**spec, **common}
                if run == "noise-off":  # audited as the claim it makes: planned ε
                    fault[f"white-box canaries [{ch}] noise off"] = {
                        **spec,
                        "channel": ch,
                        "delta": delta,
                        "epsilon_theory": claims[ch],
                    }
            main[f"MIA loss [{ch}]{labels[run]}"] = {
                "method": "mia",
                "scores_in": r["mia_in"],
                "scores_out": r["mia_out"],
                **common,
            }
    return main, fault


def run_empirical_audit(
    out: Path,
    *,
    world_dir: Path,
    epsilon: float = 8.0,
    seed: int = 0,
    plan: AuditPlan | None = None,
    runs: tuple[str, ...] = ("dp", "control", "noise-off"),
    overrides: dict[str, Any] | None = None,
    console: Any = None,
    reuse: bool = False,
    channels: list[str] | None = None,
    control_steps_factor: int = 1,
) -> dict[str, Any]:
    """Build the audited dataset, run ``runs`` in the Simulation Engine, score, report.

    Returns:
        The summary (also ``out/summary.json``): per channel and run the claimed ε, the
        one-run ε_LB and its ceiling, the white-box ε estimate, MIA AUC / TPR, durations,
        the report's ``ok``, and, for the noise-off run, whether it was caught (estimate
        ≥ 2 × claim on every channel). With ``reuse``, finished runs and the audited
        dataset already in ``out`` are scored again instead of re-run. ``channels`` restricts
        the federation to some of the dataset's channels (default: all).
        ``control_steps_factor`` multiplies the non-private control's local steps: at the
        pipeline's default sizes each canary is drawn only about q·T ≈ 5 times, too few for
        Adam to memorise it, so a longer control is what shows the scoring has power.
    """
    from rich.console import Console

    from fedrec.server.app import encode_catalogues
    from fedrec.shared.datasets import load_manifest

    from . import stats
    from .report import build_report, write_report

    console = console or Console()
    plan = plan or AuditPlan(seed=seed)
    out = out.resolve()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    secrets_path = out / SECRETS / "canaries.json"
    if reuse and secrets_path.exists():
        secrets = json.loads(secrets_path.read_text(encoding="utf-8"))
    else:
        secrets = build_audited_dataset(world_dir, out, plan)
    channels = list(channels or load_manifest(out / DATA).channels)
    base: dict[str, Any] = {
        "data-dir": str(out / DATA),
        "channels": ",".join(channels),
        "min-nodes": len(channels),
        "seed": seed,
        "dp.target-epsilon": float(epsilon),
        "audit.canaries": plan.grad_canaries,
        "audit.seed": seed,
        **(overrides or {}),
    }
    timings["dataset"] = time.perf_counter() - t0
    run_dirs: dict[str, Path] = {}
    for name in runs:
        if reuse and (out / "runs" / name / "results.json").exists():
            run_dirs[name] = out / "runs" / name
            continue
        console.print(f"[bold]audit run {name}[/] ({RUNS[name][1]}), seed {seed}")
        run_dirs[name], timings[f"run {name}"] = _run(
            name, base, out, channels, console, control_steps_factor
        )
    t = time.perf_counter()
    cfg0 = json.loads((run_dirs[runs[0]] / "config.json").read_text())["run_config"]
    matrices = encode_catalogues(
        str(out / DATA), tuple(channels), cfg0.get("cache-dir", ""), cfg0.get("encoder-dir", "")
    )
    secrets = {**secrets, "channels": {ch: secrets["channels"][ch] for ch in channels}}
    scores = {name: score_run(d, secrets, world_dir, matrices) for name, d in run_dirs.items()}
    timings["scoring"] = time.perf_counter() - t
    delta = float(cfg0.get("dp.target-delta", 1e-5))
    claims = _claims(run_dirs.get("dp") or run_dirs.get("noise-off"), channels)
    main, fault = _specs(scores, delta, claims)
    report_dir = run_dirs.get("dp") or run_dirs[runs[0]]
    report = build_report(report_dir, main)
    paths = write_report(report, out / "audit")
    fault_report = None
    if fault:
        fault_report = build_report(run_dirs["noise-off"], fault)
        write_report(fault_report, out / "audit-noise-off")
    summary = _summary(report, claims, seed, timings, time.perf_counter() - t0)
    summary["report"] = {k: str(v) for k, v in paths.items()}
    summary["ok"] = bool(report["ok"])
    if fault:
        ests = {
            spec["channel"]: stats.epsilon_from_canary_cosines(
                spec["cos_in"], spec["cos_out"], delta
            )
            for spec in fault.values()
        }
        summary["fault_injection"] = {
            "estimates": ests,
            "claims": claims,
            "caught": all(ests[ch] >= 2 * claims[ch] for ch in ests),
        }
    atomic_write_text(out / "summary.json", json.dumps(_finite(summary), indent=2))
    return summary


def _claims(run_dir: Path | None, channels: list[str]) -> dict[str, float]:
    """Claimed ε per channel: what the run's results report (the accountant's ε)."""
    if run_dir is None:
        return dict.fromkeys(channels, math.inf)
    res = json.loads((run_dir / "results.json").read_text())["channels"]
    # ε ∞ is null in strict results.json (older ones wrote a bare Infinity); absent: no claim
    eps = {ch: res[ch]["privacy"].get("epsilon") for ch in channels}
    return {ch: math.inf if e is None else float(e) for ch, e in eps.items()}


def _summary(
    report: dict[str, Any],
    claims: dict[str, float],
    seed: int,
    timings: dict[str, float],
    total: float,
) -> dict[str, Any]:
    rows = []
    for name, r in (report.get("empirical") or {}).items():
        run = "noise-off" if "noise off" in name else ("control" if "control" in name else "dp")
        rows.append(
            {
                "name": name,
                "audit": name.split(" [", 1)[0],
                "run": run,
                "method": r.get("method"),
                "channel": r.get("channel"),
                "control": r.get("control"),
                "epsilon_theory": claims.get(r.get("channel")),
                "epsilon_empirical": r.get("epsilon_lb"),
                "ceiling": r.get("ceiling"),
                "auc": r.get("auc"),
                "tpr_at_1pct_fpr": r.get("tpr_at_1pct_fpr"),
                "status": r.get("status"),
                "line": r.get("line"),
            }
        )
    return {"seed": seed, "rows": rows, "timings_s": timings, "total_s": total}


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj

"""The audit report: read a run directory, run every check, write ``audit.{json,md,html}``.

Owns: reading the run directory tolerantly (a crashed run or a deployment run lacks files; what
is missing is reported, nothing crashes), running the checks (:mod:`.accounting`,
:mod:`.egress`, the cross-checks between files of :mod:`.evidence`, the nodes' policies, ledgers
and refusals of :mod:`.nodes`, the empirical statistics of :mod:`.stats`, the verdicts of
:mod:`.verdicts`), the privacy statement, the plots (matplotlib, Agg, no pyplot), the report as
a :class:`~.document.Document` and the atomic writing of the outputs.

The privacy statement has the fields a DP training report needs (after TF-Privacy's
``compute_dp_sgd_privacy_statement`` and Ponomareva et al., "How to DP-fy ML", 2023): the
setting and trust model, what holds against the server under the nodes' policy (:mod:`.trust`),
the guarantee claimed (the worst-case ε, lost rounds counted as spent, next to the ε on record),
the privacy unit and adjacency, users on several platforms, what is and is not protected, the
mechanism, the sampling, the accounting, the budget policy; the report adds the nodes (policy,
noise source, evaluations, ledger; every refusal and reset), the empirical audits, the utility
and the library versions.

Must not: import ``server/`` or ``client/``; write anything inside the run directory except the
chosen output folder; put per-example values of real users in the report (membership scores are
reduced to histograms and ROC points).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared import hashlog, wire
from fedrec.shared.errors import FedrecError
from fedrec.shared.fsio import atomic_write_bytes, atomic_write_text, out_dir_problem
from fedrec.shared.policy import NodePolicy

from . import accounting, egress, evidence, nodes, stats, verdicts
from .document import (
    Block,
    BulletList,
    Document,
    Image,
    KeyValues,
    Paragraph,
    Section,
    Table,
    VerdictList,
    VerdictRow,
    fmt,
    num,
    render_html,
    render_markdown,
)
from .verdicts import FAIL, WARN

SCHEMA = "fedrec-audit/1"
CONFIG, MODEL, METRICS, RESULTS = "config.json", "model.json", "metrics.jsonl", "results.json"
HEADS = "heads.json"  # the server's record of the logs' heads after its newest checkpoint
CHECKPOINTS = "checkpoints"
INCOMPLETE = "INCOMPLETE"  # the server's marker: the run started and wrote no results.json yet
ROC_POINTS = 400  # ROC curves in the report are thinned to about this many points
HIST_BINS = 30
MAX_DETAILS = 200  # the report's "Details" list stops after this many lines


# --- reading --------------------------------------------------------------------------------


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path.name}: unreadable ({exc})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name}: must hold a JSON object. Found {type(data).__name__}.")
        return None
    return data


def _read_jsonl(path: Path, name: str, problems: list[str]) -> list[dict[str, Any]]:
    """Entries of a JSON Lines file, each with ``_line`` (its line number); bad lines reported."""
    if not path.exists():
        return []
    out: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as exc:
                    problems.append(f"{name}:{lineno}: not JSON ({exc.msg})")
                    continue
                if not isinstance(entry, dict):
                    problems.append(f"{name}:{lineno}: not a JSON object")
                    continue
                out.append({**entry, "_line": lineno})
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{name}: unreadable ({exc})")
    return out


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items() if k != "_line"}
    if isinstance(obj, list | tuple | set | frozenset):
        items = sorted(obj, key=str) if isinstance(obj, set | frozenset) else obj
        return [_jsonable(v) for v in items]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


# --- empirical audits -------------------------------------------------------------------------


def _thin_roc(fpr: np.ndarray, tpr: np.ndarray) -> dict[str, list[float]]:
    """At most about ROC_POINTS points: evenly spaced, plus log-spaced in FPR for log-log plots
    (at each chosen FPR the highest TPR, so the thinned curve is not below the full one)."""
    if fpr.size > ROC_POINTS:
        even = np.linspace(0, fpr.size - 1, ROC_POINTS // 2).astype(int)
        low = float(fpr[fpr > 0].min()) if (fpr > 0).any() else 1.0
        at = np.geomspace(low, 1.0, ROC_POINTS // 2)
        logs = (np.searchsorted(fpr, at, side="right") - 1).clip(0, fpr.size - 1)
        keep = np.unique(np.concatenate([even, logs]))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def _histogram(a: np.ndarray, b: np.ndarray) -> dict[str, list[float]]:
    edges = np.histogram_bin_edges(np.concatenate([a, b]), bins=HIST_BINS)
    return {
        "edges": edges.tolist(),
        "in": np.histogram(a, edges)[0].tolist(),
        "out": np.histogram(b, edges)[0].tolist(),
    }


def _statistic(
    name: str, spec: Mapping[str, Any], delta: float
) -> tuple[dict[str, Any], bool, np.ndarray, np.ndarray]:
    """One audit's statistic: ``(results, whether its ε is a bound, scores in, scores out)``."""
    method = spec.get("method")
    if method == "one-run":
        inc = np.asarray(spec["included"], dtype=bool)
        scores = np.asarray(spec["scores"], dtype=float)
        res = stats.one_run_audit(
            scores, inc, spec["k_pos"], spec["k_neg"], delta, float(spec.get("p", 0.05))
        )
        return res, True, scores[inc], scores[~inc]
    if method == "mia":
        a = np.asarray(spec["scores_in"], dtype=float)
        b = np.asarray(spec["scores_out"], dtype=float)
        res = stats.mia_audit(
            a,
            b,
            delta,
            fprs=tuple(spec.get("fprs", (0.01, 0.001))),
            confidence=float(spec.get("confidence", 0.95)),
        )
        for row in res["at"]:
            row.pop("threshold")  # a real user's score: stays out of the report
        return res, True, a, b
    if method == "canary-cosine":
        a = np.asarray(spec["cos_in"], dtype=float)
        b = np.asarray(spec["cos_out"], dtype=float)
        res = stats.canary_cosine_audit(a, b, delta)
        return {**res, "epsilon_lb": res["epsilon"]}, False, a, b
    raise ValueError(
        f"empirical[{name!r}]: method must be one-run, mia or canary-cosine. Found {method!r}."
    )


def _run_empirical(name: str, spec: Mapping[str, Any], acc: Mapping[str, Any]) -> dict[str, Any]:
    """One empirical audit: its statistic, the claim it is compared with, and the verdict."""
    delta = float(spec.get("delta", acc.get("delta") or 1e-5))
    channel = spec.get("channel")
    claim = num(spec.get("epsilon_theory"))
    if claim is None and channel is not None:
        claim = num(acc.get("channels", {}).get(channel, {}).get("epsilon"))
    out: dict[str, Any] = {
        "name": name,
        "method": spec.get("method"),
        "channel": channel,
        "delta": delta,
        "control": bool(spec.get("control", False)),
        "epsilon_theory": claim,
    }
    res, bound, a, b = _statistic(name, spec, delta)
    out.update(res)
    out["kind"] = "bound" if bound else "estimate"
    if a.size and b.size:
        out["auc"] = stats.auc(a, b)
        out["tpr_at_1pct_fpr"] = stats.tpr_at_fpr(a, b, 0.01)
        out["tpr_at_0.1pct_fpr"] = stats.tpr_at_fpr(a, b, 0.001)
        fpr, tpr, _ = stats.roc_curve(a, b)
        out["roc"] = _thin_roc(fpr, tpr)
        out["histogram"] = _histogram(a, b)
    out["status"], out["line"] = verdicts.check_empirical_claim(
        name, bound=bound, control=out["control"], epsilon=float(out["epsilon_lb"]), claim=claim
    )
    return out


# --- building ---------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("opacus", "dp-accounting", "numpy", "scipy", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _utility(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Last evaluation metrics per channel and the largest bucketed training count."""
    out: dict[str, Any] = {}
    for e in metrics:
        ch, values = e.get("channel"), e.get("metrics")
        if not isinstance(ch, str) or not isinstance(values, Mapping):
            continue
        if e.get("phase") not in ("evaluate", "train"):  # e.g. the server's "timing" lines
            continue
        slot = out.setdefault(ch, {"round": None, "evaluate": {}, "num_examples_train": None})
        if e.get("phase") == "evaluate":
            slot["round"], slot["evaluate"] = e.get("round"), dict(values)
        elif e.get("phase") == "train" and isinstance(values.get(wire.NUM_EXAMPLES), int | float):
            prev = slot["num_examples_train"] or 0
            slot["num_examples_train"] = max(prev, values[wire.NUM_EXAMPLES])
    return out


def _channels(config: Mapping[str, Any], run_config: Mapping[str, Any]) -> list[str]:
    """The configured channels: ``config.json``'s list, else the run config's comma list."""
    channels = [c for c in config.get("channels", []) if isinstance(c, str)]
    if not channels and isinstance(run_config.get("channels"), str):
        channels = [c.strip() for c in run_config["channels"].split(",") if c.strip()]
    return channels


def _node_ledgers(run_dir: Path, read_problems: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each client's own ledger under ``nodes/<channel>/``, where there is one."""
    out: dict[str, list[dict[str, Any]]] = {}
    for sub in sorted((run_dir / egress.NODES).iterdir()):
        if (sub / egress.LEDGER).exists():
            name = f"{egress.NODES}/{sub.name}/{egress.LEDGER}"
            out[sub.name] = _read_jsonl(sub / egress.LEDGER, name, read_problems)
    return out


def _run_empirical_all(
    empirical: Mapping[str, Mapping[str, Any]], acc: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Every empirical audit; one that cannot run (a malformed spec) is a warning, not a crash."""
    emp: dict[str, dict[str, Any]] = {}
    for name, spec in empirical.items():
        try:
            emp[name] = _run_empirical(name, spec, acc)
        except (KeyError, TypeError, ValueError) as exc:
            emp[name] = {
                "name": name,
                "method": spec.get("method") if isinstance(spec, Mapping) else None,
                "kind": "error",
                "status": WARN,
                "line": f"{name}: could not run ({type(exc).__name__}: {exc})",
            }
    return emp


def _signature(
    run_dir: Path,
    results: Any,
    key: bytes | None,
    checkpoints: Sequence[str],
    read_problems: list[str],
) -> str | None:
    """The state of the signed log heads (:func:`verdicts.check_signature`): results.json's
    for a finished run; else heads.json's (recorded at the start and before each checkpoint),
    which the logs must extend and no checkpoint may be newer than."""
    if isinstance(results, dict) and isinstance(results.get("log_heads"), dict):
        heads, signed, round_ = results["log_heads"], results.get("log_heads_signed"), None
    elif (run_dir / HEADS).exists():
        doc = _read_json(run_dir / HEADS, read_problems)
        doc = doc if isinstance(doc, dict) else {}
        heads, signed, round_ = doc.get("log_heads"), doc.get("log_heads_signed"), doc.get("round")
    else:
        heads, signed, round_ = None, None, None
    if key is None:
        return verdicts.SIGNATURE_UNCHECKED if signed is not None else None
    if not isinstance(signed, dict) or not isinstance(heads, dict):
        return verdicts.SIGNATURE_ABSENT
    body = heads if round_ is None else {**heads, "round": str(round_)}
    newest = max((int(c[6:10]) for c in checkpoints if c[6:10].isdigit()), default=0)
    valid = (
        hashlog.check_signed_heads(key, body, signed)
        and all(
            hashlog.contains(run_dir / name, str(heads.get(name)))
            for name in (egress.LEDGER, egress.EGRESS)
        )
        and (round_ is None or (isinstance(round_, int) and newest <= round_))
    )
    return verdicts.SIGNATURE_VALID if valid else verdicts.SIGNATURE_INVALID


def build_report(
    run_dir: Path | str,
    empirical: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    pld_interval: float = accounting.PLD_INTERVAL,
    key: bytes | None = None,
    node_policies: Sequence[NodePolicy] = (),
) -> dict[str, Any]:
    """Audit a run directory; return the report as a JSON-able dict.

    ``key``: the operator's run key (``FEDREC_RUN_KEY`` when the run was written); with it
    the log heads' HMAC in results.json is checked (:func:`verdicts.check_signature`).
    ``node_policies``: the platforms' policy files, matched by digest to what the nodes
    reported (a simulation's ``node-policy.toml`` is read without being given).

    Args:
        run_dir: the run directory (see the server's run writer for its layout).
        empirical: optional empirical audits, name → spec. Every spec has ``method`` (one of
            ``"one-run"``, ``"mia"``, ``"canary-cosine"``) and optionally ``channel`` (compare
            with that channel's ε), ``epsilon_theory`` (an explicit claim), ``delta`` (default:
            the run's), ``control`` (true for a non-private control run, expected to show
            power). Per method: ``one-run``: ``scores``, ``included`` (bools), ``k_pos``,
            ``k_neg`` (paired pre-registered guesses), ``p`` (0.05); ``mia``: ``scores_in``,
            ``scores_out``, ``fprs`` ([0.01, 0.001]), ``confidence`` (0.95); ``canary-cosine``:
            ``cos_in``, ``cos_out``.
        pld_interval: ``value_discretization_interval`` of the PLD cross-check (default 1e-4;
            coarser is faster and still an upper bound).

    Returns:
        ``{"schema", "ok", "verdicts", "run", "files", "logs", "evidence", "accounting",
        "egress", "nodes", "statement", "utility", "empirical", "read_problems"}``, strict JSON:
        non-finite numbers are the strings "inf", "-inf" and "nan" (never bare
        ``Infinity``/``NaN``; an ε of ∞ is "inf").
    """
    run_dir = Path(run_dir)
    read_problems: list[str] = []
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    config = _read_json(run_dir / CONFIG, read_problems) or {}
    model = _read_json(run_dir / MODEL, read_problems) or {}
    results = _read_json(run_dir / RESULTS, read_problems)
    found_config = config.get("run_config")
    run_config: dict[str, Any] = found_config if isinstance(found_config, dict) else {}
    channels = _channels(config, run_config)

    expected = [CONFIG, MODEL, METRICS, egress.LEDGER, egress.EGRESS, RESULTS, CHECKPOINTS]
    present = [f for f in expected if (run_dir / f).exists()]
    missing = [f for f in expected if f not in present]
    nodes_present = (run_dir / egress.NODES).is_dir()

    # Logs
    log_heads = results.get("log_heads") if isinstance(results, dict) else None
    # Without DP a client keeps no ledger: then only the node ledgers found are verified.
    dp_on = run_config.get("dp.enabled", True) is not False
    logs = egress.verify_logs(
        run_dir,
        log_heads if isinstance(log_heads, dict) else None,
        channels=channels if dp_on else (),
    )
    ledger = _read_jsonl(run_dir / egress.LEDGER, egress.LEDGER, read_problems)
    replies = _read_jsonl(run_dir / egress.EGRESS, egress.EGRESS, read_problems)
    node_ledgers = _node_ledgers(run_dir, read_problems) if nodes_present else {}
    metrics = _read_jsonl(run_dir / METRICS, METRICS, read_problems)

    # The nodes' policies and ledgers, then accounting and egress
    node_report = nodes.audit_nodes(
        run_dir,
        run_config=run_config,
        channels=channels,
        ledger=ledger,
        replies=replies,
        node_ledgers=node_ledgers,
        given=node_policies,
    )
    acc = accounting.audit_accounting(
        ledger,
        run_config,
        channels=channels,
        node_ledgers=node_ledgers or None,
        pld_interval=pld_interval,
        policy_floor=_policy_floor(node_report),
    )
    shapes = model.get("param_shapes")
    eg = egress.audit_egress(replies, shapes if isinstance(shapes, dict) else None)

    checkpoints = (
        sorted(p.name for p in (run_dir / CHECKPOINTS).iterdir())
        if (run_dir / CHECKPOINTS).is_dir()
        else []
    )
    ev = evidence.cross_check(
        ledger, results=results, checkpoints=checkpoints, metrics=metrics, replies=replies
    )
    if (run_dir / RESULTS).exists():
        has_heads = isinstance(log_heads, dict) and all(
            isinstance(log_heads.get(n), str) for n in (egress.LEDGER, egress.EGRESS)
        )
        results_state = verdicts.RESULTS_PRESENT if has_heads else verdicts.RESULTS_NO_HEADS
    elif (run_dir / INCOMPLETE).exists():
        results_state = verdicts.RESULTS_INCOMPLETE
    else:
        results_state = verdicts.RESULTS_MISSING

    signature = _signature(run_dir, results, key, checkpoints, read_problems)

    emp = _run_empirical_all(empirical, acc) if empirical else None
    found = verdicts.all_verdicts(
        fault_injected=bool(run_config.get("audit.disable-noise", False)),
        logs=logs,
        acc=acc,
        eg=eg,
        emp=emp,
        missing=missing,
        read_problems=read_problems,
        ledger_present=(run_dir / egress.LEDGER).exists(),
        egress_present=(run_dir / egress.EGRESS).exists(),
        shapes_known=isinstance(shapes, dict),
        results=results_state,
        evidence=ev,
        signature=signature,
        nodes=node_report,
        trained=any(e.get(accounting.STATUS) in accounting.SPENT for e in ledger),
    )
    report = {
        "schema": SCHEMA,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "ok": all(v.status != FAIL for v in found),
        "verdicts": [v.as_dict() for v in found],
        "run": {
            "fedrec_version": config.get("fedrec_version"),
            "scenario": config.get("scenario"),
            "started": config.get("started"),
            "channels": channels,
            "num_server_rounds": run_config.get("num-server-rounds"),
            "rounds_completed": (results or {}).get("rounds_completed"),
            "incomplete": results_state == verdicts.RESULTS_INCOMPLETE,
            "wall_seconds": (results or {}).get("wall_seconds"),
            "num_parameters": model.get("num_parameters"),
            "checkpoints": checkpoints,
            "run_config": run_config,
        },
        "files": {
            "present": present,
            "missing": missing,
            "nodes": sorted(node_ledgers) if nodes_present else None,
        },
        "logs": logs,
        "evidence": ev,
        "accounting": acc,
        "egress": eg,
        "nodes": node_report,
        "statement": _statement(config, run_config, acc, node_report),
        "utility": _utility(metrics),
        "empirical": emp,
        "read_problems": read_problems,
    }
    return _jsonable(report)


def _policy_floor(node_report: Mapping[str, Any]) -> tuple[float, float] | None:
    """The weakest ``(min-noise-multiplier, max-sample-rate)`` of the known node policies."""
    known = [p["policy"] for p in node_report["policies"].values()]
    if not known:
        return None
    return (
        min(float(p["min-noise-multiplier"]) for p in known),
        max(float(p["max-sample-rate"]) for p in known),
    )


def _loss_sent(node_report: Mapping[str, Any]) -> bool | None:
    """Whether some node's policy sends the loss; None when a node's policy is not known."""
    if not all(n["policy_known"] for n in node_report["nodes"].values()):
        return None
    return any(p["policy"]["send-loss"] for p in node_report["policies"].values())


def _guarantee(acc: Mapping[str, Any]) -> str:
    """The claim: the worst case (lost rounds counted as spent), with the ε on record."""
    per = acc["channels"]
    if not per:
        return "No channel trained: nothing was spent on record."
    worst = max(per, key=lambda c: num(per[c]["epsilon_worst_case"]) or -1.0)
    lost = sorted(r for c in per.values() for r in c["worst_case"]["lost_rounds"])
    on_record = max((num(c["epsilon"]) or 0.0) for c in per.values())
    counted = (
        f"{len(lost)} lost round(s) (no reply, or an error that may have followed training) "
        "counted as spent"
        if lost
        else "no round was lost"
    )
    return (
        f"ε ≤ {fmt(per[worst]['epsilon_worst_case'])} per user of one platform at "
        f"δ = {acc['delta']:g} ({acc['accountant'].upper()}; worst channel {worst}), the worst "
        f"case: {counted}; on record the largest ε is {fmt(on_record)}."
    )


def _statement(
    config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    acc: Mapping[str, Any],
    node_report: Mapping[str, Any],
) -> dict[str, Any]:
    """The privacy statement, field by field (see the module docstring)."""
    per = acc["channels"]
    comp = acc.get("composed") or {}
    wc = comp.get("epsilon_worst_case", comp.get("epsilon"))
    return {
        "setting_and_trust_model": accounting.TRUST_MODEL,
        "guarantee": _guarantee(acc),
        "against_the_server": node_report["statements"],
        "privacy_unit": accounting.PRIVACY_UNIT,
        "adjacency": accounting.ADJACENCY,
        "users_on_several_platforms": (
            "Protected by each platform's guarantee separately; a person who is a user on every "
            f"platform has, in the worst case, ε = {fmt(wc)} ({acc['accountant'].upper()}, "
            f"lost rounds counted as spent; on record {fmt(comp.get('epsilon'))}, PLD "
            f"{fmt(comp.get('epsilon_pld'))}) at δ = {acc['delta']:g}, all channels composed; "
            f"the naive sum of the on-record ε {fmt(comp.get('naive_sum'))} holds at "
            f"δ = {comp.get('naive_sum_delta', 0):g}."
        ),
        "protected": accounting.PROTECTED,
        "not_protected": accounting.not_protected(
            run_config, per, loss_sent=_loss_sent(node_report)
        ),
        "mechanism": {
            "algorithm": "DP-SGD (Abadi et al. 2016) with Opacus, one example per user",
            "clipping": "flat per-user clipping to max_grad_norm C",
            "max_grad_norm": run_config.get("dp.max-grad-norm"),
            "noise_multiplier": {c: r["noise_multipliers"] for c, r in per.items()},
            "grad_sample_mode": run_config.get("dp.grad-sample-mode"),
            "optimizer": run_config.get("train.optimizer"),
            "secure_mode": "not claimed (Opacus secure_mode not used)",
        },
        "sampling": {
            "method": "Poisson sampling of users at rate q (Opacus DPDataLoader)",
            "sample_rate": {c: r["sample_rates"] for c, r in per.items()},
            "steps_per_round": {c: r["steps_per_round"] for c, r in per.items()},
            "rounds_trained": {c: r["rounds_trained"] for c, r in per.items()},
            "total_steps": {c: r["total_steps"] for c, r in per.items()},
            "batch_size": run_config.get("train.batch-size"),
            "planned_rounds": run_config.get("num-server-rounds"),
        },
        "accounting": {
            "accountant": acc["accountant"],
            "cross_check": acc["cross_check"],
            "delta": acc["delta"],
            "epsilon": {c: r["epsilon"] for c, r in per.items()},
            "epsilon_worst_case": {c: r["epsilon_worst_case"] for c, r in per.items()},
            "lost_rounds": {c: r["worst_case"]["lost_rounds"] for c, r in per.items()},
            "epsilon_pld": {c: r["epsilon_pld"] for c, r in per.items()},
            "history": {c: r["history"] for c, r in per.items()},
        },
        "budget_policy": {
            "target_epsilon": acc["target_epsilon"],
            "noise_multiplier_setting": run_config.get("dp.noise-multiplier"),
            "guard": (
                "Before each round a client checks whether training would take ε above the "
                "target; if so it refuses (fail closed) and the server records the refusal."
            ),
            "refused_rounds": {c: r["rounds_refused"] for c, r in per.items()},
        },
        "versions": {"run": config.get("versions", {}), "audit": _versions()},
    }


# --- plots ------------------------------------------------------------------------------------


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # Fixed margins rather than bbox_inches="tight", which renders every figure twice.
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def plot_epsilon(report: Mapping[str, Any]) -> bytes | None:
    """ε per round per channel (run accountant), ledger values as markers, target dashed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    per = report["accounting"]["channels"]
    if not per:
        return None
    fig = Figure(figsize=(6.4, 3.6))
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.14, top=0.9)
    ax = fig.add_subplot()
    for ch, r in per.items():
        pts = [(c["round"], num(c["epsilon_recomputed"])) for c in r["curve"]]
        pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
        if pts:
            (line,) = ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=ch)
            bad = [
                (c["round"], y)
                for c in r["curve"]
                if c["status"] != accounting.TRAINED
                and (y := num(c["epsilon_recomputed"])) is not None
                and math.isfinite(y)
            ]
            if bad:
                ax.plot(*zip(*bad, strict=True), "x", color=line.get_color(), ms=8)
            logged = [
                (c["round"], y)
                for c in r["curve"]
                if (y := num(c["epsilon_ledger"])) is not None and math.isfinite(y)
            ]
            if logged:
                ax.plot(*zip(*logged, strict=True), "o", mfc="none", color=line.get_color(), ms=7)
    target = num(report["accounting"]["target_epsilon"])
    if target is not None and math.isfinite(target):
        ax.axhline(target, ls="--", color="k", lw=1, label=f"target ε = {target:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(
        f"ε ({report['accounting']['accountant'].upper()}, δ = {report['accounting']['delta']:g})"
    )
    ax.set_title("ε per channel: line recomputed, ○ ledger, × refused/missing", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_roc(report: Mapping[str, Any]) -> bytes | None:
    """Log-log ROC of every empirical audit, with the DP boundary TPR = e^ε·FPR + δ."""
    from matplotlib.figure import Figure

    emp = report.get("empirical") or {}
    curves = {n: r for n, r in emp.items() if r.get("roc")}
    if not curves:
        return None
    fig = Figure(figsize=(5, 4.4))
    fig.subplots_adjust(left=0.15, right=0.96, bottom=0.12, top=0.92)
    ax = fig.add_subplot()
    lo = 1.0
    for name, r in curves.items():
        fpr, tpr = np.asarray(r["roc"]["fpr"]), np.asarray(r["roc"]["tpr"])
        ok = (fpr > 0) & (tpr > 0)
        color = None
        if ok.any():
            lo = min(lo, float(fpr[ok].min()))
            (line,) = ax.plot(fpr[ok], tpr[ok], label=f"{name} (AUC {fmt(r.get('auc'))})")
            color = line.get_color()
        claim = num(r.get("epsilon_theory"))
        if claim is not None and math.isfinite(claim) and not r.get("control"):
            # No (ε, δ)-DP mechanism admits a test above TPR = e^ε·FPR + δ (Kairouz et al. 2015)
            x = np.geomspace(1e-5, 1, 100)
            limit = np.minimum(1, math.exp(claim) * x + float(r["delta"]))
            ax.plot(x, limit, ":", lw=1, color=color, label=f"{name}: DP limit, ε = {claim:.2f}")
    x = np.geomspace(min(lo, 1e-3), 1, 50)
    ax.plot(x, x, color="grey", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(min(lo, 1e-3), 1)
    ax.set_ylim(min(lo, 1e-3), 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Membership / canary ROC (log-log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _png(fig)


def plot_scores(report: Mapping[str, Any]) -> bytes | None:
    """Histograms of canary (or membership) scores, included vs not included."""
    from matplotlib.figure import Figure

    emp = report.get("empirical") or {}
    hists = {n: r["histogram"] for n, r in emp.items() if r.get("histogram")}
    if not hists:
        return None
    fig = Figure(figsize=(5.2, 2.6 * len(hists)))
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.08, top=0.93, hspace=0.45)
    for i, (name, h) in enumerate(hists.items(), start=1):
        ax = fig.add_subplot(len(hists), 1, i)
        edges = np.asarray(h["edges"])
        width = np.diff(edges)
        ax.bar(edges[:-1], h["out"], width=width, align="edge", alpha=0.5, label="out")
        ax.bar(edges[:-1], h["in"], width=width, align="edge", alpha=0.5, label="in")
        ax.set_title(f"{name}: scores, in (inserted / member) vs out", fontsize=9)
        ax.legend(fontsize=7)
    return _png(fig)


# --- the document -----------------------------------------------------------------------------


def _document(report: Mapping[str, Any], image_names: Sequence[str]) -> Document:
    """The report for people: verdicts first, then per-channel numbers, the privacy statement,
    the empirical audits, utility, logs and the run; ``image_names`` are the plots made."""
    overall = "OK" if report["ok"] else "PROBLEMS FOUND"
    intro: tuple[Block, ...] = (
        Paragraph(f"Generated {report['generated']} · overall: {overall}"),
        VerdictList(tuple(VerdictRow(v["status"], v["line"]) for v in report["verdicts"])),
    )
    sections: list[Section] = []
    details = [d for v in report["verdicts"] for d in v["details"]]
    if details:
        sections.append(Section("Details", (BulletList(tuple(details[:MAX_DETAILS])),)))
    sections.append(_channels_section(report["accounting"], report["egress"], image_names))
    sections.append(_nodes_section(report["nodes"]))
    sections.append(_statement_section(report["statement"]))
    if report.get("empirical"):
        sections.append(_empirical_section(report["empirical"]))
    if report.get("utility"):
        sections.append(_utility_section(report["utility"]))
    sections.append(_logs_section(report["logs"]))
    sections.append(_run_section(report["run"], report["statement"]["versions"]))
    return Document(f"Privacy audit: {report['run_dir']}", intro, tuple(sections))


def _channels_section(
    acc: Mapping[str, Any], eg: Mapping[str, Any], image_names: Sequence[str]
) -> Section:
    """ε per channel (the run's accountant, PLD, and RDP when the run's is not RDP) next to the
    target, rounds and egress counts; the composed worst case; the plots."""
    name = acc["accountant"].upper()
    rdp_column = acc["accountant"] != "rdp"
    header = ["channel", f"ε {name}", "ε worst case", "ε PLD", *(["ε RDP"] if rdp_column else [])]
    header += ["target", "trained", "refused", "lost", "replies", "bytes", "violations"]
    rows = []
    for ch in sorted(set(acc["channels"]) | set(eg["channels"])):
        r = acc["channels"].get(ch, {})
        e = eg["channels"].get(ch, {})
        rows.append(
            (
                ch,
                fmt(r.get("epsilon")),
                fmt(r.get("epsilon_worst_case")),
                fmt(r.get("epsilon_pld")),
                *([fmt(r.get("epsilon_rdp"))] if rdp_column else []),
                fmt(acc["target_epsilon"], 2),
                str(r.get("rounds_trained", "—")),
                ", ".join(map(str, r.get("rounds_refused", []))) or "—",
                ", ".join(map(str, r.get("rounds_missing", []))) or "—",
                str(e.get("replies", 0)),
                f"{e.get('bytes', 0):,}",
                str(e.get("violations", 0)),
            )
        )
    blocks: list[Block] = [Table(tuple(header), tuple(rows))]
    comp = acc.get("composed")
    if comp:
        blocks.append(
            Paragraph(
                f"Composed worst case, one person on all channels ({', '.join(comp['channels'])}"
                f"): ε = {fmt(comp['epsilon'])} ({name}), {fmt(comp['epsilon_pld'])} (PLD) at "
                f"δ = {acc['delta']:g}; naive sum of per-channel ε = {fmt(comp['naive_sum'])} "
                f"(at δ = {comp['naive_sum_delta']:g})."
            )
        )
    blocks.append(
        Paragraph(
            "ε worst case: lost rounds (no reply, or an error reply that was not a refusal) "
            "counted as spent, at the steps planned and the σ, q of the channel's nearest "
            "trained round; the privacy statement claims this figure. Lost: those rounds."
        )
    )
    blocks += [Image(n, n.removesuffix(".png")) for n in image_names]
    return Section("Per channel", tuple(blocks))


def _nodes_section(nodes_report: Mapping[str, Any]) -> Section:
    """Each node's policy, noise source, evaluations and ledger; the policies in force; every
    refusal and ledger reset."""
    pf = nodes_report["policy_file"]
    if pf["present"]:
        where = (
            f"{pf['name']}: digest {str(pf['digest'])[:12]}…, {pf['source']}"
            if pf["digest"]
            else f"{pf['name']}: unreadable: {pf['problem']}"
        )
    else:
        where = f"no {pf['name']} in the run directory (a deployment's nodes keep their own)"
    rows = []
    for label, n in nodes_report["nodes"].items():
        own = n["node_ledger"] or {}
        check = n["ledger_check"] or {}
        rows.append(
            (
                label,
                (str(n["policy"])[:12] + "…" if n["policy"] else "—")
                + ("" if n["policy_known"] else " (unknown)"),
                str(n["policy_basis"]),
                ", ".join(n["noise_sources"]) or "—",
                str(n["trained"]),
                str(n["evaluations"]) + (f" / {own['evaluations_lifetime']}" if own else ""),
                fmt(own.get("lifetime_epsilon")),
                str(check.get("status", "—")),
            )
        )
    blocks: list[Block] = [
        Paragraph(where, lead="Policy file."),
        Table(
            (
                "node",
                "policy",
                "basis",
                "noise source",
                "trained",
                "evaluations (run / lifetime)",
                "lifetime ε",
                "node ledger",
            ),
            tuple(rows),
        ),
    ]
    subsections = [
        Section(f"Policy {digest[:12]}…", (KeyValues.of({"source": p["source"], **p["policy"]}),))
        for digest, p in nodes_report["policies"].items()
    ]
    refusals = nodes_report["refusals"]
    subsections.append(
        Section(
            f"Refusals ({len(refusals)})",
            (
                Table(
                    ("source", "node", "round", "kind", "status", "reason"),
                    tuple(
                        (
                            str(r["source"]),
                            str(r["node"]),
                            str(r["round"]),
                            str(r["kind"]),
                            str(r["status"]),
                            str(r["reason"]) or "—",
                        )
                        for r in refusals
                    ),
                )
                if refusals
                else Paragraph("No node refused and no request failed."),
            ),
        )
    )
    if nodes_report["resets"]:
        subsections.append(
            Section(
                "Ledger resets",
                (
                    BulletList(
                        tuple(
                            f"{r['node']} ({r['where']}, {r['time']}): {r['reason']}; previous "
                            f"head {str(r['previous_head'])[:12]}…, {r['previous_entries']} lines"
                            for r in nodes_report["resets"]
                        )
                    ),
                ),
            )
        )
    return Section("Nodes", tuple(blocks), tuple(subsections))


def _statement_section(st: Mapping[str, Any]) -> Section:
    paragraphs = tuple(
        Paragraph(st[key], lead=f"{key.replace('_', ' ').capitalize()}.")
        for key in (
            "setting_and_trust_model",
            "guarantee",
            "privacy_unit",
            "adjacency",
            "users_on_several_platforms",
            "protected",
        )
    )
    subsections = [
        Section(
            f"Against the server: policy {t['policy']}",
            (
                Paragraph(", ".join(t["nodes"]) or "no node in the logs", lead="Nodes."),
                Paragraph("What holds against the server:"),
                BulletList(tuple(t["holds"]) or ("Nothing known.",)),
                Paragraph("What does not hold against the server:"),
                BulletList(tuple(t["does_not_hold"])),
            ),
        )
        for t in st["against_the_server"]
    ]
    subsections.append(Section("Not protected", (BulletList(tuple(st["not_protected"])),)))
    subsections += [
        Section(key.replace("_", " ").capitalize(), (KeyValues.of(st[key]),))
        for key in ("mechanism", "sampling", "accounting", "budget_policy")
    ]
    return Section("Privacy statement", paragraphs, tuple(subsections))


def _empirical_section(emp: Mapping[str, Mapping[str, Any]]) -> Section:
    header = (
        "audit",
        "method",
        "channel",
        "ε empirical",
        "ε claimed",
        "ceiling",
        "AUC",
        "TPR@1%",
        "TPR@0.1%",
        "verdict",
    )
    rows = tuple(
        (
            name,
            str(r["method"]),
            str(r.get("channel") or "—"),
            fmt(r.get("epsilon_lb")) + (" (estimate)" if r["kind"] == "estimate" else ""),
            fmt(r.get("epsilon_theory")),
            fmt(r.get("ceiling")),
            fmt(r.get("auc")),
            fmt(r.get("tpr_at_1pct_fpr")),
            fmt(r.get("tpr_at_0.1pct_fpr")),
            str(r["status"]),
        )
        for name, r in emp.items()
    )
    return Section("Empirical audits", (Table(header, rows),))


def _utility_section(utility: Mapping[str, Mapping[str, Any]]) -> Section:
    keys = sorted({k for u in utility.values() for k in u["evaluate"]})
    rows = tuple(
        (ch, str(u["round"]), *(fmt(u["evaluate"].get(k), 4) for k in keys))
        for ch, u in sorted(utility.items())
    )
    table = Table(("channel", "round", *keys), rows)
    return Section("Utility (last evaluation, no DP on these numbers)", (table,))


def _logs_section(logs: Mapping[str, Mapping[str, Any]]) -> Section:
    rows = tuple(
        (n, str(v["status"]), str(v["entries"]), str(v["head"])[:12] + "…", str(v["problem"]))
        for n, v in logs.items()
    )
    return Section("Logs", (Table(("log", "status", "entries", "head", "problem"), rows),))


def _run_section(run: Mapping[str, Any], versions: Mapping[str, Any]) -> Section:
    summary = {k: v for k, v in run.items() if k != "run_config"}
    config = Section("Run config", (KeyValues.of(run["run_config"]),))
    return Section("Run", (KeyValues.of({**summary, "versions": versions}),), (config,))


class OutputDirError(FedrecError, ValueError):
    """The report's output folder cannot be written: found before any audit work."""

    exit_code = 2


def check_out_dir(out_dir: Path | str) -> None:
    """Raise :class:`OutputDirError` unless ``out_dir`` is, or can be created as, a folder this
    process can write files in (:func:`fedrec.shared.fsio.out_dir_problem`)."""
    problem = out_dir_problem(Path(out_dir))
    if problem is not None:
        raise OutputDirError(problem)


def write_report(report: Mapping[str, Any], out_dir: Path | str) -> dict[str, Path]:
    """Write ``audit.json``, ``audit.md``, ``audit.html`` and the plots (PNG) to ``out_dir``.

    Every file is written atomically (temporary file + ``os.replace``). The HTML is
    self-contained (inline CSS, plots as base64 PNG); the Markdown links the PNG files.

    Returns:
        name → path of every file written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    for name, plot in (
        ("audit-epsilon.png", plot_epsilon),
        ("audit-roc.png", plot_roc),
        ("audit-scores.png", plot_scores),
    ):
        png = plot(report)
        if png is not None:
            images[name] = png
    written: dict[str, Path] = {}
    for name, png in images.items():
        atomic_write_bytes(out_dir / name, png)
        written[name] = out_dir / name
    doc = _document(report, list(images))
    files = {
        "audit.json": json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        "audit.md": render_markdown(doc),
        "audit.html": render_html(doc, images),
    }
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
        written[name] = out_dir / name
    return written

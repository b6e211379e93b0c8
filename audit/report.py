"""The audit report: read a run directory, run every check, write ``audit.{json,md,html}``.

Owns: reading the run directory tolerantly (a crashed run or a deployment run lacks files; what
is missing is reported, nothing crashes), the verdicts, the privacy statement laid out as in
research/privacy.md §6 (setting and trust model, privacy unit, what is and is not protected,
mechanism, sampling, accounting, budget policy, empirical audit, utility, versions), the plots
(matplotlib, Agg, no pyplot) and the atomic writing of the outputs.

Must not: import ``server/`` or ``client/``; write anything inside the run directory except the
chosen output folder; put per-example values of real users in the report (membership scores are
reduced to histograms and ROC points).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared import wire
from fedrec.shared.fsio import atomic_write_bytes

from . import accounting, egress, stats

SCHEMA = "fedrec-audit/1"
CONFIG, MODEL, METRICS, RESULTS = "config.json", "model.json", "metrics.jsonl", "results.json"
CHECKPOINTS = "checkpoints"
PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
ROC_POINTS = 400  # ROC curves in the report are thinned to about this many points
HIST_BINS = 30


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


def num(x: Any) -> float | None:
    """A number from the report (where ∞ is the string "inf")."""
    return accounting.as_float(x)


def fmt(x: Any, digits: int = 3) -> str:
    """A number for people: ∞ for infinity, — for unknown."""
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    v = num(x)
    if v is None or math.isnan(v):
        return "—"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return f"{v:.{digits}f}"


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


def _run_empirical(name: str, spec: Mapping[str, Any], acc: Mapping[str, Any]) -> dict[str, Any]:
    """One empirical audit: its statistic, the claim it is compared with, and the verdict."""
    method = spec.get("method")
    delta = float(spec.get("delta", acc.get("delta") or 1e-5))
    channel = spec.get("channel")
    claim = num(spec.get("epsilon_theory"))
    if claim is None and channel is not None:
        claim = num(acc.get("channels", {}).get(channel, {}).get("epsilon"))
    out: dict[str, Any] = {
        "name": name,
        "method": method,
        "channel": channel,
        "delta": delta,
        "control": bool(spec.get("control", False)),
        "epsilon_theory": claim,
    }
    if method == "one-run":
        inc = np.asarray(spec["included"], dtype=bool)
        scores = np.asarray(spec["scores"], dtype=float)
        res = stats.one_run_audit(
            scores, inc, spec["k_pos"], spec["k_neg"], delta, float(spec.get("p", 0.05))
        )
        out.update(res)
        out["kind"] = "bound"
        a, b = scores[inc], scores[~inc]
    elif method == "mia":
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
        out.update(res)
        out["kind"] = "bound"
    elif method == "canary-cosine":
        a = np.asarray(spec["cos_in"], dtype=float)
        b = np.asarray(spec["cos_out"], dtype=float)
        res = stats.canary_cosine_audit(a, b, delta)
        out.update(res)
        out["epsilon_lb"] = res["epsilon"]
        out["kind"] = "estimate"
    else:
        raise ValueError(
            f"empirical[{name!r}]: method must be one-run, mia or canary-cosine. Found {method!r}."
        )
    if a.size and b.size:
        out["auc"] = stats.auc(a, b)
        out["tpr_at_1pct_fpr"] = stats.tpr_at_fpr(a, b, 0.01)
        out["tpr_at_0.1pct_fpr"] = stats.tpr_at_fpr(a, b, 0.001)
        fpr, tpr, _ = stats.roc_curve(a, b)
        out["roc"] = _thin_roc(fpr, tpr)
        out["histogram"] = _histogram(a, b)
    eps_emp = float(out["epsilon_lb"])
    word = "ε_LB" if out["kind"] == "bound" else "ε estimate"
    if out["control"]:
        out["status"] = PASS if eps_emp > 0 else WARN
        out["line"] = f"{name}: non-private control, {word} {fmt(eps_emp)} " + (
            "> 0: the audit has power" if eps_emp > 0 else "= 0: the audit shows no power"
        )
    elif claim is None:
        out["status"] = WARN
        out["line"] = f"{name}: {word} {fmt(eps_emp)}, no claimed ε to compare with"
    elif eps_emp <= claim + 1e-6:
        out["status"] = PASS
        out["line"] = f"{name}: {word} {fmt(eps_emp)} ≤ claimed ε {fmt(claim)}: consistent"
    else:
        out["status"] = FAIL if out["kind"] == "bound" else WARN
        out["line"] = f"{name}: {word} {fmt(eps_emp)} > claimed ε {fmt(claim)}: " + (
            "the guarantee is CONTRADICTED" if out["kind"] == "bound" else "suspicious"
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


def _verdict(name: str, status: str, line: str, details: Sequence[str] = ()) -> dict[str, Any]:
    return {"name": name, "status": status, "line": line, "details": list(details)}


def build_report(
    run_dir: Path | str,
    empirical: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    pld_interval: float = accounting.PLD_INTERVAL,
) -> dict[str, Any]:
    """Audit a run directory; return the report as a JSON-able dict.

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
        pld_interval: discretisation of the PLD cross-check (1e-4 as in privacy.md §4).

    Returns:
        ``{"schema", "ok", "verdicts", "run", "files", "logs", "accounting", "egress",
        "statement", "utility", "empirical", "read_problems"}``; non-finite numbers are the
        strings "inf"/"nan".
    """
    run_dir = Path(run_dir)
    read_problems: list[str] = []
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    config = _read_json(run_dir / CONFIG, read_problems) or {}
    model = _read_json(run_dir / MODEL, read_problems)
    results = _read_json(run_dir / RESULTS, read_problems)
    run_config = config.get("run_config") if isinstance(config.get("run_config"), dict) else {}
    channels = [c for c in config.get("channels", []) if isinstance(c, str)]
    if not channels and isinstance(run_config.get("channels"), str):
        channels = [c.strip() for c in run_config["channels"].split(",") if c.strip()]

    expected = [CONFIG, MODEL, METRICS, egress.LEDGER, egress.EGRESS, RESULTS, CHECKPOINTS]
    present = [f for f in expected if (run_dir / f).exists()]
    missing = [f for f in expected if f not in present]
    nodes_present = (run_dir / egress.NODES).is_dir()

    # Logs
    log_heads = results.get("log_heads") if isinstance(results, dict) else None
    logs = egress.verify_logs(
        run_dir, log_heads if isinstance(log_heads, dict) else None, channels=channels
    )
    ledger = _read_jsonl(run_dir / egress.LEDGER, egress.LEDGER, read_problems)
    replies = _read_jsonl(run_dir / egress.EGRESS, egress.EGRESS, read_problems)
    node_ledgers: dict[str, list[dict[str, Any]]] = {}
    if nodes_present:
        for sub in sorted((run_dir / egress.NODES).iterdir()):
            if (sub / egress.LEDGER).exists():
                name = f"{egress.NODES}/{sub.name}/{egress.LEDGER}"
                node_ledgers[sub.name] = _read_jsonl(sub / egress.LEDGER, name, read_problems)
    metrics = _read_jsonl(run_dir / METRICS, METRICS, read_problems)

    # Accounting and egress
    acc = accounting.audit_accounting(
        ledger,
        run_config,
        channels=channels,
        node_ledgers=node_ledgers or None,
        pld_interval=pld_interval,
    )
    shapes = model.get("param_shapes") if isinstance(model, dict) else None
    eg = egress.audit_egress(replies, shapes if isinstance(shapes, dict) else None)

    # Empirical
    emp: dict[str, Any] | None = None
    if empirical:
        emp = {}
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

    verdicts = _verdicts(
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
    )
    checkpoints = (
        sorted(p.name for p in (run_dir / CHECKPOINTS).iterdir())
        if (run_dir / CHECKPOINTS).is_dir()
        else []
    )
    report = {
        "schema": SCHEMA,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "ok": all(v["status"] != FAIL for v in verdicts),
        "verdicts": verdicts,
        "run": {
            "fedrec_version": config.get("fedrec_version"),
            "scenario": config.get("scenario"),
            "started": config.get("started"),
            "channels": channels,
            "num_server_rounds": run_config.get("num-server-rounds"),
            "rounds_completed": (results or {}).get("rounds_completed"),
            "wall_seconds": (results or {}).get("wall_seconds"),
            "num_parameters": (model or {}).get("num_parameters"),
            "checkpoints": checkpoints,
            "run_config": run_config,
        },
        "files": {
            "present": present,
            "missing": missing,
            "nodes": sorted(node_ledgers) if nodes_present else None,
        },
        "logs": logs,
        "accounting": acc,
        "egress": eg,
        "statement": _statement(config, run_config, acc),
        "utility": _utility(metrics),
        "empirical": emp,
        "read_problems": read_problems,
    }
    return _jsonable(report)


def _verdicts(
    *,
    fault_injected: bool,
    logs: Mapping[str, Mapping[str, Any]],
    acc: Mapping[str, Any],
    eg: Mapping[str, Any],
    emp: Mapping[str, Any] | None,
    missing: Sequence[str],
    read_problems: Sequence[str],
    ledger_present: bool,
    egress_present: bool,
    shapes_known: bool,
) -> list[dict[str, Any]]:
    out = []
    if fault_injected:  # the audit's own fault injection: the claimed ε is not real
        out.append(
            _verdict(
                "fault-injection",
                FAIL,
                "FAULT INJECTION: audit.disable-noise was on: "
                "no DP noise was added, the reported ε does not hold",
            )
        )
    # Logs intact or tampered
    bad = [v for v in logs.values() if v["status"] in (egress.TAMPERED, egress.MISSING)]
    weak = [v for v in logs.values() if v["status"] == egress.UNVERIFIED_TAIL]
    summary = ", ".join(f"{v['log']} ({v['entries']} entries)" for v in logs.values())
    if bad:
        tampered = [v for v in bad if v["status"] == egress.TAMPERED]
        word = "TAMPERED" if tampered else "MISSING"
        out.append(
            _verdict(
                "logs",
                FAIL,
                f"LOGS: {word}: {', '.join(v['log'] for v in bad)}: not trusted",
                [v["problem"] for v in bad + weak],
            )
        )
    elif weak:
        out.append(
            _verdict(
                "logs",
                WARN,
                f"LOGS: chains intact, tail unverified for {', '.join(v['log'] for v in weak)}",
                [v["problem"] for v in weak],
            )
        )
    else:
        out.append(_verdict("logs", PASS, f"LOGS: intact: {summary}; heads match results.json"))
    # Accounting consistent or not
    per = acc["channels"]
    if not ledger_present:
        out.append(
            _verdict("accounting", FAIL, "ACCOUNTING: not verifiable: privacy-ledger.jsonl missing")
        )
    elif acc["problems"]:
        n = len(acc["problems"])
        out.append(
            _verdict(
                "accounting",
                FAIL,
                f"ACCOUNTING: INCONSISTENT ({n} problem{'s' * (n != 1)}): {acc['problems'][0]}",
                acc["problems"],
            )
        )
    elif not acc["dp_enabled"]:
        out.append(_verdict("accounting", WARN, "ACCOUNTING: DP disabled for this run: ε = ∞"))
    else:
        out.append(
            _verdict(
                "accounting",
                PASS,
                f"ACCOUNTING: consistent: ledger ε equals the {acc['accountant'].upper()} "
                f"recomputation on {len(per)} channel{'s' * (len(per) != 1)}; the "
                f"{acc['cross_check'].upper()} cross-check agrees (RDP ≥ PLD)",
                acc["notes"],
            )
        )
    # Budget
    target = acc["target_epsilon"]
    eps = {c: r["epsilon"] for c, r in per.items()}
    refused = {c: r["rounds_refused"] for c, r in per.items() if r["rounds_refused"]}
    comp = acc.get("composed") or {}
    tail = (
        f"; composed worst case (user on all channels) ε {fmt(comp.get('epsilon'))} "
        f"(naive sum {fmt(comp.get('naive_sum'))})"
        if len(per) > 1 and comp
        else ""
    )
    ref = (
        "; refused rounds: " + ", ".join(f"{c} {r}" for c, r in refused.items()) if refused else ""
    )
    if acc["violations"]:
        out.append(
            _verdict(
                "budget",
                FAIL,
                f"BUDGET: VIOLATED: {acc['violations'][0]}",
                acc["violations"],
            )
        )
    elif not acc["dp_enabled"]:
        out.append(_verdict("budget", WARN, "BUDGET: not applicable: DP disabled (ε = ∞)"))
    elif not per:
        out.append(_verdict("budget", WARN, "BUDGET: no channel trained; nothing spent"))
    else:
        worst = max(eps, key=lambda c: eps[c] if not math.isnan(eps[c]) else -1)
        target_txt = f"≤ target {fmt(target)}" if target is not None else "(no target set)"
        out.append(
            _verdict(
                "budget",
                PASS,
                f"BUDGET: within target: max ε {fmt(eps[worst])} ({worst}) {target_txt}{ref}{tail}",
            )
        )
    # Egress
    if not egress_present:
        out.append(_verdict("egress", FAIL, "EGRESS: not verifiable: egress.jsonl missing"))
    elif eg["violations"]:
        n = len(eg["violations"])
        out.append(
            _verdict(
                "egress",
                FAIL,
                f"EGRESS: {n} VIOLATION{'S' * (n != 1)} in {eg['replies']} replies: "
                f"{eg['violations'][0]['where']}: {eg['violations'][0]['problem']}",
                [
                    f"{v['where']} (round {v['round']}, {v['channel']}, {v['kind']}, "
                    f"{v['source']}): {v['problem']}"
                    for v in eg["violations"]
                ],
            )
        )
    elif other_errors := [x for x in eg["errors"] if not x["refused"]]:
        out.append(
            _verdict(
                "egress",
                WARN,
                f"EGRESS: within the allowlist, but {len(other_errors)} error "
                f"repl{'ies' if len(other_errors) != 1 else 'y'} carried free-text reasons "
                "(not covered by the allowlist)",
                [
                    f"{x['where']} (round {x['round']}, {x['channel']}, code {x['code']}): "
                    f"{x['reason']}"
                    for x in other_errors
                ],
            )
        )
    else:
        checked = "and the model's parameter shapes" if shapes_known else ""
        out.append(
            _verdict(
                "egress",
                PASS,
                f"EGRESS: clean: {eg['replies']} replies, {eg['bytes']:,} bytes, all within the "
                f"allowlist {checked}".rstrip(),
            )
        )
    # Empirical
    if not emp:
        out.append(_verdict("empirical", SKIP, "EMPIRICAL: no empirical audit given"))
    else:
        statuses = [r["status"] for r in emp.values()]
        status = FAIL if FAIL in statuses else (WARN if WARN in statuses else PASS)
        head = {
            PASS: "consistent with the guarantee",
            WARN: "see details",
            FAIL: "CONTRADICTS the guarantee",
        }[status]
        out.append(
            _verdict(
                "empirical",
                status,
                f"EMPIRICAL: {head}: " + "; ".join(r["line"] for r in emp.values()),
                [r["line"] for r in emp.values()],
            )
        )
    # Files
    if missing or read_problems:
        out.append(
            _verdict(
                "files",
                WARN,
                f"FILES: missing {', '.join(missing) or 'none'}"
                + (f"; {len(read_problems)} unreadable lines/files" if read_problems else ""),
                list(read_problems),
            )
        )
    return out


def _statement(
    config: Mapping[str, Any], run_config: Mapping[str, Any], acc: Mapping[str, Any]
) -> dict[str, Any]:
    """The privacy statement (research/privacy.md §6)."""
    per = acc["channels"]
    comp = acc.get("composed") or {}
    return {
        "setting_and_trust_model": accounting.TRUST_MODEL,
        "privacy_unit": accounting.PRIVACY_UNIT,
        "adjacency": accounting.ADJACENCY,
        "users_on_several_platforms": (
            "Protected by each platform's guarantee separately; a person who is a user on every "
            f"platform has, in the worst case, ε = {fmt(comp.get('epsilon'))} "
            f"({acc['accountant'].upper()}; PLD {fmt(comp.get('epsilon_pld'))}) at "
            f"δ = {acc['delta']:g}, all channels composed; the naive sum "
            f"{fmt(comp.get('naive_sum'))} holds at δ = {comp.get('naive_sum_delta', 0):g}."
        ),
        "protected": accounting.PROTECTED,
        "not_protected": accounting.not_protected(run_config, per),
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


# --- rendering --------------------------------------------------------------------------------

Block = tuple[Any, ...]
ICON = {PASS: "✅", WARN: "⚠️", FAIL: "❌", SKIP: "➖"}


def _blocks(report: Mapping[str, Any], images: Sequence[tuple[str, str]]) -> list[Block]:
    acc, eg, st = report["accounting"], report["egress"], report["statement"]
    b: list[Block] = [("h1", f"Privacy audit: {report['run_dir']}")]
    b.append(
        (
            "p",
            f"Generated {report['generated']} · overall: "
            f"{'OK' if report['ok'] else 'PROBLEMS FOUND'}",
        )
    )
    b.append(("verdicts", report["verdicts"]))
    details = [d for v in report["verdicts"] for d in v["details"]]
    if details:
        b.append(("h2", "Details"))
        b.append(("ul", details[:200]))
    b.append(("h2", "Per channel"))
    rows = []
    for ch in sorted(set(acc["channels"]) | set(eg["channels"])):
        r = acc["channels"].get(ch, {})
        e = eg["channels"].get(ch, {})
        rows.append(
            [
                ch,
                fmt(r.get("epsilon")),
                fmt(r.get("epsilon_pld")),
                fmt(r.get("epsilon_rdp")) if acc["accountant"] != "rdp" else "",
                fmt(acc["target_epsilon"], 2),
                str(r.get("rounds_trained", "—")),
                ", ".join(map(str, r.get("rounds_refused", []))) or "—",
                str(e.get("replies", 0)),
                f"{e.get('bytes', 0):,}",
                str(e.get("violations", 0)),
            ]
        )
    b.append(
        (
            "table",
            [
                "channel",
                f"ε {acc['accountant'].upper()}",
                "ε PLD",
                "ε RDP" if acc["accountant"] != "rdp" else "",
                "target",
                "trained",
                "refused",
                "replies",
                "bytes",
                "violations",
            ],
            rows,
        )
    )
    comp = acc.get("composed")
    if comp:
        b.append(
            (
                "p",
                f"Composed worst case, one person on all channels ({', '.join(comp['channels'])}"
                f"): ε = {fmt(comp['epsilon'])} ({acc['accountant'].upper()}), "
                f"{fmt(comp['epsilon_pld'])} (PLD) at δ = {acc['delta']:g}; naive sum of "
                f"per-channel ε = {fmt(comp['naive_sum'])} (at δ = {comp['naive_sum_delta']:g}).",
            )
        )
    for name, _ in images:
        b.append(("img", name, name.removesuffix(".png")))
    b.append(("h2", "Privacy statement"))
    for key in (
        "setting_and_trust_model",
        "privacy_unit",
        "adjacency",
        "users_on_several_platforms",
        "protected",
    ):
        b.append(("p", f"**{key.replace('_', ' ').capitalize()}.** {st[key]}"))
    b.append(("h3", "Not protected"))
    b.append(("ul", st["not_protected"]))
    for key in ("mechanism", "sampling", "accounting", "budget_policy"):
        b.append(("h3", key.replace("_", " ").capitalize()))
        b.append(("kv", st[key]))
    if report.get("empirical"):
        b.append(("h2", "Empirical audits"))
        rows = []
        for name, r in report["empirical"].items():
            rows.append(
                [
                    name,
                    str(r["method"]),
                    str(r.get("channel") or "—"),
                    fmt(r.get("epsilon_lb")) + (" (estimate)" if r["kind"] == "estimate" else ""),
                    fmt(r.get("epsilon_theory")),
                    fmt(r.get("ceiling")),
                    fmt(r.get("auc")),
                    fmt(r.get("tpr_at_1pct_fpr")),
                    fmt(r.get("tpr_at_0.1pct_fpr")),
                    r["status"],
                ]
            )
        b.append(
            (
                "table",
                [
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
                ],
                rows,
            )
        )
    if report.get("utility"):
        b.append(("h2", "Utility (last evaluation, no DP on these numbers)"))
        keys = sorted({k for u in report["utility"].values() for k in u["evaluate"]})
        rows = [
            [ch, str(u["round"])] + [fmt(u["evaluate"].get(k), 4) for k in keys]
            for ch, u in sorted(report["utility"].items())
        ]
        b.append(("table", ["channel", "round", *keys], rows))
    b.append(("h2", "Logs"))
    b.append(
        (
            "table",
            ["log", "status", "entries", "head", "problem"],
            [
                [n, v["status"], str(v["entries"]), str(v["head"])[:12] + "…", v["problem"]]
                for n, v in report["logs"].items()
            ],
        )
    )
    b.append(("h2", "Run"))
    run = {k: v for k, v in report["run"].items() if k != "run_config"}
    b.append(("kv", {**run, "versions": st["versions"]}))
    b.append(("h3", "Run config"))
    b.append(("kv", report["run"]["run_config"]))
    return b


def _kv_text(v: Any) -> str:
    if isinstance(v, Mapping | list):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


def _to_markdown(blocks: Sequence[Block]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    out: list[str] = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {blk[1]}\n")
        elif kind == "p":
            out.append(f"{blk[1]}\n")
        elif kind == "verdicts":
            out.extend(f"- {ICON[v['status']]} **{cell(v['line'])}**" for v in blk[1])
            out.append("")
        elif kind == "ul":
            out.extend(f"- {cell(x)}" for x in blk[1])
            out.append("")
        elif kind == "table":
            cols = [i for i, h in enumerate(blk[1]) if h]
            out.append("| " + " | ".join(cell(blk[1][i]) for i in cols) + " |")
            out.append("|" + "---|" * len(cols))
            out.extend("| " + " | ".join(cell(r[i]) for i in cols) + " |" for r in blk[2])
            out.append("")
        elif kind == "kv":
            out.append("| key | value |\n|---|---|")
            out.extend(f"| {cell(k)} | {cell(_kv_text(v))} |" for k, v in blk[1].items())
            out.append("")
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})\n")
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.5em;word-break:break-all}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td{word-break:break-word;max-width:640px}
.v{padding:.45em .8em;margin:.3em 0;border-radius:4px;font-weight:600}
.pass{background:#e6f4ea}.warn{background:#fff4e5}.fail{background:#fde7e9}.skip{background:#eee}
img{max-width:100%;display:block;margin:1em 0}
"""


def _to_html(blocks: Sequence[Block], images: Mapping[str, bytes]) -> str:
    e = html.escape

    def inline(s: str) -> str:
        parts = e(str(s)).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(str(blocks[0][1]))}</title><style>{CSS}</style></head><body>",
    ]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(str(blk[1]))}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{inline(blk[1])}</p>")
        elif kind == "verdicts":
            out.extend(
                f"<div class='v {v['status']}'>{ICON[v['status']]} {e(v['line'])}</div>"
                for v in blk[1]
            )
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(str(x))}</li>" for x in blk[1]) + "</ul>")
        elif kind == "table":
            cols = [i for i, h in enumerate(blk[1]) if h]
            head = "".join(f"<th>{e(blk[1][i])}</th>" for i in cols)
            body = "".join(
                "<tr>" + "".join(f"<td>{e(str(r[i]))}</td>" for i in cols) + "</tr>" for r in blk[2]
            )
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "kv":
            body = "".join(
                f"<tr><th>{e(str(k))}</th><td>{e(_kv_text(v))}</td></tr>" for k, v in blk[1].items()
            )
            out.append(f"<table>{body}</table>")
        elif kind == "img" and blk[1] in images:
            data = base64.b64encode(images[blk[1]]).decode()
            out.append(f"<img alt='{e(blk[2])}' src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)


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
    blocks = _blocks(report, list(images.items()))
    files = {
        "audit.json": json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        "audit.md": _to_markdown(blocks),
        "audit.html": _to_html(blocks, images),
    }
    for name, text in files.items():
        atomic_write_bytes(out_dir / name, text.encode("utf-8"))
        written[name] = out_dir / name
    return written

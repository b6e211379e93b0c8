"""``fedrec simulate``: the main job.

Builds the synthetic world if absent, encodes item text, runs the federated model in Flower's
Simulation Engine (one node per channel; DP on, and again with DP off), trains the same model
with the same DP budget on each channel alone, a pooled centralised model without privacy
(an upper bound only a simulation can compute), and a popularity baseline; then prints one
table per channel with NDCG@10, HR@10, Recall@20 and ε.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import typer

from fedrec.shared.policy import NodePolicy, load_policy

SCENARIOS = ("synthetic", "movielens-1m", "movielens-100k")


def _comparisons(
    cfg: Any, matrices: dict[str, Any], data_dir: Path, console: Any
) -> dict[str, dict[str, dict[str, float]]]:
    """Popularity, local-only DP and pooled non-private rows, computed in this process."""
    import numpy as np
    import torch

    from fedrec.client.standalone import fit
    from fedrec.client.training import (
        Split,
        TrainSpec,
        evaluate,
        leave_last_out,
        model_scorer,
        train_local,
    )
    from fedrec.shared.data import Sequences, to_sequences
    from fedrec.shared.datasets import load_channel
    from fedrec.shared.model import build_channel_model, with_prior
    from fedrec.shared.prior import popularity_counts, prior_logits
    from fedrec.simulations.baselines import popularity_scorer

    torch.set_num_threads(2)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    splits: dict[str, Split] = {}
    items: dict[str, torch.Tensor] = {}
    spec = TrainSpec.from_config(cfg, steps=cfg.planned_steps(), seed=cfg.seed)
    ev = {"max_history": cfg.model.max_history, "max_users": cfg.eval.max_users, "seed": cfg.seed}
    for ch in cfg.channels:
        _, inter = load_channel(data_dir, ch)
        splits[ch] = leave_last_out(to_sequences(inter))
        items[ch] = torch.from_numpy(np.array(matrices[ch].matrix, dtype=np.float32))
        n = len(items[ch])
        rows[ch] = {
            "popularity": evaluate(popularity_scorer(splits[ch].train, n), n, splits[ch], **ev)[0]
        }
        t = time.perf_counter()
        _, local = fit(
            items[ch],
            splits[ch],
            spec,
            dp=cfg.dp,
            channel=ch,
            max_eval_users=cfg.eval.max_users,
            model=build_channel_model(cfg, items[ch].shape[1]),
        )
        rows[ch]["local-only (DP)"] = {**local.metrics, "epsilon": local.epsilon}
        console.print(
            f"  local-only DP {ch}: ndcg@10={local.metrics['ndcg@10']:.4f} "
            f"ε={local.epsilon:.2f} ({time.perf_counter() - t:.1f}s)"
        )
    # Pooled: every channel's users in one non-private model (item indices offset per channel).
    t = time.perf_counter()
    dim = items[cfg.channels[0]].shape[1]
    if cfg.model.item_prior != "none":  # each channel's exact popularity: nothing is private here
        items = {
            ch: with_prior(items[ch], prior_logits(popularity_counts(splits[ch].train, len(m))))
            for ch, m in items.items()
        }
    offsets = np.cumsum([0] + [len(items[ch]) for ch in cfg.channels])
    pooled_items = torch.cat([items[ch] for ch in cfg.channels])
    parts = [splits[ch].train for ch in cfg.channels]
    lengths = np.concatenate([p.lengths() for p in parts])
    pooled = Sequences(
        np.concatenate([p.users for p in parts]),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        np.concatenate([p.item_index + off for p, off in zip(parts, offsets, strict=False)]),
    )
    model = build_channel_model(cfg, dim)  # as many steps as one platform's
    train_local(model, pooled_items, pooled, spec)
    for ch in cfg.channels:
        rows[ch]["pooled centralised (no DP)"] = evaluate(
            model_scorer(model, items[ch]), len(items[ch]), splits[ch], **ev
        )[0]
    console.print(f"  pooled centralised: {time.perf_counter() - t:.1f}s")
    return rows


def _federated(
    run_dir: Path, cfg: Any, nodes: int, policy: NodePolicy, console: Any
) -> dict[str, dict[str, Any]]:
    from fedrec.shared.errors import RunFailed
    from fedrec.simulations.flower import run_simulation

    def show(line: str) -> None:
        if "[fedrec]" in line:
            console.print("  " + line.split("[fedrec]", 1)[1].strip())
        elif "ERROR" in line or "Traceback" in line:
            console.print("  [red]" + line)

    run_simulation(run_dir, cfg.to_run_config(), num_nodes=nodes, on_line=show, node_policy=policy)
    results = json.loads((run_dir / "results.json").read_text())
    if RunFailed.RESULTS_KEY in results:  # `flwr run` exits 0 even then
        raise RunFailed(f"{results[RunFailed.RESULTS_KEY]}. Log: {run_dir / 'flower.log'}")
    rounds = flower_overhead(run_dir)
    if len(rounds) > 1:
        later = [r["overhead"] for r in rounds[1:]]
        console.print(
            f"  Flower's overhead per round beyond the nodes' own work: median "
            f"{statistics.median(later):.2f}s, max {max(later):.2f}s (rounds 2-{len(rounds)}); "
            f"round 1 {rounds[0]['overhead']:.2f}s (starts the actors)"
        )
    return dict(results["channels"])


def flower_overhead(run_dir: Path) -> list[dict[str, float]]:
    """Per round: each phase's wall time on the server, the slowest node's handler time in it
    (from the nodes' own ``timings.jsonl``), and ``overhead``, the sum over both phases of
    wall minus slowest node: message delivery, (de)serialisation, actor dispatch and
    aggregation. Nodes run in parallel, one actor each (``run_simulation``)."""
    from fedrec.client.node import NODES, TIMINGS
    from fedrec.server.rundir import METRICS, TIMING_PHASE

    wall: dict[int, dict[str, float]] = {}
    for line in (run_dir / METRICS).read_text().splitlines():
        e = json.loads(line)
        if e.get("phase") == TIMING_PHASE:
            wall[int(e["round"])] = e["metrics"]
    slowest: dict[tuple[int, str], float] = {}
    for path in sorted((run_dir / NODES).glob(f"*/{TIMINGS}")):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            key = (int(e["round"]), str(e["phase"]))
            slowest[key] = max(slowest.get(key, 0.0), float(e["seconds"]))
    out = []
    for r, w in sorted(wall.items()):
        row: dict[str, float] = {"round": r}
        for phase in ("train", "evaluate"):
            row[f"{phase}_wall"] = float(w[f"{phase}-seconds"])
            row[f"{phase}_slowest_node"] = slowest.get((r, phase), 0.0)
        row["overhead"] = sum(
            row[f"{p}_wall"] - row[f"{p}_slowest_node"] for p in ("train", "evaluate")
        )
        out.append(row)
    return out


def simulate(
    data: Path | None = None,
    scenario: str = "synthetic",
    rounds: int | None = None,
    epsilon: float | None = None,
    dp: bool | None = None,
    strategy: str | None = None,
    shards: int = 1,
    out: Path | None = None,
    seed: int = 0,
    baselines: bool = True,
    run_config: list[str] | None = None,
    resume: bool = False,
    node_policy: Path | None = None,
) -> dict[str, Any]:
    """The main job (see the module docstring); returns what it writes to ``summary.json``.

    ``out`` must be new or empty, or hold an earlier simulate's run with ``resume`` (its
    federated runs then continue from their last checkpoints, and their ledgers continue).
    Every simulated node holds ``node_policy`` (the built-in default if None); the no-DP
    comparison run's nodes hold it with ``dp-required = false``, since a simulation's user
    runs both sides.
    """
    from rich.console import Console

    from fedrec.server.rundir import INCOMPLETE
    from fedrec.shared.config import ConfigError
    from fedrec.shared.fsio import atomic_write_text
    from fedrec.shared.hashlog import resolve_key_env

    console = Console()
    t0 = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (out or Path("runs") / f"{scenario}-{stamp}").resolve()
    check_out_dir(out, resume)
    policy = load_policy(node_policy) if node_policy is not None else NodePolicy()
    resolve_key_env()  # an unusable FEDREC_RUN_KEY stops the job here, not in the ServerApp
    data_dir = ensure_data(data, scenario, seed, console)
    overrides: dict[str, Any] = {"data-dir": str(data_dir), "seed": seed}
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    if epsilon is not None:
        overrides["dp.target-epsilon"] = epsilon
    if strategy is not None:
        overrides["strategy"] = strategy
    overrides["channels"] = ",".join(dataset_channels(data_dir))
    overrides.update(parse_sets(run_config))  # --set channels=a,b runs a subset
    channels = [c.strip() for c in str(overrides["channels"]).split(",") if c.strip()]
    overrides.setdefault("min-nodes", len(channels) * shards)
    set_dp = overrides.pop("dp.enabled", None)
    if set_dp is not None and not isinstance(set_dp, bool):
        raise ConfigError([f"dp.enabled must be true or false. Found {set_dp!r}."])
    if dp is not None and set_dp is not None and set_dp != dp:
        raise ConfigError(
            [
                f"--{'' if dp else 'no-'}dp and --set dp.enabled={str(set_dp).lower()} disagree. "
                "Fix: give one of them."
            ]
        )
    dp = dp if dp is not None else (set_dp if set_dp is not None else True)
    if resume:
        overrides["resume"] = True
    cfg = preflight(
        {
            **overrides,
            "run-dir": str(out / ("federated-dp" if dp else "federated-nodp")),
            "dp.enabled": dp,
        },
        data_dir,
    )
    console.print(
        f"[bold]fedrec simulate[/]: {scenario} at {data_dir}; channels {', '.join(channels)}; "
        f"{cfg.num_server_rounds} rounds × {cfg.train.local_steps} local steps; run dir {out}"
    )
    from fedrec.server.app import encode_catalogues
    from fedrec.shared.model import build_model

    t = time.perf_counter()
    matrices = encode_catalogues(str(data_dir), cfg.channels, cfg.cache_dir, cfg.encoder_dir)
    console.print(f"items encoded in {time.perf_counter() - t:.1f}s (cached by content hash)")
    build_model(cfg, next(iter(matrices.values())).matrix.shape[1])  # model.dim fits the items
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / INCOMPLETE, f"fedrec simulate started {stamp}; no summary.json yet\n")
    rows: dict[str, dict[str, dict[str, Any]]] = {ch: {} for ch in channels}
    if baselines:
        console.print(
            "[bold]baselines[/] (popularity, local-only with the same DP budget, pooled centralised)"
        )
        for ch, r in _comparisons(cfg, matrices, data_dir, console).items():
            rows[ch].update(r)
    runs = [("federated (DP)" if dp else "federated (no DP)", cfg)]
    if dp and baselines:
        runs.append(
            (
                "federated (no DP)",
                dataclasses.replace(
                    cfg,
                    run_dir=str(out / "federated-nodp"),
                    dp=dataclasses.replace(cfg.dp, enabled=False),
                ),
            )
        )
    for label, run_cfg in runs:
        t = time.perf_counter()
        console.print(f"[bold]{label}[/]: Flower Simulation Engine, {len(channels) * shards} nodes")
        node_policy_of_run = (
            policy if run_cfg.dp.enabled else dataclasses.replace(policy, dp_required=False)
        )
        results = _federated(
            Path(run_cfg.run_dir), run_cfg, len(channels) * shards, node_policy_of_run, console
        )
        for ch, res in results.items():
            eps = res["privacy"].get("epsilon")  # strict JSON: null is ∞ (no guarantee)
            rows[ch][label] = {**res["metrics"], "epsilon": float("inf") if eps is None else eps}
        console.print(f"  done in {time.perf_counter() - t:.1f}s")
    print_tables(rows, console)
    summary = {
        "scenario": scenario,
        "data_dir": str(data_dir),
        "rows": rows,
        "wall_seconds": time.perf_counter() - t0,
        "delta": cfg.dp.target_delta,
    }
    from fedrec.server.rundir import write_json

    write_json(out / "summary.json", summary)
    (out / INCOMPLETE).unlink(missing_ok=True)
    console.print(
        f"total {summary['wall_seconds']:.1f}s; δ={cfg.dp.target_delta:g}; summary in {out / 'summary.json'}"
    )
    return summary


def print_tables(rows: dict[str, dict[str, dict[str, Any]]], console: Any) -> None:
    """One table per channel: model rows with NDCG@10, HR@10, Recall@20 and ε."""
    from rich.table import Table

    def num(m: dict[str, Any], key: str) -> str:
        return f"{m[key]:.4f}" if key in m else "-"

    for ch, models in rows.items():
        table = Table(title=f"channel: {ch}")
        for col in ("model", "NDCG@10", "HR@10", "Recall@20", "ε"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for label, m in models.items():
            eps = m.get("epsilon")
            eps_s = "-" if eps is None else ("∞" if eps == float("inf") else f"{eps:.2f}")
            table.add_row(label, num(m, "ndcg@10"), num(m, "hr@10"), num(m, "recall@20"), eps_s)
        console.print(table)


def preflight(run_config: dict[str, Any], data_dir: Path) -> Any:
    """Check the run config *and* what it implies for the data, reporting every problem at
    once: config errors, channels the dataset does not have, δ ≥ 1/users on a channel."""
    from fedrec.client.training import leave_last_out, trainable_users
    from fedrec.shared.config import (
        FEDERATED_ITEM_TABLE,
        ConfigError,
        check_delta,
        from_run_config,
    )
    from fedrec.shared.data import to_sequences
    from fedrec.shared.datasets import load_channel, load_manifest

    problems: list[str] = []
    cfg = None
    try:
        cfg = from_run_config(run_config)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if cfg is not None and cfg.model.item_table:
        problems.append(FEDERATED_ITEM_TABLE)
    known = list(load_manifest(data_dir).channels)
    channels = [c.strip() for c in str(run_config.get("channels", "")).split(",") if c.strip()]
    unknown = [c for c in channels if c not in known]
    if unknown:
        problems.append(f"channels {unknown} are not in the dataset {data_dir} (it has {known}).")
    delta = run_config.get("dp.target-delta", 1e-5)
    dp = run_config.get("dp.enabled", True) and isinstance(delta, float) and 0 < delta < 1
    for ch in (c for c in channels if c in known):
        split = leave_last_out(to_sequences(load_channel(data_dir, ch)[1]))
        users = trainable_users(split.train)
        if users == 0:
            problems.append(
                f"channel {ch}: no user has the 3 interactions training needs (one held out "
                "for evaluation, a prefix and a next item to learn from). Fix: drop the channel "
                "from `channels` or add interactions."
            )
        elif dp and (problem := check_delta(delta, users, ch)):
            problems.append(problem)
    if problems:
        raise ConfigError(problems)
    return cfg


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` options as run-config overrides; a malformed one is a ConfigError."""
    from fedrec.shared.config import ConfigError, parse_value

    out: dict[str, Any] = {}
    problems = []
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.local-steps=30")
            continue
        out[key.strip()] = parse_value(value.strip())
    if problems:
        raise ConfigError(problems)
    return out


def check_out_dir(out: Path, resume: bool, *, can_resume: bool = True) -> None:
    """Refuse, before any work, an output folder that cannot hold a new run: a file, a folder
    fedrec cannot write, or a folder that already holds something (unless ``resume``: then it
    must not be empty; the ServerApp starts a fresh run in it if it finds none to continue).
    ``can_resume``: whether the command has ``--resume``."""
    from fedrec.shared.config import ConfigError
    from fedrec.shared.fsio import out_dir_problem

    if (problem := out_dir_problem(out)) is not None:
        raise ConfigError([problem])
    used = out.is_dir() and any(out.iterdir())
    if resume and not used:
        raise ConfigError(
            [f"--resume: {out} holds no earlier run to resume. Fix: drop --resume to start one."]
        )
    if used and not resume:
        raise ConfigError(
            [
                f"--out {out} already holds files (an earlier run?); a new run never reuses a "
                "folder. Fix: give a new --out"
                + (", or add --resume to continue the run there." if can_resume else ".")
            ]
        )


def dataset_channels(data_dir: Path) -> list[str]:
    from fedrec.shared.datasets import load_manifest

    return list(load_manifest(data_dir).channels)


def ensure_data(data: Path | None, scenario: str, seed: int, console: Any) -> Path:
    if data is not None:
        return data.resolve()
    path = (Path("worlds") / scenario).resolve()
    if (path / "manifest.json").exists():
        return path
    console.print(f"building the {scenario} dataset at {path}")
    from fedrec.shared.datasets import write_dataset

    if scenario == "synthetic":
        from fedrec.simulations.world import WorldConfig, generate_world

        world = generate_world(WorldConfig(seed=seed))
        cats, inter, source, extra = (
            world.catalogues,
            world.interactions,
            world.source(),
            world.ground_truth_files(),
        )
    else:
        from fedrec.simulations.movielens import load_scenario

        cats, inter, source = load_scenario(scenario, None)
        extra = None
    return Path(
        write_dataset(
            path,
            name=scenario,
            catalogues=cats,
            interactions=inter,
            source=source,
            extra_files=extra,
        )
    )


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    def simulate_cmd(
        data: Path = typer.Option(
            None, help="Dataset directory (default: worlds/<scenario>, built if absent)."
        ),
        scenario: str = typer.Option("synthetic", help=f"One of {', '.join(SCENARIOS)}."),
        rounds: int = typer.Option(None, help="Federated rounds (default from pyproject)."),
        epsilon: float = typer.Option(None, help="Target ε per channel for the whole run."),
        dp: bool = typer.Option(
            None, "--dp/--no-dp", help="DP-SGD on the clients.  [default: dp]", show_default=False
        ),
        strategy: str = typer.Option(None, help="fedavg, fedadam or fedprox."),
        shards: int = typer.Option(1, min=1, help="Simulated nodes per channel."),
        out: Path = typer.Option(None, help="Run directory (default runs/<scenario>-<time>)."),
        seed: int = typer.Option(0),
        baselines: bool = typer.Option(
            True, "--baselines/--no-baselines", help="Also run the comparison rows."
        ),
        run_config: list[str] = typer.Option(
            None, "--set", help="Any run-config key, e.g. --set train.local-steps=30"
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Continue the run in --out from its last checkpoints."
        ),
        node_policy: Path = typer.Option(
            None,
            "--node-policy",
            help="The platforms' privacy policy (TOML) every simulated node holds "
            "(default: the built-in policy; see README, 'Node privacy policy').",
        ),
    ) -> None:
        """Run the main job: federated cross-platform training in Flower's Simulation Engine."""
        if scenario not in SCENARIOS:
            raise typer.BadParameter(
                f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}"
            )
        simulate(
            data,
            scenario,
            rounds,
            epsilon,
            dp,
            strategy,
            shards,
            out,
            seed,
            baselines,
            run_config,
            resume,
            node_policy,
        )

"""MovieLens-1M pooled: fedrec's user towers beside RecBole's rows on the same split.

The data is ML-1M as one channel (``fedrec world --scenario movielens-1m --domains none``):
all 1,000,209 ratings as implicit interactions, every user's last interaction (RecBole's time
order) held out, full ranking over the 3,706 rated movies with seen items excluded, every user
evaluated. The RecBole rows were measured once with RecBole 1.2.1 on that split (same digest)
and are printed as constants. fedrec's rows: popularity, then each tower without DP and with
DP-SGD at each ε (δ = 1e-5), trained alone as one platform would (:func:`fit`, the run
config's defaults otherwise), over ``--seeds`` seeds (mean ± std), with LOO + 99 sampled
HR@10 / NDCG@10 (the NCF protocol), training wall time and each run's peak memory. Each run
is a child process, so its peak RSS is its own.

Run::

    python -m fedrec.simulations.bench.ml1m [--towers mean,attention] [--epsilons none,8,1]
        [--seeds 3] [--steps 150] [--threads 2] [--data worlds/movielens-1m-pooled]

Without ``--data``'s folder it is written from ``$FEDREC_SHARED_DATA`` (or ``../shared/data``)
and encoded first. Must not: hold training logic.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
CHANNEL = "movies"

# RecBole 1.2.1 on the same split: (HR@10, NDCG@10, sampled HR@10, sampled NDCG@10, note).
# Full ranking with train and valid items excluded; "sampled" is RecBole's uni99 (uni100 for
# popularity, the only sampled figure measured for it).
RECBOLE = (
    ("popularity (RecBole)", 0.0354, 0.0163, 0.4661, 0.2549, "uni100"),
    ("BPR, converged (RecBole)", 0.0786, 0.0403, 0.6825, 0.4025, "44 epochs, 3.9 min"),
    ("SASRec, 1 epoch (RecBole, a floor)", 0.2432, 0.1403, 0.7502, 0.5238, "24.3 min train"),
)


def ensure_data(data: Path) -> None:
    """Write and encode the pooled ML-1M dataset at ``data`` unless it is there."""
    if (data / "encoded" / f"{CHANNEL}.items.npz").is_file():
        return
    from fedrec.server.encoder import (
        EncodingCache,
        ItemEncoder,
        default_cache_dir,
        encode_catalogue,
    )
    from fedrec.shared.datasets import load_catalogue, write_dataset
    from fedrec.shared.items import save_item_matrix
    from fedrec.simulations.movielens import load_scenario

    if not (data / "manifest.json").is_file():
        catalogues, interactions, source = load_scenario("movielens-1m", domains="none")
        write_dataset(
            data,
            name="movielens-1m-pooled",
            catalogues=catalogues,
            interactions=interactions,
            source=source,
        )
    matrix = encode_catalogue(
        load_catalogue(data, CHANNEL), ItemEncoder(), EncodingCache(default_cache_dir())
    )
    save_item_matrix(matrix, data / "encoded" / f"{CHANNEL}.items.npz")


def run_one(job: dict) -> dict:
    """One training run in this process: ``job`` names data, tower, ε, seed, steps, …"""
    import resource

    import torch

    torch.set_num_threads(job["threads"])
    from fedrec.client.standalone import fit, load_channel_data, quiet_opacus
    from fedrec.client.training import TrainSpec, evaluate
    from fedrec.shared.config import DPConfig, from_run_config
    from fedrec.shared.model import build_channel_model
    from fedrec.simulations.baselines import popularity_scorer

    data = Path(job["data"])
    items, split = load_channel_data(data, CHANNEL, data / "encoded")
    out: dict = {"job": job}
    if job["tower"] == "popularity":
        ev = {"max_users": job["eval_users"], "seed": job["seed"]}
        score = popularity_scorer(split.train, len(items))
        out["metrics"], out["users"] = evaluate(score, len(items), split, **ev)
        out["sampled"] = evaluate(score, len(items), split, sampled=99, **ev)[0]
        out["seconds"] = 0.0
    else:
        cfg = from_run_config({"model.tower": job["tower"], "seed": job["seed"], **job["set"]})
        model = build_channel_model(cfg, int(items.shape[1]), len(items))
        spec = TrainSpec.from_config(cfg, steps=job["steps"], seed=job["seed"])
        eps = job["epsilon"]
        dp = None if eps is None else DPConfig(target_epsilon=eps, target_delta=1e-5)
        with quiet_opacus():
            _, f = fit(
                items,
                split,
                spec,
                dp=dp,
                channel=CHANNEL,
                max_eval_users=job["eval_users"],
                model=model,
                sampled=99,
            )
        out.update(
            metrics=f.metrics,
            sampled=f.sampled,
            users=f.evaluated_users,
            seconds=f.seconds,
            epsilon=None if eps is None else f.epsilon,
            sigma=f.noise_multiplier,
            sample_rate=f.sample_rate,
            parameters=sum(p.numel() for p in model.parameters()),
        )
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def _stat(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: list[dict]) -> str:
    """The markdown table: RecBole's rows, then fedrec's, mean ± std over seeds."""
    lines = [
        "| model | HR@10 | NDCG@10 | LOO+99 HR@10 | LOO+99 NDCG@10 | seeds | train s | peak GiB |"
        " notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, hr, ndcg, shr, sndcg, note in RECBOLE:
        lines.append(f"| {name} | {hr:.4f} | {ndcg:.4f} | {shr:.4f} | {sndcg:.4f} | | | | {note} |")
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        j = r["job"]
        groups.setdefault((j["tower"], j["epsilon"], json.dumps(j["set"])), []).append(r)
    for (tower, eps, extra), runs in groups.items():
        if tower == "popularity":
            name = "popularity (fedrec)"
        else:
            privacy = "no DP" if eps is None else f"DP ε = {eps:g}, δ = 1e-5"
            name = f"fedrec {tower} tower, {privacy}"
        if extra != "{}":
            name += f" {extra}"
        notes = ""
        if tower != "popularity" and eps is not None:
            notes = f"σ {runs[0]['sigma']:.3f}, q {runs[0]['sample_rate']:.4f}"
        if tower != "popularity":
            notes += f"{', ' if notes else ''}{runs[0]['parameters']:,} parameters"
        lines.append(
            f"| {name} | {_stat([r['metrics']['hr@10'] for r in runs])} "
            f"| {_stat([r['metrics']['ndcg@10'] for r in runs])} "
            f"| {_stat([r['sampled']['hr@10'] for r in runs])} "
            f"| {_stat([r['sampled']['ndcg@10'] for r in runs])} | {len(runs)} "
            f"| {statistics.mean(r['seconds'] for r in runs):.0f} "
            f"| {max(r['peak_rss_gib'] for r in runs):.2f} | {notes} |"
        )
    return "\n".join(lines)


@app.command()
def main(
    data: Annotated[Path, typer.Option(help="Pooled ML-1M dataset folder.")] = Path(
        "worlds/movielens-1m-pooled"
    ),
    towers: Annotated[str, typer.Option(help="Comma-separated model.tower values.")] = (
        "mean,attention"
    ),
    epsilons: Annotated[str, typer.Option(help="'none' (no DP) and target ε values.")] = (
        "none,8,1"
    ),
    seeds: Annotated[int, typer.Option(min=1, help="Seeds 0..N-1 per row.")] = 3,
    steps: Annotated[int, typer.Option(min=1)] = 150,
    eval_users: Annotated[int, typer.Option(min=1)] = 6040,
    threads: Annotated[int, typer.Option(min=1, help="torch threads per run.")] = 2,
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="key=value run-config overrides.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Also write every run as JSON lines.")] = None,
    table_from: Annotated[
        Path | None, typer.Option(help="Print the table of runs saved with --out; train nothing.")
    ] = None,
    one: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Train every (tower, ε, seed) row on pooled ML-1M and print the comparison table."""
    if one is not None:  # a child: one run, its result as JSON on the last line
        typer.echo(json.dumps(run_one(json.loads(one))))
        return
    if table_from is not None:
        lines = table_from.read_text(encoding="utf-8").splitlines()
        typer.echo(table([json.loads(line) for line in lines if line.strip()]))
        return
    from fedrec.shared.config import from_run_config, parse_value

    ensure_data(data)
    extra = {k: parse_value(v) for k, _, v in (s.partition("=") for s in sets or [])}
    batch = from_run_config(extra).train.batch_size
    jobs: list[dict] = [{"tower": "popularity", "epsilon": None, "seed": 0, "set": {}}]
    for tower in towers.split(","):
        for e in epsilons.split(","):
            eps = None if e == "none" else float(e)
            jobs += [
                {"tower": tower, "epsilon": eps, "seed": s, "set": extra} for s in range(seeds)
            ]
    results = []
    began = time.perf_counter()
    for job in jobs:
        job.update(data=str(data), steps=steps, eval_users=eval_users, threads=threads)
        child = subprocess.run(
            [sys.executable, "-m", "fedrec.simulations.bench.ml1m", "--one", json.dumps(job)],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            typer.echo(f"run {job} failed:\n{child.stderr[-3000:]}", err=True)
            raise typer.Exit(1)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        results.append(result)
        m = result["metrics"]
        typer.echo(
            f"{job['tower']} ε={job['epsilon']} seed {job['seed']}: NDCG@10 {m['ndcg@10']:.4f} "
            f"HR@10 {m['hr@10']:.4f} ({result['seconds']:.0f} s)",
            err=True,
        )
        if out is not None:
            with open(out, "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
    typer.echo(
        f"\npooled ML-1M, leave-last-out (RecBole's split), full ranking, seen excluded, "
        f"{results[0]['users']} users; {steps} steps, batch {batch}, "
        f"torch threads {threads}; total {time.perf_counter() - began:.0f} s\n"
    )
    typer.echo(table(results))


if __name__ == "__main__":
    app()

"""Federation benchmark: does the cross-platform model pay under DP? Several seeds, paired.

Runs ``fedrec simulate`` (popularity, local-only DP, pooled without DP, federated with and
without DP) once per seed and prints, per channel, mean ± std over the seeds of NDCG@10 and
HR@10 for every row, then the paired ratios of NDCG@10 (federated DP ÷ local-only DP,
federated DP ÷ federated without DP, federated DP ÷ popularity) with their range.

Paired: seed ``s`` fixes the model's initialisation and example draws (``--seed s``) and, for
this benchmark only, the DP noise of every training call, through the nodes' own environment
(:data:`fedrec.client.dp.NOISE_SEED_ENV`, inherited by the simulation's processes). Production
runs never set it; every ledger line records whether the noise was seeded.

Run::

    python -m fedrec.simulations.bench.federation [--scenario synthetic] [--data DIR]
        [--seeds 3] [--out runs/bench-federation] [--set key=value ...]

Must not: hold training or evaluation logic (it calls :func:`fedrec.simulations.simulate`).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

FED_DP, FED_NODP = "federated (DP)", "federated (no DP)"
LOCAL_DP, POPULARITY = "local-only (DP)", "popularity"
RATIOS = (
    ("fed DP ÷ local DP", FED_DP, LOCAL_DP),
    ("fed DP ÷ fed no DP", FED_DP, FED_NODP),
    ("fed DP ÷ popularity", FED_DP, POPULARITY),
)


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample standard deviation; ± 0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def ratio_cell(pairs: list[tuple[float, float]]) -> str:
    """Mean of the per-seed ratios a/b, with their range."""
    ratios = [a / b for a, b in pairs if b > 0]
    if not ratios:
        return "-"
    return f"{statistics.mean(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}]"


def tables(runs: list[dict[str, dict[str, dict[str, float]]]]) -> str:
    """Markdown: one table per channel (rows × NDCG@10, HR@10) and one of paired ratios."""
    out: list[str] = []
    channels = list(runs[0])
    for ch in channels:
        models = list(runs[0][ch])
        out += [
            f"#### {ch} ({len(runs)} seeds)",
            "",
            "| model | NDCG@10 | HR@10 |",
            "|---|---|---|",
        ]
        for m in models:
            cells = [mean_std([r[ch][m][k] for r in runs]) for k in ("ndcg@10", "hr@10")]
            out.append(f"| {m} | {cells[0]} | {cells[1]} |")
        out.append("")
    out += ["| NDCG@10, paired by seed | " + " | ".join(channels) + " |"]
    out += ["|---|" + "---|" * len(channels)]
    for label, a, b in RATIOS:
        cells = []
        for ch in channels:
            if a in runs[0][ch] and b in runs[0][ch]:
                pairs = [(r[ch][a]["ndcg@10"], r[ch][b]["ndcg@10"]) for r in runs]
                cells.append(ratio_cell(pairs))
            else:
                cells.append("-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


@app.command()
def main(
    scenario: Annotated[str, typer.Option(help="synthetic, movielens-1m or movielens-100k.")] = (
        "synthetic"
    ),
    data: Annotated[Path | None, typer.Option(help="Dataset folder (default: by scenario).")] = (
        None
    ),
    seeds: Annotated[int, typer.Option(min=1, help="Seeds 0 … N-1, one simulate run each.")] = 3,
    out: Annotated[Path, typer.Option(help="Folder for the runs and bench.json.")] = Path(
        "runs/bench-federation"
    ),
    run_config: Annotated[
        list[str] | None, typer.Option("--set", help="Any run-config key, as in simulate.")
    ] = None,
) -> None:
    """Run simulate for each seed and print mean ± std and paired ratios per channel."""
    from fedrec.client.dp import NOISE_SEED_ENV
    from fedrec.client.standalone import quiet_opacus
    from fedrec.shared.fsio import atomic_write_text, strict_json
    from fedrec.simulations.simulate import simulate

    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        os.environ[NOISE_SEED_ENV] = str(seed)  # benchmark only: paired DP noise
        try:
            with quiet_opacus():
                summary = simulate(
                    data, scenario, out=out / f"seed-{seed}", seed=seed, run_config=run_config
                )
        finally:
            del os.environ[NOISE_SEED_ENV]
        runs.append(summary["rows"])
    text = tables(runs)
    atomic_write_text(out / "bench.json", strict_json({"seeds": seeds, "runs": runs}, indent=2))
    typer.echo(f"\n### {scenario}: federation benchmark, seeds 0-{seeds - 1}\n\n{text}\n")
    typer.echo(f"total {time.perf_counter() - start:.0f}s; runs and bench.json under {out}")


if __name__ == "__main__":
    app()

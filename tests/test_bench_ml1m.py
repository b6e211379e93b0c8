"""The pooled ML-1M benchmark's table (fedrec.simulations.bench.ml1m): RecBole's rows as
measured, fedrec's rows as mean ± std over seeds."""

from __future__ import annotations

from fedrec.simulations.bench.ml1m import RECBOLE, table


def _run(tower: str, epsilon: float | None, seed: int, ndcg: float) -> dict:
    return {
        "job": {"tower": tower, "epsilon": epsilon, "seed": seed, "set": {}},
        "metrics": {"hr@10": 2 * ndcg, "ndcg@10": ndcg},
        "sampled": {"hr@10": 0.5, "ndcg@10": 0.25},
        "seconds": 10.0 * (seed + 1),
        "peak_rss_gib": 1.0 + seed,
        "sigma": 0.9,
        "sample_rate": 1 / 12,
        "parameters": 1000,
    }


def test_table_prints_recbole_rows_then_mean_and_std_over_seeds() -> None:
    # Prepare: two seeds of one DP row (NDCG@10 0.10 and 0.14: mean 0.12, sample std 0.0283)
    runs = [_run("attention", 8.0, 0, 0.10), _run("attention", 8.0, 1, 0.14)]

    # Execute
    lines = table(runs).splitlines()

    # Assert
    assert len(lines) == 2 + len(RECBOLE) + 1
    assert lines[2].startswith("| popularity (RecBole) | 0.0354 | 0.0163 |")
    row = lines[-1]
    assert row.startswith("| fedrec attention tower, DP ε = 8, δ = 1e-5 | 0.2400 ± 0.0566 ")
    assert "| 0.1200 ± 0.0283 |" in row
    assert "| 2 | 15 | 2.00 |" in row  # seeds, mean train seconds, largest peak
    assert "σ 0.900, q 0.0833" in row

"""The federation benchmark's arithmetic: mean ± std over seeds and paired ratios."""

from __future__ import annotations

from fedrec.simulations.bench.federation import mean_std, ratio_cell, tables


def _run(fed_dp: float, local_dp: float) -> dict[str, dict[str, dict[str, float]]]:
    rows = {
        "popularity": {"ndcg@10": 0.05, "hr@10": 0.1},
        "local-only (DP)": {"ndcg@10": local_dp, "hr@10": 0.2},
        "federated (DP)": {"ndcg@10": fed_dp, "hr@10": 0.3},
        "federated (no DP)": {"ndcg@10": 0.2, "hr@10": 0.4},
    }
    return {"shop": rows}


def test_mean_std_uses_the_sample_standard_deviation() -> None:
    # 0.1, 0.2, 0.3: mean 0.2, sample std 0.1.
    assert mean_std([0.1, 0.2, 0.3]) == "0.2000 ± 0.1000"
    assert mean_std([0.25]) == "0.2500 ± 0.0000"


def test_ratios_are_paired_by_seed_not_ratios_of_means() -> None:
    # Seed 0: 0.12 / 0.10 = 1.2; seed 1: 0.10 / 0.20 = 0.5. Mean of ratios 0.85 (the ratio of
    # means would be 0.22 / 0.30 = 0.733).
    assert ratio_cell([(0.12, 0.10), (0.10, 0.20)]) == "0.850 [0.500–1.200]"


def test_tables_show_every_row_and_the_paired_ratios() -> None:
    # Execute
    text = tables([_run(0.12, 0.10), _run(0.10, 0.20)])

    # Assert
    assert "| federated (DP) | 0.1100 ± 0.0141 | 0.3000 ± 0.0000 |" in text
    assert "| fed DP ÷ local DP | 0.850 [0.500–1.200] |" in text
    assert "| fed DP ÷ popularity | 2.200 [2.000–2.400] |" in text

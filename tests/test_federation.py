"""Federation in Flower's real Simulation Engine: 3 channels x 2 rounds, then a resumed run
that must refuse to train past the privacy budget.

One test runs the engine twice (about a minute): the first run checks metrics, ε, the egress
log and the checkpoint; the resumed run checks that ε continues from the nodes' ledgers (it
never resets) and that a round past the budget is refused and recorded, not trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedrec.deploy.flower import processes_with_env
from fedrec.shared import hashlog, privacy, wire
from fedrec.shared.config import FedrecConfig, from_run_config
from fedrec.shared.policy import NodePolicy
from fedrec.simulations.flower import run_simulation
from fedrec.simulations.simulate import flower_overhead
from tests.tiny import save_tiny_bert, write_small_world

pytestmark = [pytest.mark.simulation, pytest.mark.slow]

STEPS, BATCH, SIGMA = (
    4,
    4096,
    4.0,
)  # batch > users: q = 1 on every channel, so one ε target separates round 2 from round 3


# the tiny world's δ (1e-4) is above the built-in policy's max-delta (1e-5)
POLICY = NodePolicy(max_delta=1e-4)


def _spending(run_dir: Path, channel: str) -> list[dict]:
    """A node's ledger lines about spending (its evaluations apart)."""
    lines = hashlog.read(run_dir / "nodes" / channel / "privacy-ledger.jsonl")
    return [e for e in lines if e["status"] != "evaluated"]


def _users_per_channel(data: Path, channels: tuple[str, ...]) -> dict[str, int]:
    from fedrec.client.training import leave_last_out
    from fedrec.shared.data import to_sequences
    from fedrec.shared.datasets import load_channel

    out = {}
    for ch in channels:
        split = leave_last_out(to_sequences(load_channel(data, ch)[1]))
        out[ch] = int((split.train.lengths() >= 2).sum())
    return out


def _budget_between_round_2_and_3(users: dict[str, int]) -> float:
    """A target ε that every channel meets after 2 rounds and exceeds in round 3."""
    after = {
        r: [
            privacy.epsilon_of([(SIGMA, privacy.sample_rate_for(n, BATCH), r * STEPS)], 1e-4, "rdp")
            for n in users.values()
        ]
        for r in (2, 3)
    }
    target = max(after[2]) * 1.001
    assert min(after[3]) > target, f"no ε separates round 2 from 3: {after}"
    return target


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fed")
    return write_small_world(root / "world"), save_tiny_bert(root / "bert")


def _config(
    world: tuple[Path, Path],
    run_dir: Path,
    rounds: int,
    target: float,
    resume: bool,
    **more: object,
) -> FedrecConfig:
    data, bert = world
    return from_run_config(
        {
            # the budget above counts DP-SGD only: the item prior's release is tested below
            "model.item-prior": "none",
            "num-server-rounds": rounds,
            "data-dir": str(data),
            "run-dir": str(run_dir),
            "cache-dir": str(run_dir.parent / "cache"),
            "encoder-dir": str(bert),
            "resume": resume,
            "train.local-steps": STEPS,
            "train.batch-size": BATCH,
            "train.negatives": 20,
            "dp.noise-multiplier": SIGMA,
            "dp.accountant": "rdp",  # the expected ε above is RDP's
            "dp.target-epsilon": target,
            "dp.target-delta": 1e-4,
            "eval.max-users": 100,
            "model.dim": 16,
            "round-timeout": 300.0,
            **more,
        }
    )


def test_flower_overhead_is_phase_wall_minus_the_slowest_node(tmp_path: Path) -> None:
    # Prepare: server timings for 2 rounds; two nodes' own handler times (hand-made)
    timing = {"train-seconds": 10.0, "evaluate-seconds": 2.0}
    lines = [
        {"round": r, "channel": "server", "phase": "timing", "metrics": timing} for r in (1, 2)
    ]
    lines.append({"round": 1, "channel": "a", "phase": "evaluate", "metrics": {"ndcg@10": 0.1}})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    for node, train, ev in (("a", 9.5, 1.0), ("b", 7.0, 1.5)):
        (tmp_path / "nodes" / node).mkdir(parents=True)
        rows = [
            {"round": r, "phase": p, "seconds": t}
            for r in (1, 2)
            for p, t in (("train", train), ("evaluate", ev))
        ]
        (tmp_path / "nodes" / node / "timings.jsonl").write_text(
            "\n".join(json.dumps(x) for x in rows)
        )

    # Execute
    rounds = flower_overhead(tmp_path)

    # Assert: (10 - 9.5) + (2 - 1.5) = 1.0 s per round
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["train_slowest_node"] == 9.5 and rounds[0]["evaluate_slowest_node"] == 1.5
    assert all(r["overhead"] == pytest.approx(1.0) for r in rounds)


def test_two_rounds_then_resume_refuses_past_budget(
    world: tuple[Path, Path], tmp_path: Path
) -> None:
    # Prepare
    channels = FedrecConfig().channels
    users = _users_per_channel(world[0], channels)
    target = _budget_between_round_2_and_3(users)
    run_dir = tmp_path / "run"

    # Execute: 2 rounds
    run_simulation(
        run_dir, _config(world, run_dir, 2, target, False).to_run_config(), 3, node_policy=POLICY
    )

    # Assert: metrics per channel per round, ε rising per channel, clean egress, checkpoint
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {(x["round"], x["channel"]) for x in lines if x["phase"] == "evaluate"}
    assert evals == {(r, ch) for r in (1, 2) for ch in channels}
    ledger = [e for e in hashlog.read(run_dir / "privacy-ledger.jsonl") if e["status"] == "trained"]
    for ch in channels:
        eps = [e["epsilon"] for e in sorted(ledger, key=lambda e: e["round"]) if e["channel"] == ch]
        assert len(eps) == 2 and 0 < eps[0] < eps[1] <= target
    shapes = json.loads((run_dir / "model.json").read_text())["param_shapes"]
    egress = hashlog.read(run_dir / "egress.jsonl")
    assert {e["kind"] for e in egress} == {"train", "evaluate"}
    for entry in egress:
        allowed = wire.ALLOWLIST[entry["kind"]]
        assert entry["violations"] == []
        assert set(entry["records"]) <= set(allowed)
        for name, rec in entry["records"].items():
            if rec["type"] == "arrays":
                got = {k: v["shape"] for k, v in rec["arrays"].items()}
                assert got == shapes  # exactly the model: no user-sized array can pass
                assert all(v["shape"][0] not in users.values() for v in rec["arrays"].values())
            else:
                assert set(rec["values"]) <= set(allowed[name][1])
    results = json.loads((run_dir / "results.json").read_text())
    assert hashlog.verify(run_dir / "egress.jsonl", results["log_heads"]["egress.jsonl"]).ok
    assert (run_dir / "checkpoints" / "round-0002.safetensors").exists()
    assert processes_with_env("FLWR_HOME", str(run_dir / ".flwr")) == []
    # every round's phases were timed by the server and by each node (on the node's disk)
    rounds = flower_overhead(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        for phase in ("train", "evaluate"):
            assert 0 < r[f"{phase}_slowest_node"] <= r[f"{phase}_wall"]

    # Execute: resume to 3 rounds in a fresh simulation (fresh context.state)
    run_simulation(
        run_dir, _config(world, run_dir, 3, target, True).to_run_config(), 3, node_policy=POLICY
    )

    # Assert: round 3 refused on every channel; nodes' ledgers kept their 2 rounds of steps
    round3 = [e for e in hashlog.read(run_dir / "privacy-ledger.jsonl") if e["round"] == 3]
    assert {e["channel"] for e in round3} == set(channels)
    assert all(e["status"] == "refused" and "privacy-refused" in e["reason"] for e in round3)
    for ch in channels:
        node = _spending(run_dir, ch)
        assert [e["status"] for e in node] == ["trained", "trained", "refused"]
        assert sum(int(s) for _, _, s in node[-2]["history"]) == 2 * STEPS
        assert "privacy budget" in node[-1]["reason"]
    assert not (run_dir / "checkpoints" / "round-0003.safetensors").exists()
    assert np.isfinite(json.loads((run_dir / "results.json").read_text())["wall_seconds"])


def test_the_item_prior_is_released_once_accounted_and_audited(
    world: tuple[Path, Path], tmp_path: Path
) -> None:
    # Prepare: σ planned for the release and the DP-SGD steps together
    from fedrec.audit.accounting import audit_accounting
    from fedrec.client.ledger import RELEASED, TRAINED

    run_dir = tmp_path / "run"
    cfg = _config(
        world,
        run_dir,
        2,
        4.0,
        False,
        **{
            "model.item-prior": "popularity",
            "dp.noise-multiplier": -1.0,
            "train.personal-mix": 0.5,
        },
    )

    # Execute
    run_simulation(run_dir, cfg.to_run_config(), 3, node_policy=POLICY)

    # Assert: each node released once (first), then trained twice, within the target
    from safetensors.numpy import load_file

    ledger = hashlog.read(run_dir / "privacy-ledger.jsonl")
    final = load_file(run_dir / "checkpoints" / "round-0002.safetensors")
    for ch in cfg.channels:
        node = _spending(run_dir, ch)
        assert [e["status"] for e in node] == [RELEASED, TRAINED, TRAINED]
        sigma_p = node[0]["releases"][0][0]
        assert node[-1]["history"][0] == [sigma_p, 1.0, 1] and sigma_p > 0
        assert sum(n for _, _, n in node[-1]["history"]) == 2 * STEPS + 1
        assert list((run_dir / "nodes" / ch).glob("item-prior-run*.npy"))
        # personalisation: the node kept its own last shared weights, not the federation's
        (kept,) = (run_dir / "nodes" / ch).glob("personal-run*.npz")
        with np.load(kept) as own:
            assert set(own.files) == {"profile_lin.weight"}
            assert not np.allclose(own["profile_lin.weight"], final["profile_lin.weight"])
        mine = sorted((e for e in ledger if e["channel"] == ch), key=lambda e: e["round"])
        assert [e[wire.PRIOR_RELEASES] for e in mine] == [1, 1]
        assert [e[wire.TOTAL_STEPS] for e in mine] == [STEPS, 2 * STEPS]  # steps, not events
        assert 0 < mine[0]["epsilon"] < mine[1]["epsilon"] <= 4.0
    # the audit rebuilds the release into each history and agrees with every logged ε
    nodes = {
        ch: hashlog.read(run_dir / "nodes" / ch / "privacy-ledger.jsonl") for ch in cfg.channels
    }
    result = audit_accounting(
        ledger, cfg.to_run_config(), channels=cfg.channels, node_ledgers=nodes
    )
    assert result["problems"] == [], result["problems"]

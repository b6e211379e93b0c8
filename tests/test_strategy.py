"""The recording strategy on hand-made replies: what it aggregates, what it refuses, and what
it writes (privacy ledger, egress log, checkpoints). No Flower engine needed."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrec.server.rundir import RunDir
from fedrec.server.strategy import claim_refusal, make_strategy, pool_heads, run_failure
from fedrec.shared import hashlog, wire
from fedrec.shared.config import FedrecConfig, StrategyConfig

SHAPES = {"w": (2, 2), "b": (2,)}


@pytest.fixture(autouse=True)
def _identity() -> None:
    # Messages need a run/node identity; a ServerApp gets one from Flower.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _reply(node: int, content: RecordDict | Error) -> Message:
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type="train"))


def _train(channel: str, value: float, users: int, extra: dict | None = None) -> RecordDict:
    content = wire.build_reply(
        "train",
        param_shapes=SHAPES,
        arrays={"w": np.full((2, 2), value, np.float32), "b": np.full(2, value, np.float32)},
        metrics={wire.TRAIN_LOSS: 1.0, wire.NUM_EXAMPLES: users},
        privacy={wire.EPSILON: 1.5, wire.STEPS: 10, wire.DP_ENABLED: True},
        info={wire.CHANNEL: channel},
    )
    for name, record in (extra or {}).items():
        content[name] = record
    return content


def _strategy(tmp_path):
    strategy = make_strategy(FedrecConfig(min_nodes=1))
    nodes = {1: ("ecommerce", 0), 2: ("finance", 0), 3: ("social", 0), 4: ("travel", 0)}
    strategy.setup_recording(RunDir(tmp_path / "run"), SHAPES, nodes)
    return strategy


def test_weighted_average_of_clean_replies_and_a_checkpoint(tmp_path) -> None:
    # Prepare: weights 1 (100 users) and 4 (300 users) -> (1*100 + 4*300) / 400 = 3.25
    strategy = _strategy(tmp_path)
    replies = [_reply(1, _train("ecommerce", 1.0, 100)), _reply(2, _train("finance", 4.0, 300))]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    assert np.allclose(arrays["w"].numpy(), 3.25)
    assert (tmp_path / "run" / "checkpoints" / "round-0001.safetensors").exists()


def test_reply_outside_the_allowlist_is_not_aggregated_but_logged(tmp_path) -> None:
    # Prepare: finance smuggles a per-user record in an extra ConfigRecord
    strategy = _strategy(tmp_path)
    bad = _train("finance", 100.0, 100, {"users": ConfigRecord({"ids": "u1,u2"})})
    replies = [_reply(1, _train("ecommerce", 1.0, 100)), _reply(2, bad)]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: the average ignores finance; the egress log and ledger say why
    assert np.allclose(arrays["w"].numpy(), 1.0)
    egress = hashlog.read(tmp_path / "run" / "egress.jsonl")
    assert any("'users' is not allowed" in v for e in egress for v in e["violations"])
    ledger = {e["channel"]: e for e in hashlog.read(tmp_path / "run" / "privacy-ledger.jsonl")}
    assert ledger["finance"]["status"] == "rejected" and ledger["finance"][wire.EPSILON] == 1.5


def test_refusal_and_missing_channels_are_recorded(tmp_path) -> None:
    # Prepare: finance refuses (budget), social fails, travel does not answer
    strategy = _strategy(tmp_path)
    replies = [
        _reply(1, _train("ecommerce", 1.0, 100)),
        _reply(2, Error(code=wire.REFUSED_CODE, reason="privacy-refused: budget")),
        _reply(3, Error(code=1, reason="boom")),
    ]

    # Execute
    strategy.aggregate_train(1, replies)

    # Assert
    status = {
        e["channel"]: e["status"] for e in hashlog.read(tmp_path / "run" / "privacy-ledger.jsonl")
    }
    assert status == {
        "ecommerce": "trained",
        "finance": "refused",
        "social": "failed",
        "travel": "missing",
    }
    assert hashlog.verify(tmp_path / "run" / "privacy-ledger.jsonl").ok


def test_array_with_another_shape_is_rejected(tmp_path) -> None:
    # Prepare: a (5000, 2) "weight" would carry per-user rows
    strategy = _strategy(tmp_path)
    content = _train("ecommerce", 1.0, 100)
    content[wire.ARRAYS]["w"] = content[wire.ARRAYS]["w"].__class__(np.zeros((5000, 2), np.float32))

    # Execute
    arrays, _ = strategy.aggregate_train(1, [_reply(1, content)])

    # Assert
    assert arrays is None
    entry = hashlog.read(tmp_path / "run" / "egress.jsonl")[0]
    assert any("shape (5000, 2)" in v for v in entry["violations"])


def test_list_valued_metric_is_rejected_not_aggregated(tmp_path) -> None:
    # Prepare: finance sends its example count as a list (per-example values would fit there)
    strategy = _strategy(tmp_path)
    bad = _train(
        "finance",
        100.0,
        100,
        {wire.METRICS: MetricRecord({wire.TRAIN_LOSS: 1.0, wire.NUM_EXAMPLES: [60, 40]})},
    )
    replies = [_reply(1, _train("ecommerce", 1.0, 100)), _reply(2, bad)]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: the average is ecommerce's alone; the egress log says why finance was refused
    assert np.allclose(arrays["w"].numpy(), 1.0)
    egress = {e["channel"]: e for e in hashlog.read(tmp_path / "run" / "egress.jsonl")}
    assert egress["finance"]["violations"] == [
        "train reply: metrics.num-examples is a list, not a scalar (per-example values?)"
    ]


def test_build_reply_refuses_a_list_valued_metric() -> None:
    with pytest.raises(wire.EgressViolation, match="hr@10 is a list"):
        wire.build_reply("evaluate", metrics={wire.HR10: [1, 0, 1]}, info={wire.CHANNEL: "x"})


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("fedavg", "RecordingFedAvg"),
        ("fedavgm", "RecordingFedAvgM"),
        ("fedadam", "RecordingFedAdam"),
        ("fedprox", "RecordingFedProx"),
    ],
)
def test_config_selects_the_strategy(name: str, cls: str) -> None:
    # Prepare / Execute
    strategy = make_strategy(FedrecConfig(strategy=StrategyConfig(name=name)))

    # Assert
    assert type(strategy).__name__ == cls


def test_pool_heads_averages_each_head_over_its_own_platform_only() -> None:
    # Prepare: two ecommerce shards (weights 1, 3), one finance reply; social sent nothing.
    current = {
        "profile_lin.weight": np.zeros(2),
        "heads.ecommerce.bias": np.zeros(2),
        "heads.finance.bias": np.zeros(2),
        "heads.social.bias": np.full(2, 7.0),
    }

    def arrays(value: float) -> dict[str, np.ndarray]:
        return {k: np.full(2, value) for k in current}

    replies = [("ecommerce", 1.0, arrays(1.0)), ("ecommerce", 3.0, arrays(5.0))]
    replies.append(("finance", 10.0, arrays(-2.0)))

    # Execute
    pooled = pool_heads(replies, current)

    # Assert: (1*1 + 3*5) / 4 = 4 for ecommerce's head, finance's own value, social unchanged;
    # the shared tower is left to the strategy.
    assert set(pooled) == {"heads.ecommerce.bias", "heads.finance.bias", "heads.social.bias"}
    assert np.allclose(pooled["heads.ecommerce.bias"], 4.0)
    assert np.allclose(pooled["heads.finance.bias"], -2.0)
    assert np.allclose(pooled["heads.social.bias"], 7.0)


def test_a_platform_head_is_not_diluted_by_the_other_platforms(tmp_path) -> None:
    # Prepare: a shared tower "w" and a head per platform; each platform changes only its own
    # head (the others come back as sent), as a client training the tower and its head does.
    shapes = {"w": (2,), "heads.ecommerce.b": (2,), "heads.finance.b": (2,)}
    strategy = make_strategy(FedrecConfig(min_nodes=1))
    strategy.setup_recording(
        RunDir(tmp_path / "run"), shapes, {1: ("ecommerce", 0), 2: ("finance", 0)}
    )
    from flwr.app import Array, ArrayRecord

    strategy.current = ArrayRecord({k: Array(np.zeros(2, np.float32)) for k in shapes})

    def reply(channel: str, value: float, users: int) -> RecordDict:
        arrays = {k: np.zeros(2, np.float32) for k in shapes}
        arrays["w"][:] = value
        arrays[f"heads.{channel}.b"][:] = value
        return wire.build_reply(
            "train",
            param_shapes=shapes,
            arrays=arrays,
            metrics={wire.TRAIN_LOSS: 1.0, wire.NUM_EXAMPLES: users},
            privacy={wire.EPSILON: 1.5, wire.STEPS: 10, wire.DP_ENABLED: True},
            info={wire.CHANNEL: channel},
        )

    # Execute: ecommerce (300 users) moves to 1, finance (100 users) to 4.
    arrays, _ = strategy.aggregate_train(
        1, [_reply(1, reply("ecommerce", 1.0, 300)), _reply(2, reply("finance", 4.0, 100))]
    )

    # Assert: the tower is the weighted mean (1*300 + 4*100) / 400 = 1.75; each head is its
    # own platform's value, where plain FedAvg would give finance's head 4*100/400 = 1.
    assert np.allclose(arrays["w"].numpy(), 1.75)
    assert np.allclose(arrays["heads.ecommerce.b"].numpy(), 1.0)
    assert np.allclose(arrays["heads.finance.b"].numpy(), 4.0)


# ---------------------------------------------------------------------------------------------
# Who may serve a channel (issue #16): one node per channel and shard, and node-channels

CHANNELS = ("ecommerce", "finance", "social")


def test_second_node_claiming_a_served_channel_is_refused() -> None:
    # Prepare: node 11 serves finance; node 99 (another registered key) claims it too
    served = {11: ("finance", 0)}

    # Execute
    reason = claim_refusal(99, ("finance", 0), served, CHANNELS, {})

    # Assert
    assert reason == "node 99 claims 'finance', which node 11 already serves in this run"


@pytest.mark.parametrize(
    ("node", "claim"),
    [(11, ("finance", 0)), (99, ("finance", 1)), (99, ("social", 0))],
    ids=["same node again", "another shard", "another channel"],
)
def test_claims_that_do_not_collide_are_admitted(node: int, claim: tuple[str, int]) -> None:
    assert claim_refusal(node, claim, {11: ("finance", 0)}, CHANNELS, {}, shards=2) is None


def test_a_second_node_cannot_claim_a_channel_again_under_a_shard_the_run_lacks() -> None:
    # Execute: one node per channel (a deployment), and another key claims finance's shard 1
    reason = claim_refusal(99, ("finance", 1), {11: ("finance", 0)}, CHANNELS, {})

    # Assert
    assert reason == "node 99 claims shard 1 of 'finance'; this run has 1 per channel"


@pytest.mark.parametrize(
    ("node", "claim", "expected"),
    [
        (
            12,
            ("finance", 0),
            "node 12 claims channel 'finance' but node-channels binds it to 'social'",
        ),
        (99, ("finance", 0), "node 99 claims channel 'finance' but node-channels binds no channel"),
        (11, ("travel", 0), "node 11 claims channel 'travel', which this run does not have"),
        (11, None, "node 11 did not say which channel and shard it serves"),
    ],
    ids=["bound elsewhere", "unbound key", "unknown channel", "no claim"],
)
def test_claims_against_the_binding_are_refused(node, claim, expected) -> None:
    # Prepare: node-channels = "11=finance,12=social"
    bindings = {11: "finance", 12: "social"}

    # Execute
    reason = claim_refusal(node, claim, {}, CHANNELS, bindings)

    # Assert
    assert reason is not None and reason.startswith(expected), reason


def test_a_bound_node_is_admitted_to_its_channel() -> None:
    assert claim_refusal(11, ("finance", 0), {}, CHANNELS, {11: "finance"}) is None


def test_run_in_which_nobody_trained_fails_with_each_reason() -> None:
    # Prepare: 2 rounds, every platform refused or missing; one impostor key refused
    status = {
        1: {"ecommerce": "refused", "finance": "failed"},
        2: {"ecommerce": "refused", "finance": "missing"},
    }
    reasons = {
        "ecommerce": "privacy-refused: privacy budget: 4 more steps would take ε past 1.0",
        "finance": "no reply (node down or timed out)",
    }

    # Execute
    failure = run_failure(status, reasons, {99: "node 99 claims 'finance', which node 11 ..."})

    # Assert: one line, the last status of each platform and why
    assert failure == (
        "no platform trained in any of the 2 round(s): "
        "ecommerce refused (privacy-refused: privacy budget: 4 more steps would take ε past 1.0); "
        "finance missing (no reply (node down or timed out)); "
        "node 99 refused (node 99 claims 'finance', which node 11 ...)"
    )


def test_a_traceback_reason_is_cut_to_its_exception_line() -> None:
    # Prepare: a ClientApp exception as Flower reports it, over several lines
    reason = "<class 'ValueError'>:<'Traceback (most recent call last):\n  File x\nValueError: no users'>"

    # Execute
    failure = run_failure({1: {"shop": "failed"}}, {"shop": reason}, {})

    # Assert
    assert failure is not None and failure.endswith("shop failed (ValueError: no users'>)")
    assert "\n" not in failure


def test_one_platform_trained_once_is_not_a_failed_run() -> None:
    status = {1: {"a": "refused", "b": "ok"}, 2: {"a": "refused", "b": "refused"}}
    assert run_failure(status, {}, {}) is None


def test_no_admitted_node_fails_before_any_round() -> None:
    failure = run_failure({}, {}, {7: "node 7 claims channel 'x', which this run does not have"})
    assert failure is not None and failure.startswith("no node may serve a channel")


class _Grid:
    """The part of Flower's Grid that configure_train uses: the connected node ids."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return self.ids


def test_rounds_go_only_to_admitted_nodes_and_late_nodes_are_hand_shaken(tmp_path) -> None:
    # Prepare: node 1 admitted at the start; 9 (refused then) and 5 (joins later, admitted)
    asked: list[list[int]] = []

    def admit(ids: list[int]):
        asked.append(ids)
        return {5: ("finance", 0)}, {}

    strategy = make_strategy(FedrecConfig(min_nodes=1))
    strategy.setup_recording(
        RunDir(tmp_path / "run"),
        SHAPES,
        {1: ("ecommerce", 0)},
        refused_nodes={9: "node 9 claims 'ecommerce', which node 1 already serves"},
        admit=admit,
    )
    from flwr.app import ArrayRecord

    # Execute
    sent = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid([1, 5, 9]))

    # Assert: only the new node was asked; the refused one gets no round
    assert asked == [[5]]
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 5]


def _round(strategy, server_round: int, arrays, values: tuple[float, float]):
    """One train round: ecommerce and finance (100 and 300 users) reply the given values."""
    from flwr.app import ArrayRecord

    strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid([1, 2]))
    replies = [
        _reply(1, _train("ecommerce", values[0], 100)),
        _reply(2, _train("finance", values[1], 300)),
    ]
    new, _ = strategy.aggregate_train(server_round, replies)
    return ArrayRecord(dict(new.items()))


ROUNDS = [(1.0, 2.0), (0.5, -1.0), (3.0, 0.25)]  # (ecommerce, finance) reply values per round


def _stateful(name: str):
    """FedAdam as the run config makes it; FedAvgM with momentum (the run config's has none)."""
    from fedrec.server.strategy import RecordingFedAvgM

    if name == "fedavgm":
        return RecordingFedAvgM(
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            server_learning_rate=0.5,
            server_momentum=0.9,
        )
    return make_strategy(FedrecConfig(min_nodes=1, strategy=StrategyConfig(name=name)))


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_a_resumed_strategy_continues_with_the_saved_state(tmp_path, name: str) -> None:
    # Prepare: one run of 3 rounds; another stopped after 2 (its state and checkpoint saved)
    from flwr.app import Array, ArrayRecord

    nodes = {1: ("ecommerce", 0), 2: ("finance", 0)}
    zeros = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    whole = _stateful(name)
    whole.setup_recording(RunDir(tmp_path / "whole"), SHAPES, dict(nodes))
    arrays = zeros
    for r, values in enumerate(ROUNDS, start=1):
        arrays = _round(whole, r, arrays, values)
    stopped = _stateful(name)
    stopped.setup_recording(RunDir(tmp_path / "stopped"), SHAPES, dict(nodes))
    part = zeros
    for r, values in enumerate(ROUNDS[:2], start=1):
        part = _round(stopped, r, part, values)

    # Execute: a new strategy resumes from the stopped run's directory, as the ServerApp does
    run = RunDir(tmp_path / "stopped")
    round_, saved = run.last_checkpoint(SHAPES)
    resumed = _stateful(name)
    resumed.setup_recording(run, SHAPES, dict(nodes), round_offset=round_)
    restored = resumed.resume_state(run, round_, SHAPES)
    initial = ArrayRecord({k: Array(v) for k, v in saved.items()})
    after = _round(resumed, 1, initial, ROUNDS[2])
    fresh = _stateful(name)  # control: the same resume without the saved state
    fresh.setup_recording(RunDir(tmp_path / "fresh"), SHAPES, dict(nodes), round_offset=round_)
    without = _round(fresh, 1, initial, ROUNDS[2])

    # Assert: the state was saved per round; the resumed round equals the uninterrupted one
    assert restored and round_ == 2
    assert (tmp_path / "stopped" / "server-state" / "round-0002.safetensors").exists()
    for k in SHAPES:
        assert np.allclose(after[k].numpy(), arrays[k].numpy(), rtol=0, atol=1e-6), k
    assert any(not np.allclose(without[k].numpy(), arrays[k].numpy()) for k in SHAPES)
    assert resumed.server_state().keys() == whole.server_state().keys()
    for k, v in whole.server_state().items():
        assert np.allclose(resumed.server_state()[k], v, rtol=0, atol=1e-6), k


def test_fedavg_keeps_no_server_state(tmp_path) -> None:
    # Prepare
    from flwr.app import Array, ArrayRecord

    strategy = _strategy(tmp_path)
    zeros = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})

    # Execute
    _round(strategy, 1, zeros, ROUNDS[0])

    # Assert: a checkpoint, and no state file (nothing to continue)
    assert strategy.server_state() == {} and strategy.server_state_shapes(SHAPES) == {}
    assert (tmp_path / "run" / "checkpoints" / "round-0001.safetensors").exists()
    assert not (tmp_path / "run" / "server-state").exists()


def test_a_saved_state_of_another_strategy_is_refused(tmp_path) -> None:
    # Prepare: a FedAdam run's state after round 1
    from flwr.app import Array, ArrayRecord

    from fedrec.server.rundir import RunDirError

    adam = _stateful("fedadam")
    adam.setup_recording(RunDir(tmp_path / "run"), SHAPES, {1: ("ecommerce", 0)})
    zeros = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    _round(adam, 1, zeros, ROUNDS[0])
    avgm = _stateful("fedavgm")

    # Execute / Assert: resuming it with FedAvgM names both and the fix
    with pytest.raises(RunDirError, match="written by strategy 'fedadam'.*resume with strategy"):
        avgm.resume_state(RunDir(tmp_path / "run"), 1, SHAPES)


def test_each_round_tells_every_node_the_ledger_head_it_reported_last(tmp_path) -> None:
    # Prepare: round 1's replies report their nodes' ledger heads
    from flwr.app import ArrayRecord

    strategy = _strategy(tmp_path)
    heads = {"ecommerce": "a" * 64, "finance": "b" * 64}
    replies = [
        _reply(n, _train(ch, 1.0, 100, {wire.PRIVACY: ConfigRecord({wire.LEDGER_HEAD: h})}))
        for n, (ch, h) in enumerate(heads.items(), start=1)
    ]
    strategy.aggregate_train(1, replies)

    # Execute: round 2, also by a fresh strategy on the same run dir (a resumed server)
    sent = strategy.configure_train(2, ArrayRecord(), ConfigRecord(), _Grid([1, 2]))
    resumed = _strategy(tmp_path)
    again = resumed.configure_train(2, ArrayRecord(), ConfigRecord(), _Grid([1, 2]))

    # Assert
    for msg in [*sent, *again]:
        config = msg.content[wire.CONFIG]
        assert {ch: config[f"{wire.LEDGER_HEAD}.{ch}"] for ch in heads} == heads

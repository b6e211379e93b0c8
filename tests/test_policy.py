"""The node's privacy policy against a server that asks for more: every request is sent to the
real ClientApp (``fedrec.client.app.app``) as Flower messages, on a small dataset, and each
refusal must be an error reply that says why, a ``refused`` line in the node's ledger, and
nothing trained or sent. Then the ledger's tamper cases, and the policy file itself."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrec.client import app as client_app
from fedrec.client.ledger import LEDGER, LedgerError, NodeLedger, reset
from fedrec.client.noise import SOURCE_SECURE
from fedrec.shared import hashlog, wire
from fedrec.shared.config import FedrecConfig, from_run_config
from fedrec.shared.model import build_model
from fedrec.shared.policy import NodePolicy, PolicyError, load_policy, parse_policy, write_policy

CHANNEL = "shop"
ITEM_DIM = 32


@pytest.fixture(autouse=True)
def _identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedrec.simulations.bench.quality import write_tiny_dataset

    return write_tiny_dataset(
        tmp_path_factory.mktemp("data") / "tiny", channels=(CHANNEL,), users=150, items=48
    )


def run_config(run_dir: str = "/runs/a", **overrides: Any) -> dict[str, Any]:
    return {
        "channels": CHANNEL,
        "run-dir": run_dir,
        "num-server-rounds": 3,
        "train.local-steps": 2,
        "train.batch-size": 64,
        "model.dim": 16,
        "model.item-prior": "none",
        "eval.max-users": 40,
        "dp.accountant": "rdp",  # faster to plan than PRV; the policy checks are the same
        **overrides,
    }


@dataclass
class Node:
    """One platform's node: its data, its state dir, its policy file, and the ClientApp."""

    data: Path
    state: Path
    policy: NodePolicy = field(default_factory=NodePolicy)

    def __post_init__(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        write_policy(self.state.parent / "policy.toml", self.policy)
        rng = np.random.default_rng(0)
        matrix = rng.normal(size=(48, ITEM_DIM)).astype(np.float32)
        self.matrix = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
        self.fingerprint = hashlib.sha256(self.matrix.tobytes()).hexdigest()

    def context(self, config: dict[str, Any]) -> Context:
        node_config = {
            "channel": CHANNEL,
            "data-dir": str(self.data),
            "state-dir": str(self.state),
            "policy": str(self.state.parent / "policy.toml"),
        }
        return Context(
            run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=config
        )

    def send(
        self,
        kind: str,
        config: dict[str, Any],
        round_: int = 1,
        fingerprint: str = "",
        extra: dict[str, str] | None = None,
    ) -> Message:
        """One server message of ``kind`` (``train``/``evaluate``) through the ClientApp."""
        context = self.context(config)
        cfg = from_run_config(config)
        fp = fingerprint or self.fingerprint
        items = RecordDict(
            {
                wire.CONFIG: ConfigRecord({wire.ITEMS_FINGERPRINT: fp}),
                wire.ITEMS: ArrayRecord({wire.ITEMS: Array(self.matrix)}),
            }
        )
        if not fingerprint:
            client_app.app(Message(items, dst_node_id=1, message_type="query.items"), context)
        model = build_model(cfg, ITEM_DIM)
        arrays = {k: Array(v.detach().numpy()) for k, v in model.state_dict().items()}
        content = RecordDict(
            {
                wire.ARRAYS: ArrayRecord(arrays),
                wire.CONFIG: ConfigRecord(
                    {
                        wire.SERVER_ROUND: round_,
                        f"{wire.ITEMS_FINGERPRINT}.{CHANNEL}": fp,
                        **(extra or {}),
                    }
                ),
            }
        )
        return client_app.app(Message(content, dst_node_id=1, message_type=kind), context)

    def ledger(self) -> list[dict[str, Any]]:
        return hashlog.read(self.state / LEDGER)

    def trained(self) -> list[dict[str, Any]]:
        return [e for e in self.ledger() if e["status"] == "trained"]


def refused(reply: Message, *needles: str) -> str:
    assert reply.has_error(), "the node answered instead of refusing"
    assert reply.error.code == wire.REFUSED_CODE, reply.error
    reason = reply.error.reason or ""
    for needle in needles:
        assert needle in reason, reason
    return reason


@pytest.fixture
def make_node(dataset: Path, tmp_path: Path) -> Callable[..., Node]:
    def make(name: str = "node", **policy: Any) -> Node:
        return Node(dataset, tmp_path / name / "state", NodePolicy(**policy))

    return make


# ------------------------------------------------------------------ requests the policy refuses

# (case id, policy keys, run-config overrides, words the refusal must hold)
REQUESTS = [
    ("dp-off", {}, {"dp.enabled": False}, ["requires DP"]),
    ("delta-above-max", {}, {"dp.target-delta": 1e-3}, ["max-delta"]),
    ("accountant-not-allowed", {"accountants": ["prv"]}, {"dp.accountant": "rdp"}, ["accountant"]),
    ("sigma-below-min", {}, {"dp.noise-multiplier": 0.3}, ["min-noise-multiplier 0.5"]),
    (
        "planned-sigma-below-min",
        {"lifetime-epsilon": 1e6, "min-noise-multiplier": 2.0},
        {"dp.target-epsilon": 50.0},
        ["planned noise multiplier", "min-noise-multiplier 2"],
    ),
    ("sample-rate-above-max", {"max-sample-rate": 0.2}, {}, ["max-sample-rate 0.2"]),
    ("canaries", {}, {"audit.canaries": 10}, ["canaries"]),
    ("noise-off", {}, {"audit.disable-noise": True}, ["without noise"]),
    (
        "noise-off-with-canaries-allowed",
        {"allow-canaries": True},
        {"audit.canaries": 10, "audit.disable-noise": True},
        ["without noise"],
    ),
    (
        "fixed-sigma-past-lifetime",
        {"lifetime-epsilon": 0.5},
        {"dp.noise-multiplier": 0.6, "dp.target-epsilon": 1e4},
        ["lifetime privacy budget", "lifetime-epsilon 0.5"],
    ),
]


@pytest.mark.parametrize(
    ("policy", "overrides", "needles"),
    [case[1:] for case in REQUESTS],
    ids=[case[0] for case in REQUESTS],
)
def test_a_request_outside_the_policy_is_refused_recorded_and_nothing_trained(
    make_node: Callable[..., Node],
    policy: dict[str, Any],
    overrides: dict[str, Any],
    needles: list[str],
) -> None:
    # Prepare
    node = make_node(**{k.replace("-", "_"): v for k, v in policy.items()})

    # Execute
    reply = node.send("train", run_config(**overrides))

    # Assert: an error reply, a refused line with the reason, nothing trained or kept
    reason = refused(reply, *needles)
    lines = node.ledger()
    assert [(e["status"], e["kind"]) for e in lines] == [("refused", "train")]
    assert lines[0]["reason"] in reason
    assert not list(node.state.glob("optimizer-run*.pt"))


def test_the_same_requests_are_refused_for_evaluation(make_node: Callable[..., Node]) -> None:
    node = make_node()

    reply = node.send("evaluate", run_config(**{"dp.enabled": False}))

    refused(reply, "requires DP")
    assert [(e["status"], e["kind"]) for e in node.ledger()] == [("refused", "evaluate")]


def test_a_fingerprint_that_is_not_a_digest_is_refused(make_node: Callable[..., Node]) -> None:
    node = make_node()

    reply = node.send("train", run_config(), fingerprint="../../x")

    refused(reply, "not a sha256 hex digest")
    assert not (node.state.parent / "x.npy").exists() and not node.trained()


def test_a_run_is_refused_once_earlier_runs_spent_the_lifetime_budget(
    make_node: Callable[..., Node],
) -> None:
    # Prepare: a first run spends ε = 3; the operator then tightens the lifetime to 2
    node = make_node(lifetime_epsilon=8.0)
    first = run_config("/runs/first", **{"dp.target-epsilon": 3.0})
    for round_ in (1, 2, 3):
        assert not node.send("train", first, round_).has_error()
    spent = node.trained()[-1]["lifetime-epsilon"]
    write_policy(node.state.parent / "policy.toml", NodePolicy(lifetime_epsilon=2.0))

    # Execute: another run asks for its own ε
    reply = node.send("train", run_config("/runs/second", **{"dp.target-epsilon": 8.0}))

    # Assert: nothing is left for it
    assert 2.0 < spent <= 3.0 * (1 + 1e-6)
    refused(reply, "lifetime budget spent", "lifetime-epsilon 2")
    assert node.ledger()[-1]["status"] == "refused" and len(node.trained()) == 3


def test_a_second_run_is_planned_for_what_the_lifetime_has_left(
    make_node: Callable[..., Node],
) -> None:
    # Prepare: lifetime ε = 6; the first run spends its target ε = 3
    node = make_node(lifetime_epsilon=6.0)
    for round_ in (1, 2, 3):
        node.send("train", run_config("/runs/first", **{"dp.target-epsilon": 3.0}), round_)
    first = node.trained()[-1]

    # Execute: a second run asks for ε = 8 (more than is left)
    for round_ in (1, 2, 3):
        reply = node.send("train", run_config("/runs/second", **{"dp.target-epsilon": 8.0}), round_)
        assert not reply.has_error(), reply.error if reply.has_error() else ""
    second = node.trained()[-1]

    # Assert: its σ is larger than the run target alone needs, and the lifetime holds
    assert second["noise-multiplier"] > first["noise-multiplier"] * 0.5
    assert second["lifetime-epsilon"] <= 6.0 * (1 + 1e-6)
    assert second["epsilon"] < 8.0  # this run's own ε: what the lifetime left it


def test_evaluations_are_capped_per_run_and_for_the_nodes_lifetime(
    make_node: Callable[..., Node],
) -> None:
    # Prepare
    node = make_node(max_evaluations_per_run=2, max_evaluations=3)
    first = run_config("/runs/first")

    # Execute / Assert: two evaluations, then the run's cap
    assert not node.send("evaluate", first, 1).has_error()
    assert not node.send("evaluate", first, 2).has_error()
    refused(node.send("evaluate", first, 3), "evaluation cap", "max-evaluations-per-run 2")
    # another run gets one more, then the lifetime cap
    second = run_config("/runs/second")
    assert not node.send("evaluate", second, 1).has_error()
    refused(node.send("evaluate", second, 2), "evaluation cap", "max-evaluations 3")
    statuses = [e["status"] for e in node.ledger()]
    assert statuses == ["evaluated", "evaluated", "refused", "evaluated", "refused"]


def test_the_loss_stays_on_the_node_unless_the_policy_sends_it(
    make_node: Callable[..., Node],
) -> None:
    quiet = make_node("quiet").send("train", run_config())
    told = make_node("told", send_loss=True).send("train", run_config())

    assert wire.TRAIN_LOSS not in quiet.content[wire.METRICS]
    assert wire.TRAIN_LOSS in told.content[wire.METRICS]


def test_an_accepted_request_reports_the_policy_the_noise_source_and_the_ledger_head(
    make_node: Callable[..., Node],
) -> None:
    node = make_node()

    reply = node.send("train", run_config())

    report = reply.content[wire.PRIVACY]
    assert report[wire.POLICY] == node.policy.digest()
    assert report[wire.NOISE_SOURCE] == SOURCE_SECURE
    assert report[wire.LEDGER_HEAD] == hashlog.head(node.state / LEDGER)
    (line,) = node.trained()
    assert line["policy"] == node.policy.digest() and line["noise-source"] == SOURCE_SECURE
    # the sample rate is counted from the bucketed count (150 users -> 200): 1 / ceil(200/64)
    assert report[wire.SAMPLE_RATE] == 0.25


def test_a_policy_that_allows_the_audit_switches_accepts_them(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(allow_canaries=True, allow_noise_off=True)

    reply = node.send("train", run_config(**{"audit.canaries": 4, "audit.disable-noise": True}))

    assert not reply.has_error()


def test_without_dp_the_node_records_infinite_epsilon_and_refuses_dp_later(
    make_node: Callable[..., Node],
) -> None:
    # Prepare: a node whose operator allowed a run without DP
    node = make_node(dp_required=False)
    assert not node.send("train", run_config(**{"dp.enabled": False})).has_error()

    # Execute: a later DP run
    reply = node.send("train", run_config("/runs/later"))

    # Assert: its users have no guarantee left to spend
    assert node.trained()[0]["dp"] is False
    refused(reply, "lifetime budget spent")


# ------------------------------------------------------------------ the ledger, tampered


def _trained_node(make_node: Callable[..., Node], name: str = "node") -> Node:
    node = make_node(name)
    for round_ in (1, 2):
        assert not node.send("train", run_config(), round_).has_error()
    return node


def _rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


TAMPERS: dict[str, Callable[[Node, Node], None]] = {
    "deleted": lambda node, _: (node.state / LEDGER).unlink(),
    "truncated": lambda node, _: _rewrite(
        node.state / LEDGER, (node.state / LEDGER).read_text().splitlines()[:-1]
    ),
    "line-edited": lambda node, _: _rewrite(
        node.state / LEDGER,
        [
            line.replace('"steps": 2', '"steps": 1')
            for line in (node.state / LEDGER).read_text().splitlines()
        ],
    ),
    "reordered": lambda node, _: _rewrite(
        node.state / LEDGER, (node.state / LEDGER).read_text().splitlines()[::-1]
    ),
    "other-nodes-ledger": lambda node, other: shutil.copy(
        other.state / LEDGER, node.state / LEDGER
    ),
    "anchor-deleted": lambda node, _: (node.state / "privacy-ledger.head.json").unlink(),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_a_tampered_ledger_is_refused_at_the_node(
    make_node: Callable[..., Node], tamper: str
) -> None:
    # Prepare: two nodes that trained twice; one's ledger is tampered with
    node, other = _trained_node(make_node, "node"), _trained_node(make_node, "other")
    TAMPERS[tamper](node, other)
    path = node.state / LEDGER
    before = path.read_bytes() if path.exists() else None

    # Execute
    reply = node.send("train", run_config(), 3)

    # Assert: refused, saying what is wrong and how to recover; nothing appended
    refused(reply, "privacy ledger", "reset-ledger")
    assert (path.read_bytes() if path.exists() else None) == before


def test_the_node_checks_the_ledger_head_the_server_kept(
    make_node: Callable[..., Node],
) -> None:
    # Prepare: a node trained twice; the server kept the head its first reply reported
    node = make_node()
    first = node.send("train", run_config(), 1).content[wire.PRIVACY][wire.LEDGER_HEAD]
    last = node.send("train", run_config(), 2).content[wire.PRIVACY][wire.LEDGER_HEAD]
    key = f"{wire.LEDGER_HEAD}.{CHANNEL}"

    # Execute / Assert: heads the ledger holds are fine; one it does not hold is refused
    assert not node.send("train", run_config(), 3, extra={key: last}).has_error()
    assert not node.send("train", run_config(), 3, extra={key: first}).has_error()
    refused(node.send("train", run_config(), 3, extra={key: "f" * 64}), "no longer holds")


def test_a_keyed_anchor_refuses_a_ledger_rewritten_without_the_key(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    # Prepare: a node whose policy keys its anchor
    key = tmp_path / "ledger.key"
    key.write_text("k" * 64)
    node = make_node(ledger_key=str(key))
    node.send("train", run_config(), 1)
    node.send("train", run_config(), 2)
    # an attacker without the key drops the last line and re-anchors the shorter chain
    path = node.state / LEDGER
    _rewrite(path, path.read_text().splitlines()[:-1])
    anchor = json.loads((node.state / "privacy-ledger.head.json").read_text())
    anchor.update(head=hashlog.head(path), entries=anchor["entries"] - 1)
    (node.state / "privacy-ledger.head.json").write_text(json.dumps(anchor))

    # Execute / Assert
    refused(node.send("train", run_config(), 3), "not signed with this node's ledger-key")


def test_only_an_explicit_reset_starts_the_ledger_again(make_node: Callable[..., Node]) -> None:
    # Prepare: a node whose ledger was lost
    node = _trained_node(make_node)
    (node.state / LEDGER).unlink()
    refused(node.send("train", run_config(), 3), "missing")

    # Execute: the operator resets it, with a reason
    reset(node.state, CHANNEL, "disk lost on 2026-12-04; users re-consented")

    # Assert: training works again, and the ledger starts with the reset and its reason
    assert not node.send("train", run_config("/runs/after"), 1).has_error()
    first = node.ledger()[0]
    assert first["status"] == "reset" and "disk lost" in first["reason"]
    assert list(node.state.glob("privacy-ledger.head.json.reset-*"))


def test_the_operator_checks_and_resets_a_ledger_from_the_command_line(
    make_node: Callable[..., Node],
) -> None:
    from tests.tiny import fedrec_cli

    node = _trained_node(make_node)
    where = ["--state-dir", str(node.state), "--channel", CHANNEL]
    policy = ["--policy", str(node.state.parent / "policy.toml")]
    assert fedrec_cli(["node", "check-ledger", *where, *policy]).exit_code == 0
    (node.state / LEDGER).unlink()

    checked = fedrec_cli(["node", "check-ledger", *where, *policy])
    unconfirmed = fedrec_cli(["node", "reset-ledger", *where, "--reason", "lost disk"])
    confirmed = fedrec_cli(["node", "reset-ledger", *where, "--reason", "lost disk", "--yes"])

    assert checked.exit_code == 2 and "missing" in checked.output
    assert unconfirmed.exit_code == 2 and "--yes" in unconfirmed.output
    assert confirmed.exit_code == 0, confirmed.output
    assert node.ledger()[0]["status"] == "reset"
    assert fedrec_cli(["node", "check-ledger", *where, *policy]).exit_code == 0


def test_fedrec_node_policy_prints_a_file_that_loads_back(tmp_path: Path) -> None:
    from tests.tiny import fedrec_cli

    shown = fedrec_cli(["node", "policy"])
    (tmp_path / "p.toml").write_text(shown.output)

    assert shown.exit_code == 0
    assert load_policy(tmp_path / "p.toml").to_dict() == NodePolicy().to_dict()


def test_a_reset_needs_a_reason(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="--reason"):
        reset(tmp_path, CHANNEL, "  ")


def test_a_ledger_that_extends_its_anchor_is_accepted(tmp_path: Path) -> None:
    # A crash between the append and the anchor's rewrite leaves more spending on record.
    ledger = NodeLedger(tmp_path / LEDGER, CHANNEL)
    ledger.append({"run": "r", "round": 1, "status": "evaluated", "steps": 0})
    anchor = (tmp_path / "privacy-ledger.head.json").read_text()
    ledger.append({"run": "r", "round": 2, "status": "evaluated", "steps": 0})
    (tmp_path / "privacy-ledger.head.json").write_text(anchor)

    ledger.check()  # no error
    assert ledger.evaluations("r") == (2, 2)


# ------------------------------------------------------------------ the policy file


def test_the_policy_file_round_trips_and_is_digested(tmp_path: Path) -> None:
    policy = NodePolicy(lifetime_epsilon=4.0, accountants=("rdp",), send_loss=True)
    write_policy(tmp_path / "p.toml", policy)

    back = load_policy(tmp_path / "p.toml")

    assert back.to_dict() == policy.to_dict() and back.digest() == policy.digest()
    assert back.digest() != NodePolicy().digest()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("lifetime-epsilon = -1", "lifetime-epsilon must be a finite number > 0"),
        ("lifetime-epsilon = inf", "lifetime-epsilon must be a finite number > 0"),
        ("max-delta = 1.5", "max-delta must be in (0, 1)"),
        ("max-sample-rate = 0", "max-sample-rate must be in (0, 1]"),
        ('accountants = ["gdp"]', "accountants must be a non-empty subset"),
        ('dp-required = "yes"', "dp-required must be a bool"),
        ("max-evaluations = -2", "max-evaluations must be >= 0"),
        ("epsilon = 3", "unknown key 'epsilon'"),
        ("lifetime-epsilon = ", "not valid TOML"),
    ],
)
def test_a_bad_policy_file_says_what_and_where(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text + "\n")

    with pytest.raises(PolicyError) as err:
        load_policy(path)

    assert needle in str(err.value) and str(path.name) in str(err.value)


def test_a_missing_policy_file_is_refused_at_the_node(make_node: Callable[..., Node]) -> None:
    node = make_node()
    (node.state.parent / "policy.toml").unlink()

    refused(node.send("train", run_config()), "node policy", "cannot read it")


def test_the_run_config_cannot_name_the_policy() -> None:
    # The policy comes from the node's own config or environment, never from the run config.
    with pytest.raises(Exception, match="unknown key 'policy'"):
        from_run_config({"policy": "/tmp/lax.toml"})
    assert "policy" not in FedrecConfig().to_run_config()


def test_parse_policy_accepts_an_empty_file_as_the_defaults() -> None:
    assert parse_policy({}, "x").to_dict() == NodePolicy().to_dict()


# ------------------------------------------------------------------ a killed run, resumed


def _trained_rounds(run_dir: Path) -> set[int]:
    rounds: set[int] = set()
    for ledger in run_dir.glob("nodes/*/privacy-ledger.jsonl"):
        for line in ledger.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line being written
                continue
            if entry.get("status") == "trained":
                rounds.add(int(entry["round"]))
    return rounds


@pytest.mark.e2e
def test_a_server_killed_after_round_2_resumes_to_round_4_within_the_lifetime(
    tmp_path: Path,
) -> None:
    # Prepare: nodes whose lifetime (ε = 5) binds below the run's target (ε = 8)
    import os
    import signal
    import subprocess
    import sys

    from tests.tiny import save_tiny_bert, stop_when, tiny_simulate, write_small_world

    world = write_small_world(tmp_path / "world", people=100)
    bert = save_tiny_bert(tmp_path / "bert")
    policy = tmp_path / "policy.toml"
    write_policy(policy, NodePolicy(lifetime_epsilon=5.0))
    out = tmp_path / "out"
    run_dir = out / "federated-dp"
    fedrec = str(Path(sys.executable).with_name("fedrec"))
    cmd = tiny_simulate(
        world,
        bert,
        out,
        4,
        "--epsilon",
        "8",
        "--node-policy",
        str(policy),
        "--set",
        "dp.accountant=rdp",
    )
    env = {**os.environ, "FEDREC_CACHE_DIR": str(tmp_path / "cache")}

    # Execute 1: SIGKILL the whole job once a node has trained round 3 (the server may not
    # have aggregated it: a lost round)
    stop_when(cmd, env, lambda: 3 in _trained_rounds(run_dir), signal.SIGKILL, "round 3")

    # Execute 2: resume at once, while the killed launch's reaper is still stopping its Flower
    # processes (it must spare the new launch's)
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env)

    # Assert: 4 rounds on record, nobody refused, each node's ε never went back and stayed
    # within its lifetime, and the audit passes the run
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["rounds_completed"] == 4
    for ledger in run_dir.glob("nodes/*/privacy-ledger.jsonl"):
        lines = [e for e in hashlog.read(ledger) if e["status"] in ("trained", "refused")]
        assert all(e["status"] == "trained" for e in lines), [e.get("reason") for e in lines]
        lifetime = [e["lifetime-epsilon"] for e in lines]
        assert lifetime == sorted(lifetime) and lifetime[-1] <= 5.0 * (1 + 1e-6)
        assert max(e["round"] for e in lines) == 4
    audit = subprocess.run(
        [fedrec, "audit", str(run_dir), "--out", str(tmp_path / "audit")],
        capture_output=True,
        text=True,
    )
    assert audit.returncode == 0, audit.stdout[-3000:]

"""Deployment runtime with real processes: ``flower-superlink`` (TLS, SuperNode authentication,
state in a file) and one ``flower-supernode`` per platform on 127.0.0.1, driven by
``fedrec.deploy.local`` exactly as ``fedrec deploy local`` drives them. The faults (a host
dies, a node comes back, a node is misconfigured) come from tests/deploy_faults.py.

The fast tests check the pieces (certificates, the per-platform data split, the commands,
stopping processes).
The ``e2e`` tests share one SuperLink and three platforms (module fixture) and run in file
order; each reads the platforms' ledgers when it starts, so it does not depend on what ran
before it:

1. nodes that must be refused: unregistered key, no TLS, wrong CA;
2. a clean 2-round run: results, ε per channel rising per round, clean egress log;
3. a platform crashes mid-run and comes back: the run goes on without it (``missing``), it
   rejoins with its ε continued from the ledger on its disk, and platforms whose budget is
   spent stay out (``refused``) without failing the run;
4. the coordinator crashes mid-run and comes back: the run resumes from its last checkpoint;
5. a second registered key claiming a channel bound to another node is refused, and a run in
   which every platform refuses (budget) fails in results.json and in Flower.

Every process is stopped by the fixture's finalizer, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from fedrec.deploy.certs import make_certs
from fedrec.deploy.commands import node_config, superlink_command, supernode_command
from fedrec.deploy.flower import free_ports, processes_with_env, stop_processes, terminate
from fedrec.deploy.local import DEPLOYMENT_ENV, LocalDeployment
from fedrec.deploy.split import split_dataset
from fedrec.shared import hashlog, privacy, wire
from fedrec.shared.config import from_run_config
from fedrec.shared.policy import NodePolicy, write_policy
from tests.deploy_faults import crash, restart_node, start_misconfigured_node, stop
from tests.tiny import save_tiny_bert, write_small_world

CHANNELS = ("ecommerce", "finance", "social")
# batch > users: sample rate 1 on every channel, so ε depends on steps only (same per channel)
STEPS, BATCH, SIGMA, DELTA = 4, 4096, 4.0, 1e-4


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("deploy-world")
    data = write_small_world(root / "world")
    coordinator, platforms = split_dataset(data, root / "split")
    return {
        "data": data,
        "coordinator": coordinator,
        "platforms": platforms,
        "bert": save_tiny_bert(root / "bert"),
        "cache": root / "cache",
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, world: dict[str, Any]) -> Any:
    """SuperLink (TLS + auth, file state) and one registered, online SuperNode per channel."""
    root = tmp_path_factory.mktemp("deploy-cluster")
    # many runs share these nodes' ledgers: a lifetime and caps that only these tests' own
    # targets bind; DELTA is the tiny world's
    policy = root / "policy.toml"
    write_policy(
        policy,
        NodePolicy(
            lifetime_epsilon=1e5,
            max_delta=DELTA,
            max_evaluations_per_run=1000,
            max_evaluations=100_000,
        ),
    )
    d = LocalDeployment(root, CHANNELS, node_policy=policy)
    try:
        d.start_superlink()
        d.wait_superlink()
        for ch in CHANNELS:
            d.register(ch)
            d.start_node(ch, world["platforms"][ch])
        d.wait_online(len(CHANNELS))
        yield d
    finally:
        survivors = d.close()
        assert survivors == [], f"processes survived teardown: {survivors}"
        assert processes_with_env(DEPLOYMENT_ENV, str(d.root)) == []


def _run_config(world: dict[str, Any], run_dir: Path, **extra: Any) -> dict[str, Any]:
    cfg = {
        "num-server-rounds": 2,
        "channels": ",".join(CHANNELS),
        "data-dir": str(world["coordinator"]),
        "run-dir": str(run_dir),
        "cache-dir": str(world["cache"]),
        "encoder-dir": str(world["bert"]),
        "train.local-steps": STEPS,
        "train.batch-size": BATCH,
        "train.negatives": 20,
        "dp.noise-multiplier": SIGMA,
        "dp.accountant": "rdp",  # the tests compute expected ε with RDP
        "dp.target-epsilon": 1000.0,
        "dp.target-delta": DELTA,
        "eval.max-users": 100,
        "model.dim": 16,
        # the expected ε and steps here are DP-SGD's; the item prior's release is accounted
        # and audited in the Simulation Engine test (tests/test_federation.py)
        "model.item-prior": "none",
        "round-timeout": 300.0,
        **extra,
    }
    return from_run_config(cfg).to_run_config()  # checked like any run config


def _node_history(d: LocalDeployment, channel: str) -> list[tuple[float, float, int]]:
    """The accountant history the platform's own ledger (on its disk) holds now."""
    entries = hashlog.read(d.state_dir(channel) / "privacy-ledger.jsonl")
    kept = [e["history"] for e in entries if "history" in e]  # evaluations carry none
    return [(float(sigma), float(q), int(n)) for sigma, q, n in kept[-1]] if kept else []


def _steps(history: list[tuple[float, float, int]]) -> int:
    return sum(int(n) for _, _, n in history)


def _ledger(run_dir: Path) -> list[dict[str, Any]]:
    return hashlog.read(run_dir / "privacy-ledger.jsonl")


def _assert_logs_intact(run_dir: Path) -> dict[str, Any]:
    """Hash chains of the run's ledger and egress log verify up to the heads in results.json."""
    results = json.loads((run_dir / "results.json").read_text())
    for name in ("privacy-ledger.jsonl", "egress.jsonl"):
        verdict = hashlog.verify(run_dir / name, results["log_heads"][name])
        assert verdict.ok, verdict.problem
    return dict(results)


def _assert_node_ledgers_grow(d: LocalDeployment, before: dict[str, int]) -> dict[str, int]:
    """Every platform's ledger verifies and its total steps only ever grew (never reset)."""
    after = {}
    for ch in CHANNELS:
        path = d.state_dir(ch) / "privacy-ledger.jsonl"
        assert hashlog.verify(path).ok, hashlog.verify(path).problem
        totals = [_steps(e["history"]) for e in hashlog.read(path) if "history" in e]
        assert totals == sorted(totals), f"{ch}: steps went down in its ledger: {totals}"
        after[ch] = totals[-1] if totals else 0
        assert after[ch] >= before[ch]
    return after


# ---------------------------------------------------------------------------------------------
# Pieces (fast)


def test_certs_are_what_flower_reads(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    # Execute
    certs = make_certs(tmp_path / "certs", ["finance"])
    again = make_certs(tmp_path / "certs", ["finance"])

    # Assert: server cert names the loopback address and is signed by the CA
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert server.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Assert: node key pair in OpenSSH format, NIST P-384, kept when certs are re-made
    key = load_ssh_private_key(certs.node_key("finance").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(certs.node_pub("finance"))  # what `flwr supernode register` does
    assert again.node_key("finance").read_bytes() == certs.node_key("finance").read_bytes()
    assert certs.node_key("finance").stat().st_mode & 0o077 == 0
    assert certs.ca_key.stat().st_mode & 0o077 == 0


def test_each_platform_gets_only_its_own_data(world: dict[str, Any]) -> None:
    from fedrec.shared.datasets import load_catalogue, load_channel, load_manifest

    # Execute: the split the module fixture made
    coordinator, platforms = world["coordinator"], world["platforms"]

    # Assert: a platform folder holds its channel's files and nothing else
    for ch, folder in platforms.items():
        assert list(load_manifest(folder).channels) == [ch]
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        assert files == sorted(["manifest.json", f"{ch}/interactions.csv", f"{ch}/items.csv"])
        original = world["data"] / ch / "interactions.csv"
        assert (folder / ch / "interactions.csv").read_bytes() == original.read_bytes()
    # Assert: the coordinator gets every public catalogue and no interactions at all
    assert not [p for p in coordinator.rglob("*") if "interactions" in p.name]
    assert not (coordinator / "ground_truth").exists()
    for ch in CHANNELS:
        assert len(load_catalogue(coordinator, ch)) == len(load_channel(world["data"], ch)[0])


def test_node_config_parses_as_flower_parses_it(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    text = node_config("finance", tmp_path / "data dir", tmp_path / "state")

    assert parse_config_args([text]) == {
        "channel": "finance",
        "data-dir": str(tmp_path / "data dir"),
        "state-dir": str(tmp_path / "state"),
        "torch-threads": 1,
    }


def test_node_config_refuses_what_flower_would_misparse(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot contain"):
        node_config("finance", tmp_path / 'da"ta', tmp_path / "state")


def _ignores_sigterm(env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A process that ignores SIGTERM (``sleep`` inherits the ignored disposition)."""
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 60"], env=env)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
        assert time.monotonic() < deadline, "sh never exec'd sleep"
        time.sleep(0.02)
    return proc


def test_terminate_kills_what_ignores_sigterm() -> None:
    # Prepare
    proc = _ignores_sigterm()

    # Execute
    left = terminate([proc.pid], grace=0.3, kill_wait=5.0)

    # Assert: SIGTERM was ignored, SIGKILL was not
    assert left == []
    assert proc.wait(timeout=5) == -signal.SIGKILL


def test_stop_processes_stops_only_its_flwr_home(tmp_path: Path) -> None:
    # Prepare: one process of this FLWR_HOME, one of another
    mine = _ignores_sigterm({**os.environ, "FLWR_HOME": str(tmp_path / "mine")})
    other = _ignores_sigterm({**os.environ, "FLWR_HOME": str(tmp_path / "other")})
    try:
        # Execute
        survivors = stop_processes(tmp_path / "mine", grace=0.3)

        # Assert
        assert survivors == 0
        assert mine.wait(timeout=5) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(timeout=5)
        mine.kill()


@pytest.mark.e2e
def test_commands_use_flags_the_installed_flower_has(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["finance"])
    link = superlink_command(port=8000, certs=certs, database=tmp_path / "db")
    node = supernode_command(
        superlink="127.0.0.1:8000",
        port=9094,
        config="channel='finance'",
        root_certificates=certs.ca_cert,
        private_key=certs.node_key("finance"),
        trusted_entities=tmp_path / "trusted.yaml",
    )
    for cmd in (link, node):
        helptext = subprocess.run(
            [cmd[0], "--help"], capture_output=True, text=True, timeout=60
        ).stdout
        flags = [c for c in cmd[1:] if c.startswith("--")]
        assert flags and all(f in helptext for f in flags), (cmd[0], flags)


def _signer(tmp_path: Path, name: str) -> tuple[Any, str]:
    """An Ed25519 signing key and the trusted-entities line of its public key."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    return key, f"{public} {name}"


def test_a_trusted_node_runs_only_bundles_its_pinned_signer_signed(tmp_path: Path) -> None:
    """What ``--trusted-entities`` means, checked with the installed SuperNode's own verifier
    on bundles signed the way Flower Hub signs them (Ed25519 over signing time + SHA-256)."""
    import base64
    import hashlib

    from flwr.supercore.fab import Fab
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign
    from flwr.supernode.start_client_internal import _verify_fab

    from fedrec.deploy.commands import read_trusted_entities

    # Prepare: the platform pins one reviewer's key; a bundle signed by it, one by another key
    pinned, line = _signer(tmp_path, "reviewer")
    other, _ = _signer(tmp_path, "someone-else")
    (tmp_path / "trusted.yaml").write_text(f'fpk_pinned: "{line}"\n')
    trusted = read_trusted_entities(tmp_path / "trusted.yaml")
    content, signed_at = b"a bundle", 1_760_000_000

    def signed(key: Any, key_id: str) -> Fab:
        digest = hashlib.sha256(content).digest()
        signature = key.sign(create_message_to_sign(digest, signed_at))
        record = {
            "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode(),
            "signed_at": signed_at,
        }
        verifications = {key_id: json.dumps(record), "valid_license": "Valid"}
        return Fab(hashlib.sha256(content).hexdigest(), content, verifications)

    # Execute / Assert: only the pinned key's signature verifies, under its own id
    assert _verify_fab(signed(pinned, "fpk_pinned"), trusted)
    assert not _verify_fab(signed(other, "fpk_pinned"), trusted)  # another key, the pinned id
    assert not _verify_fab(signed(other, "fpk_other"), trusted)  # a signer nobody pinned
    tampered = signed(pinned, "fpk_pinned")
    tampered.content = b"a bundle, changed"
    assert not _verify_fab(tampered, trusted)


# ---------------------------------------------------------------------------------------------
# Real processes


REJECTIONS = {
    # case: what the node gets wrong, and what its log must say (one of). A plaintext client
    # against the TLS port is dropped by the server; depending on when, the client reads it
    # as a disconnect or a reset (both seen with flwr 1.42).
    "unregistered": ("a key the SuperLink never registered", ("Failed to activate SuperNode",)),
    "no-tls": (
        "--insecure against the TLS SuperLink",
        ("Server disconnected without sending", "Connection reset by peer"),
    ),
    "wrong-ca": ("a CA that did not sign the SuperLink's cert", ("CERTIFICATE_VERIFY_FAILED",)),
}


@pytest.fixture(scope="module")
def rejected(
    cluster: LocalDeployment, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[int, str, list[str], list[str]]]:
    """Start one bad node per case at once; case -> (exit code, log, online before, after)."""
    assert cluster.certs is not None
    other = make_certs(tmp_path_factory.mktemp("other-pki"), ["intruder"])

    def online() -> list[str]:
        return sorted(n["node-id"] for n in cluster.nodes() if n["status"] == "online")

    before = online()
    # case -> (CA the node trusts, key it authenticates with); None: --insecure / no key
    options: dict[str, tuple[Path | None, Path | None]] = {
        "unregistered": (cluster.certs.ca_cert, other.node_key("intruder")),
        "no-tls": (None, None),
        # a registered key: only TLS is wrong
        "wrong-ca": (other.ca_cert, cluster.certs.node_key("finance")),
    }
    procs = {}
    try:
        for case, (ca, key) in options.items():
            # --max-retries 1: a node refused at the transport level retries forever otherwise
            procs[case] = start_misconfigured_node(
                cluster,
                f"bad-{case}",
                "intruder",
                other.root,
                root_certificates=ca,
                private_key=key,
                extra=["--max-retries", "1"],
            )
        codes = {case: proc.popen.wait(timeout=120) for case, proc in procs.items()}
    finally:
        for case in procs:
            stop(cluster, f"bad-{case}")
    after = online()
    return {
        case: (codes[case], proc.log.read_text(errors="replace"), before, after)
        for case, proc in procs.items()
    }


@pytest.mark.e2e
@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_superlink_refuses_node(
    rejected: dict[str, tuple[int, str, list[str], list[str]]], case: str
) -> None:
    code, log, online_before, online_after = rejected[case]

    # Assert: the node gave up with Flower's connection-error exit and never got a node ID
    assert code == 1 and "Exit Code: 305" in log, log[-2000:]
    assert any(m in log for m in REJECTIONS[case][1]), log[-2000:]
    assert "SuperNode ID" not in log
    assert online_after == online_before


@pytest.mark.e2e
def test_end_to_end_two_rounds(
    cluster: LocalDeployment, world: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    before = {ch: _steps(_node_history(cluster, ch)) for ch in CHANNELS}

    # Execute
    code, run_id = cluster.submit(_run_config(world, run_dir), log_name="e2e")

    # Assert: the run finished and wrote its results
    assert code == 0 and run_id is not None, (cluster.root / "logs" / "e2e.log").read_text()[-3000:]
    results = _assert_logs_intact(run_dir)
    assert results["rounds_completed"] == 2 and results["resumed_after"] == 0
    for ch in CHANNELS:
        assert set(results["channels"][ch]["metrics"]) >= {wire.NDCG10, wire.HR10, wire.RECALL20}
        assert results["channels"][ch]["privacy"][wire.EPSILON] > 0
    assert results["round_status"] == {str(r): dict.fromkeys(CHANNELS, "ok") for r in (1, 2)}
    # Assert: ε per channel rises round by round, as the server's ledger recorded it
    trained = [e for e in _ledger(run_dir) if e["status"] == "trained"]
    for ch in CHANNELS:
        eps = [
            e["epsilon"] for e in sorted(trained, key=lambda e: e["round"]) if e["channel"] == ch
        ]
        assert len(eps) == 2 and 0 < eps[0] < eps[1]
    # Assert: egress log: only the model's weights and allowlisted values left the platforms
    shapes = json.loads((run_dir / "model.json").read_text())["param_shapes"]
    egress = hashlog.read(run_dir / "egress.jsonl")
    assert {(e["round"], e["kind"], e["channel"]) for e in egress} == {
        (r, k, ch) for r in (1, 2) for k in ("train", "evaluate") for ch in CHANNELS
    }
    for entry in egress:
        allowed = wire.ALLOWLIST[entry["kind"]]
        assert entry["violations"] == [] and set(entry["records"]) <= set(allowed)
        for name, rec in entry["records"].items():
            if rec["type"] == "arrays":
                assert {k: v["shape"] for k, v in rec["arrays"].items()} == shapes
            else:
                assert set(rec["values"]) <= set(allowed[name][1] or ())
    # Assert: every platform's own ledger (its disk) grew by exactly this run's steps
    after = _assert_node_ledgers_grow(cluster, before)
    assert {ch: after[ch] - before[ch] for ch in CHANNELS} == dict.fromkeys(CHANNELS, 2 * STEPS)
    assert (run_dir / "checkpoints" / "round-0002.safetensors").exists()


@pytest.mark.e2e
def test_platform_crash_rejoin_and_spent_budget(
    cluster: LocalDeployment, world: dict[str, Any], tmp_path: Path
) -> None:
    """3 rounds, min-nodes 2, a budget that allows 2 more rounds. Finance's host dies right
    after its round-1 reply; it is started again once round 2 is under way (and the SuperLink
    has noticed it gone: its heartbeat lapses within 60 s). Expected: finance missing in
    round 2, back in round 3 with its ε continued; ecommerce and social refused in round 3."""
    # Prepare: every platform's ledger holds the same history (fresh, or after the e2e run)
    history = {ch: _node_history(cluster, ch) for ch in CHANNELS}
    assert len({tuple(h) for h in history.values()}) == 1, history
    # the run's target covers this run's own steps (earlier runs count toward the nodes'
    # lifetime budget): exactly two rounds
    target = privacy.epsilon_of([(SIGMA, 1.0, 2 * STEPS)], DELTA, "rdp") * 1.001
    before = {ch: _steps(h) for ch, h in history.items()}
    run_dir = tmp_path / "run"
    cfg = _run_config(
        world,
        run_dir,
        **{
            "num-server-rounds": 3,
            "min-nodes": 2,
            "round-timeout": 120.0,
            "dp.target-epsilon": target,
        },
    )
    round_2 = threading.Event()
    errors: list[BaseException] = []

    def restart() -> None:
        try:
            assert round_2.wait(timeout=300), "round 2 never started"
            restart_node(cluster, "finance", world["platforms"]["finance"])
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    restarter = threading.Thread(target=restart, daemon=True)

    def on_line(line: str) -> None:
        if "aggregate_train: Received" in line and restarter.ident is None:
            crash(cluster, "node-finance")  # the host dies: SuperNode, SuperExec, ClientApp
            restarter.start()
        if "[ROUND 2/" in line:
            round_2.set()

    # Execute
    try:
        code, _ = cluster.submit(cfg, on_line=on_line, log_name="crash")
    finally:
        round_2.set()
        restarter.join(timeout=180)
    assert not errors, errors

    # Assert (a): the run finished with the others; finance is "missing" in round 2
    assert code == 0, (cluster.root / "logs" / "crash.log").read_text()[-3000:]
    results = _assert_logs_intact(run_dir)
    assert results["rounds_completed"] == 3
    ledger = _ledger(run_dir)
    status = {(e["round"], e["channel"]): e["status"] for e in ledger}
    assert status[(1, "finance")] == "trained" and status[(2, "finance")] == "missing"
    assert all(status[(r, ch)] == "trained" for r in (1, 2) for ch in ("ecommerce", "social"))
    # Assert (d): budget spent -> refused, recorded, and the run went on without them
    for ch in ("ecommerce", "social"):
        assert status[(3, ch)] == "refused"
        reason = next(e["reason"] for e in ledger if (e["round"], e["channel"]) == (3, ch))
        assert reason.startswith("privacy-refused")
    # Assert (b): finance rejoined in round 3; its ε continued from the ledger on its disk
    assert status[(3, "finance")] == "trained"
    finance = {e["round"]: e for e in ledger if e["channel"] == "finance"}
    # the run's steps, rounds 1 and 3 (not STEPS: the restarted node did not reset)
    assert finance[3]["total-steps"] == 2 * STEPS
    assert finance[1]["epsilon"] < finance[3]["epsilon"] <= target
    after = _assert_node_ledgers_grow(cluster, before)
    assert {ch: after[ch] - before[ch] for ch in CHANNELS} == dict.fromkeys(CHANNELS, 2 * STEPS)
    # The SuperLink itself answers for a node it lost (src node 1, NODE_UNAVAILABLE);
    # server/strategy.py should attribute that reply to the node's channel.
    egress = hashlog.read(run_dir / "egress.jsonl")
    unknown = sorted({e["channel"] for e in ledger + egress} - set(CHANNELS))
    if unknown:
        pytest.xfail(
            f"run logs name {unknown}, not a channel: server/strategy.py does not attribute "
            "the SuperLink's NODE_UNAVAILABLE reply (sender node 1) to the lost node's channel"
        )


@pytest.mark.e2e
def test_coordinator_restart_resumes_from_last_checkpoint(
    cluster: LocalDeployment, world: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    before = {ch: _steps(_node_history(cluster, ch)) for ch in CHANNELS}
    cfg = _run_config(world, run_dir)

    def on_line(line: str) -> None:
        if "[fedrec] round 1:" in line and cluster.procs["superlink"].running():
            crash(cluster, "superlink")  # the coordinator's host dies, ServerApp included

    # Execute: crash after round 1, bring the coordinator back, resubmit with resume=true
    code, crashed_run = cluster.submit(cfg, on_line=on_line, log_name="coordinator-1")
    assert code != 0
    assert (run_dir / "checkpoints" / "round-0001.safetensors").exists()
    assert not (run_dir / "checkpoints" / "round-0002.safetensors").exists()
    cluster.start_superlink()
    cluster.wait_superlink()
    cluster.wait_online(len(CHANNELS))  # the SuperNodes reconnect by themselves
    code, _ = cluster.submit({**cfg, "resume": True}, log_name="coordinator-2")

    # Assert: the resumed run started after round 1 and completed round 2
    assert code == 0, (cluster.root / "logs" / "coordinator-2.log").read_text()[-3000:]
    results = _assert_logs_intact(run_dir)
    assert results["resumed_after"] == 1 and results["rounds_completed"] == 2
    assert (run_dir / "checkpoints" / "round-0002.safetensors").exists()
    trained = [e for e in _ledger(run_dir) if e["status"] == "trained"]
    assert sorted((e["round"], e["channel"]) for e in trained) == [
        (r, ch) for r in (1, 2) for ch in CHANNELS
    ]
    for ch in CHANNELS:
        eps = [e["epsilon"] for e in trained if e["channel"] == ch]
        assert eps[0] < eps[1]  # the new Flower run started from the platforms' ledgers
    _assert_node_ledgers_grow(cluster, before)
    # The restarted SuperLink closes the crashed run itself once its ServerApp's task token
    # expires (HEARTBEAT_PATIENCE heartbeat intervals after its last one), checked lazily.
    deadline = time.monotonic() + HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 60
    while True:
        listed = cluster.flwr(
            "ls", "fedrec-local", "--run-id", str(crashed_run), "--format", "json"
        )
        if json.loads(listed.stdout)["runs"][0]["status"].startswith("finished"):
            break
        assert time.monotonic() < deadline, listed.stdout
        time.sleep(5)


@pytest.mark.e2e
def test_a_second_key_cannot_serve_a_bound_channel_and_a_run_nobody_trained_fails(
    cluster: LocalDeployment, world: dict[str, Any], tmp_path: Path
) -> None:
    """Last in the file: it leaves finance's ledger as it was and an extra key registered.

    An impostor (a second registered key) claims finance with a fresh state dir, i.e. a fresh
    budget. With node-channels bound to the registered ids it is refused and never trains.
    Then a budget every platform refuses: the run fails, results.json says why, Flower marks
    the run failed, and `flwr run --stream` still exits 0 (hence callers read results.json)."""
    # Prepare: register the impostor's key and start it as "finance" on a fresh state dir
    from fedrec.deploy.commands import LINK_NAME

    other = make_certs(tmp_path / "pki", ["impostor"])
    reply = cluster.flwr(
        "supernode", "register", str(other.node_pub("impostor")), LINK_NAME, "--format", "json"
    )
    impostor_id = int(json.loads(reply.stdout)["node-id"])
    fresh = tmp_path / "impostor-state"
    fresh.mkdir()
    cmd = supernode_command(
        superlink=cluster.address,
        port=free_ports(1)[0],
        config=node_config("finance", world["platforms"]["finance"], fresh),
        root_certificates=cluster.ca,
        private_key=other.node_key("impostor"),
    )
    cluster.spawn("node-impostor", cmd, "node-impostor", cwd=fresh)
    bound = ",".join(f"{cluster.node_ids[ch]}={ch}" for ch in CHANNELS)
    try:
        cluster.wait_online(len(CHANNELS) + 1)
        # Execute (a): one round with the binding
        ok_dir, failed_dir = tmp_path / "bound", tmp_path / "spent"
        cfg = _run_config(world, ok_dir, **{"num-server-rounds": 1, "node-channels": bound})
        code, _ = cluster.submit(cfg, log_name="bound")
        # Execute (b): a budget no platform can afford
        spent = {**cfg, "run-dir": str(failed_dir), "dp.target-epsilon": 1e-3}
        failed_code, failed_run = cluster.submit(spent, log_name="spent")
    finally:
        stop(cluster, "node-impostor")

    # Assert (a): the impostor was refused and never trained; the platforms did
    assert code == 0, (cluster.root / "logs" / "bound.log").read_text()[-3000:]
    results = _assert_logs_intact(ok_dir)
    assert "failed" not in results
    assert results["round_status"] == {"1": dict.fromkeys(CHANNELS, "ok")}
    assert "node-channels binds no channel to it" in results["refused_nodes"][str(impostor_id)]
    assert not (fresh / "privacy-ledger.jsonl").exists()
    assert {e["node"] for e in _ledger(ok_dir)} == {cluster.node_ids[ch] for ch in CHANNELS}
    # Assert (b): flwr run exits 0, results.json records the failure with each reason
    assert failed_code == 0, (cluster.root / "logs" / "spent.log").read_text()[-3000:]
    failed = json.loads((failed_dir / "results.json").read_text())
    reason = failed["failed"]
    assert reason.startswith("no platform trained in any of the 1 round(s): ")
    assert all(f"{ch} refused (privacy-refused: privacy budget" in reason for ch in CHANNELS)
    listed = cluster.flwr("ls", LINK_NAME, "--run-id", str(failed_run), "--format", "json")
    assert json.loads(listed.stdout)["runs"][0]["status"] == "finished:failed", listed.stdout


@pytest.mark.e2e
def test_a_node_with_trusted_entities_refuses_an_unsigned_bundle(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """A local ``flwr run`` sends an unsigned bundle: a SuperNode started with
    ``--trusted-entities`` answers its first message with an error and never runs its code."""
    # Prepare: an insecure loopback SuperLink, one finance node that trusts one signer only
    _, line = _signer(tmp_path, "reviewer")
    (tmp_path / "trusted.yaml").write_text(f'fpk_pinned: "{line}"\n')
    with LocalDeployment(tmp_path / "dep", ("finance",), secure=False) as d:
        d.start_superlink(database=False)
        d.wait_superlink()
        state = d.state_dir("finance")
        state.mkdir(parents=True)
        cmd = supernode_command(
            superlink=d.address,
            port=free_ports(1)[0],
            config=node_config("finance", world["platforms"]["finance"], state),
            root_certificates=None,
            private_key=None,
            trusted_entities=tmp_path / "trusted.yaml",
        )
        node = d.spawn("node-finance", cmd, "node-finance", cwd=state)
        d.wait_online(1)
        run_dir = tmp_path / "run"
        cfg = _run_config(world, run_dir, channels="finance", **{"min-nodes": 1})

        # Execute
        code, _ = d.submit({**cfg, "num-server-rounds": 1}, timeout=300)
        node_log = node.log.read_text(errors="replace")

    # Assert: the node refused the bundle; the ServerApp got the error and no round started
    assert code == 0  # flwr run --stream exits 0 for a failed run
    assert "App verification is not supported by the connected SuperLink" in node_log
    results = json.loads((run_dir / "results.json").read_text())
    assert results["failed"].startswith("no node may serve a channel"), results["failed"]
    run_log = (d.root / "logs" / "flwr-run.log").read_text(errors="replace")
    assert "The FAB could not be verified" in run_log
    assert sorted(p.name for p in state.iterdir()) == []  # no ClientApp ever ran on the node


@pytest.mark.e2e
def test_a_supernode_holds_its_own_policy_against_the_servers_request(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """The run config asks a real SuperNode to train with its noise off; the node's own policy
    (node-config ``policy=``) refuses, the ServerApp records why, and nothing is trained."""
    # Prepare: one finance node whose policy is the built-in one, with the tiny world's δ
    policy = tmp_path / "policy.toml"
    write_policy(policy, NodePolicy(max_delta=DELTA))
    with LocalDeployment(tmp_path / "dep", ("finance",), secure=False, node_policy=policy) as d:
        d.start_superlink(database=False)
        d.wait_superlink()
        d.start_node("finance", world["platforms"]["finance"])
        d.wait_online(1)
        run_dir = tmp_path / "run"
        cfg = _run_config(
            world,
            run_dir,
            channels="finance",
            **{"min-nodes": 1, "audit.disable-noise": True, "dp.target-epsilon": 8.0},
        )

        # Execute
        code, _ = d.submit({**cfg, "num-server-rounds": 1}, timeout=300)

    # Assert: the node refused with its reason, on both sides; no weights came back
    assert code == 0  # flwr run --stream exits 0 for a failed run
    results = json.loads((run_dir / "results.json").read_text())
    assert "without noise" in results["failed"], results["failed"]
    server = [e for e in _ledger(run_dir) if e["channel"] == "finance"]
    assert server and all(e["status"] == "refused" for e in server)
    assert all("allow-noise-off" in e["reason"] for e in server)
    node = hashlog.read(d.state_dir("finance") / "privacy-ledger.jsonl")
    assert node and all(e["status"] == "refused" for e in node)
    assert not any(
        e["kind"] == "train" and e["records"] for e in hashlog.read(run_dir / "egress.jsonl")
    )

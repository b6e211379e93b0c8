"""``fedrec deploy split``, ``superlink`` and ``node`` through the command line in-process
(:func:`fedrec.cli.main.run`, which returns the exit code), and the ``node-channels`` run-config
key. No processes are started (``--dry-run``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedrec.cli.main import run
from fedrec.shared.config import ConfigError, from_run_config, node_bindings

TINY = Path(__file__).parent / "data" / "tiny"  # channels shop and news


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_split_writes_a_catalogue_only_coordinator_and_one_folder_per_platform(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    out = tmp_path / "split"

    # Execute
    code = run(["deploy", "split", str(TINY), "--out", str(out)])

    # Assert: no interactions for the coordinator, each platform its own channel only
    assert code == 0
    assert _files(out / "coordinator") == ["manifest.json", "news/items.csv", "shop/items.csv"]
    assert _files(out / "shop") == ["manifest.json", "shop/interactions.csv", "shop/items.csv"]
    assert _files(out / "news") == ["manifest.json", "news/interactions.csv", "news/items.csv"]
    assert (out / "shop" / "shop" / "items.csv").read_bytes() == (
        TINY / "shop" / "items.csv"
    ).read_bytes()
    assert list(json.loads((out / "shop" / "manifest.json").read_text())["channels"]) == ["shop"]
    # Assert: it says which folder goes to which machine
    printed = capsys.readouterr().out
    assert "copy to shop's machine only" in printed and "--channel news" in printed
    assert str(out / "coordinator") in printed


def test_split_refuses_a_folder_that_is_not_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a stale platform folder left from another split
    out = tmp_path / "split"
    (out / "finance").mkdir(parents=True)

    # Execute
    code = run(["deploy", "split", str(TINY), "--out", str(out)])

    # Assert: bad input (2), nothing written
    assert code == 2
    assert "is not empty (holds finance)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["finance"]


def test_split_refuses_a_file_as_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    out = tmp_path / "split"
    out.write_text("x")

    # Execute
    code = run(["deploy", "split", str(TINY), "--out", str(out)])

    # Assert
    assert code == 2 and "is a file" in capsys.readouterr().err


def test_split_refuses_a_channel_named_like_the_coordinator_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the tiny dataset with its channel "shop" renamed "coordinator"
    data = tmp_path / "data"
    shutil.copytree(TINY, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["channels"]["coordinator"] = manifest["channels"].pop("shop")
    (data / "manifest.json").write_text(json.dumps(manifest))

    # Execute
    code = run(["deploy", "split", str(data), "--out", str(tmp_path / "split")])

    # Assert
    assert code == 2 and "channel named 'coordinator'" in capsys.readouterr().err
    assert not (tmp_path / "split").exists()


def test_split_of_a_folder_that_is_not_a_dataset_fails_with_its_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = run(["deploy", "split", str(tmp_path / "nothing"), "--out", str(tmp_path / "s")])

    # Assert: a fedrec error (not an internal error, 70), named on stderr
    assert code not in (0, 70)
    assert "error:" in capsys.readouterr().err


def test_superlink_keeps_its_state_in_a_file_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)

    # Execute
    code = run(["deploy", "superlink", "--insecure", "--dry-run"])

    # Assert
    assert code == 0
    assert f"--database {tmp_path / 'superlink.db'}" in capsys.readouterr().out


def test_superlink_in_memory_has_no_database(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code = run(["deploy", "superlink", "--insecure", "--dry-run", "--in-memory"])

    # Assert
    assert code == 0 and "--database" not in capsys.readouterr().out


def _ed25519_line() -> str:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = ed25519.Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + " reviewer"


def _node(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "deploy",
        "node",
        "--channel",
        "finance",
        "--data",
        str(tmp_path),
        "--state",
        str(tmp_path / "state"),
        "--insecure",
        "--dry-run",
        *extra,
    ]


def test_node_passes_its_trusted_entities_to_flower(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text(f'fpk_pinned: "{_ed25519_line()}"\n')

    # Execute
    code = run(_node(tmp_path, "--trusted-entities", str(trusted)))

    # Assert: the flag reaches flower-supernode; the operator is told what it refuses
    out = capsys.readouterr()
    assert code == 0 and f"--trusted-entities {trusted}" in out.out
    assert "fpk_pinned" in out.err and "local folder is unsigned" in out.err


def test_node_without_trusted_entities_has_no_such_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(_node(tmp_path))
    assert code == 0 and "--trusted-entities" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read it"),
        ("", "no signers in it"),
        ("- just\n- a list\n", "no signers in it"),
        ("fpk_x: [unclosed\n", "not YAML"),
        ('fpk_x: "not a key"\n', "fpk_x: not an OpenSSH public key"),
        ("ECDSA", "fpk_x: not an Ed25519 key"),
    ],
)
def test_node_refuses_a_trusted_entities_file_flower_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, problem: str
) -> None:
    # Prepare
    trusted = tmp_path / "trusted.yaml"
    if content == "ECDSA":
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        key = ec.generate_private_key(ec.SECP384R1()).public_key()
        content = f'fpk_x: "{key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()}"\n'
    if content is not None:
        trusted.write_text(content)

    # Execute
    code = run(_node(tmp_path, "--trusted-entities", str(trusted)))

    # Assert: exit 2 before any command is printed, the file and the problem named
    out = capsys.readouterr()
    assert code == 2 and "flower-supernode" not in out.out
    assert str(trusted) in out.err and problem in out.err, out.err


def test_node_channels_parses_to_node_ids() -> None:
    # Execute
    cfg = from_run_config({"node-channels": " 7382910=finance, 12=social ,"})

    # Assert
    assert node_bindings(cfg.node_channels) == ({7382910: "finance", 12: "social"}, [])


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("finance=7382910", "node-channels entries must be NODE_ID=channel"),
        ("12", "node-channels entries must be NODE_ID=channel"),
        ("12=finance,12=social", "node-channels binds node 12 to both 'finance' and 'social'"),
        ("12=travel", "node-channels binds channels that are not in channels"),
    ],
    ids=["swapped", "no channel", "one node two channels", "unknown channel"],
)
def test_bad_node_channels_is_a_config_error(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_run_config({"node-channels": value})
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_simulate_raises_the_servers_reason_when_nobody_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: Flower "succeeds" (exit 0) but the ServerApp recorded that nobody trained
    from rich.console import Console

    import fedrec.simulations.flower as flower
    from fedrec.shared.config import FedrecConfig
    from fedrec.shared.errors import RunFailed
    from fedrec.shared.policy import NodePolicy
    from fedrec.simulations.simulate import _federated

    reason = "no platform trained in any of the 1 round(s): shop failed (ValueError: no users)"

    def fake_run(run_dir: Path, *args: object, **kwargs: object) -> None:
        (run_dir / "results.json").write_text(json.dumps({"failed": reason, "channels": {}}))

    monkeypatch.setattr(flower, "run_simulation", fake_run)

    # Execute / Assert: a fedrec error (exit 1 on the command line) carrying the reason
    with pytest.raises(RunFailed, match=r"shop failed \(ValueError: no users\)") as err:
        _federated(tmp_path, FedrecConfig(), 2, NodePolicy(), Console(file=None, quiet=True))
    assert err.value.exit_code == 1

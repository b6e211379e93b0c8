"""Bad input through the real ``fedrec`` command line: one clear message, a non-zero exit code,
no traceback, nothing half-written.

Each :class:`Case` drives ``fedrec.cli.main.run`` (the console script's own entry point, in
this process) with one bad input and asserts the exit code, the words of the message and that
no Python traceback was printed; cases that could damage data also check the files afterwards.
docs/reliability.md lists every case id of this table (a test below keeps the two in step).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedrec.cli.main import INTERNAL_ERROR, run
from tests.tiny import write_tiny_run

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Env:
    """What the cases work on: a small world, a tiny encoder, a finished run, a scratch dir."""

    world: Path
    bert: Path
    run: Path
    tmp: Path

    def copy_world(self, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(self.world, dst)
        return dst

    def copy_run(self, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(self.run, dst)
        return dst


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A 120-person synthetic world, a tiny random BERT (32-dim vectors) and a run directory
    whose round-2 checkpoint fits them (as ``fedrec simulate`` leaves it, without training)."""
    tiny = write_tiny_run(tmp_path_factory.mktemp("cli-errors"))
    return tiny.world, tiny.bert, tiny.run


@pytest.fixture
def env(base: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.setenv("COLUMNS", "1000")  # rich: one line per message, whatever the terminal
    monkeypatch.delenv("FEDREC_DEBUG", raising=False)
    monkeypatch.delenv("FEDREC_RUN_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    return Env(*base, tmp=tmp_path)


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    code: int
    says: tuple[str, ...]
    check: Callable[[Env], None] | None = None  # what must hold on disk afterwards


def sim(*extra: str) -> Callable[[Env], list[str]]:
    """``fedrec simulate`` on the small world (tiny encoder, into a fresh --out) plus ``extra``."""
    return lambda e: [
        "simulate",
        "--data",
        str(e.world),
        "--out",
        str(e.tmp / "out"),
        "--set",
        f"encoder-dir={e.bert}",
        "--set",
        "model.dim=16",
        *extra,
    ]


def sim_on(make: Callable[[Env], Path], *extra: str) -> Callable[[Env], list[str]]:
    """``fedrec simulate`` on the dataset ``make`` builds."""
    return lambda e: ["simulate", "--data", str(make(e)), "--out", str(e.tmp / "out"), *extra]


def rec(make: Callable[[Env], Path] | None = None, *extra: str) -> Callable[[Env], list[str]]:
    """``fedrec recommend`` on the finished run (or the one ``make`` builds) plus ``extra``."""

    def argv(e: Env) -> list[str]:
        run_dir = make(e) if make is not None else e.run
        return ["recommend", str(run_dir), *extra]

    return argv


def no_out(e: Env) -> None:
    assert not (e.tmp / "out").exists(), "a refused run must not create its --out"


# -- faulty datasets ---------------------------------------------------------------------------


def edit_csv(e: Env, name: str, rel: str, edit: Callable[[list[list[str]]], None]) -> Path:
    world = e.copy_world(name)
    path = world / rel
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    edit(rows)
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return world


def edit_manifest(e: Env, name: str, edit: Callable[[dict], None]) -> Path:  # type: ignore[type-arg]
    world = e.copy_world(name)
    doc = json.loads((world / "manifest.json").read_text())
    edit(doc)
    (world / "manifest.json").write_text(json.dumps(doc))
    return world


def no_manifest(e: Env) -> Path:
    world = e.copy_world("no-manifest")
    (world / "manifest.json").unlink()
    return world


def manifest_not_json(e: Env) -> Path:
    world = e.copy_world("manifest-not-json")
    (world / "manifest.json").write_text('{"format": "fedrec-dataset/1",\n  "name": \n')
    return world


def manifest_dotdot(e: Env) -> Path:
    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        doc["channels"]["finance"]["catalogue"] = "../finance/items.csv"

    return edit_manifest(e, "dotdot", edit)


def manifest_symlink_out(e: Env) -> Path:
    world = e.copy_world("symlink-out")
    outside = e.tmp / "elsewhere.csv"
    shutil.move(world / "finance" / "items.csv", outside)
    (world / "finance" / "items.csv").symlink_to(outside)
    return world


def missing_column(e: Env) -> Path:
    def edit(rows: list[list[str]]) -> None:
        rows[0][rows[0].index("timestamp")] = "time"

    return edit_csv(e, "missing-column", "social/interactions.csv", edit)


def unknown_item(e: Env) -> Path:
    def edit(rows: list[list[str]]) -> None:
        rows[5][1] = "no-such-item"

    return edit_csv(e, "unknown-item", "social/interactions.csv", edit)


def huge_cell(e: Env) -> Path:
    def edit(rows: list[list[str]]) -> None:
        rows[3][1] = "x" * 100_000

    return edit_csv(e, "huge-cell", "finance/items.csv", edit)


def open_quote(e: Env) -> Path:
    world = e.copy_world("open-quote")
    path = world / "ecommerce" / "items.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[4] = lines[4].replace(",", ',"', 1)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return world


def one_interaction_each(e: Env) -> Path:
    def edit(rows: list[list[str]]) -> None:
        seen: set[str] = set()
        keep = [rows[0]]
        for r in rows[1:]:
            if r[0] not in seen:
                seen.add(r[0])
                keep.append(r)
        rows[:] = keep

    return edit_csv(e, "one-each", "finance/interactions.csv", edit)


# -- faulty run directories --------------------------------------------------------------------


def corrupt_config(e: Env) -> Path:
    run_dir = e.copy_run("corrupt-config")
    (run_dir / "config.json").write_text('{"run_config": {"seed": ')
    return run_dir


def truncated_checkpoint(e: Env) -> Path:
    run_dir = e.copy_run("truncated")
    last = sorted((run_dir / "checkpoints").glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:300])
    return run_dir


def no_checkpoint(e: Env) -> Path:
    run_dir = e.copy_run("no-checkpoint")
    shutil.rmtree(run_dir / "checkpoints")
    return run_dir


def moved_data(e: Env) -> Path:
    run_dir = e.copy_run("moved-data")
    doc = json.loads((run_dir / "config.json").read_text())
    doc["run_config"]["data-dir"] = str(e.tmp / "gone")
    (run_dir / "config.json").write_text(json.dumps(doc))
    return run_dir


def edited_model(e: Env) -> Path:
    run_dir = e.copy_run("edited-model")
    doc = json.loads((run_dir / "config.json").read_text())
    doc["run_config"]["model.dim"] = 8
    (run_dir / "config.json").write_text(json.dumps(doc))
    return run_dir


def incomplete(e: Env) -> Path:
    run_dir = e.copy_run("incomplete")
    (run_dir / "INCOMPLETE").write_text("started; no results.json yet\n")
    return run_dir


def a_file(e: Env) -> Path:
    path = e.tmp / "a-file"
    path.write_text("not a folder\n")
    return path


def earlier_run(e: Env) -> Path:
    out = e.tmp / "out"
    (out / "federated-dp").mkdir(parents=True)
    (out / "summary.json").write_text('{"rows": {}}\n')
    (out / "federated-dp" / "privacy-ledger.jsonl").write_text('{"round": 1}\n')
    return out


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def earlier_run_untouched(e: Env) -> None:
    fresh = e.tmp / "fresh"
    fresh.mkdir()
    (fresh / "federated-dp").mkdir()
    (fresh / "summary.json").write_text('{"rows": {}}\n')
    (fresh / "federated-dp" / "privacy-ledger.jsonl").write_text('{"round": 1}\n')
    assert _digest(e.tmp / "out") == _digest(fresh), "a refused run changed the earlier one"


USER = "u00000"  # the synthetic world's first person

CASES = [
    # dataset: simulate --data with a faulty dataset folder
    Case(
        "data-missing-folder",
        lambda e: ["simulate", "--data", str(e.tmp / "nope"), "--out", str(e.tmp / "out")],
        2,
        ("dataset folder not found",),
        no_out,
    ),
    Case("data-is-a-file", sim_on(a_file), 2, ("a-file",), no_out),
    Case("data-no-manifest", sim_on(no_manifest), 2, ("manifest.json",), no_out),
    Case("data-manifest-not-json", sim_on(manifest_not_json), 2, ("manifest.json:",), no_out),
    Case("data-manifest-dotdot", sim_on(manifest_dotdot), 2, ("bad path", "'..'"), no_out),
    Case(
        "data-manifest-symlink-out",
        sim_on(manifest_symlink_out),
        2,
        ("leads outside the dataset folder",),
        no_out,
    ),
    Case(
        "data-missing-column",
        sim_on(missing_column),
        2,
        ("interactions.csv:1", "missing column 'timestamp'"),
        no_out,
    ),
    Case("data-unknown-item", sim_on(unknown_item), 2, ("interactions.csv:", "no-such-item")),
    Case("data-huge-cell", sim_on(huge_cell), 2, ("items.csv:4", "the limit is 65,536"), no_out),
    Case("data-open-quote", sim_on(open_quote), 2, ("items.csv:",), no_out),
    Case(
        "data-no-trainable-user",
        sim_on(one_interaction_each),
        2,
        ("channel finance: no user has the 3 interactions",),
        no_out,
    ),
    # options: simulate with values out of range, conflicting or malformed
    Case("opt-rounds-zero", sim("--rounds", "0"), 2, ("num-server-rounds must be > 0",), no_out),
    Case(
        "opt-epsilon-inf",
        sim("--epsilon", "inf"),
        2,
        ("dp.target-epsilon must be a finite number",),
        no_out,
    ),
    Case("opt-epsilon-zero", sim("--epsilon", "0"), 2, ("dp.target-epsilon must be > 0",), no_out),
    Case("opt-lr-nan", sim("--set", "train.lr=nan"), 2, ("train.lr must be a finite",), no_out),
    Case("opt-shards-zero", sim("--shards", "0"), 2, ("'--shards'", "x>=1"), no_out),
    Case("opt-seed-negative", sim("--seed", "-1"), 2, ("seed must be in [0, 2**32)",), no_out),
    Case("opt-scenario-unknown", sim("--scenario", "mars"), 2, ("unknown scenario 'mars'",)),
    Case("opt-strategy-unknown", sim("--strategy", "best"), 2, ("strategy must be one of",)),
    Case("opt-set-malformed", sim("--set", "rounds"), 2, ("expected KEY=VALUE",), no_out),
    Case("opt-set-unknown-key", sim("--set", "train.speed=3"), 2, ("unknown key 'train.speed'",)),
    Case(
        "opt-set-wrong-type",
        sim("--set", "train.local-steps=many"),
        2,
        ("train.local-steps must be a int",),
    ),
    Case(
        "opt-dp-conflict",
        sim("--no-dp", "--set", "dp.enabled=true"),
        2,
        ("--no-dp and --set dp.enabled=true disagree",),
        no_out,
    ),
    Case(
        "opt-dp-not-bool",
        sim("--set", "dp.enabled=maybe"),
        2,
        ("dp.enabled must be true or false",),
    ),
    Case(
        "opt-channel-unknown",
        sim("--set", "channels=ecommerce,travel"),
        2,
        ("channels ['travel'] are not in the dataset",),
        no_out,
    ),
    Case(
        "opt-delta-too-large",
        sim("--set", "dp.target-delta=0.5"),
        2,
        ("dp.target-delta must be < 1/users",),
        no_out,
    ),
    Case(
        "opt-dim-above-encoder",
        sim("--set", "model.dim=999"),
        2,
        ("model.dim must be in [1, item vector size 32]",),
        no_out,
    ),
    Case(
        "opt-item-table-federated",
        sim("--set", "model.item-table=true"),
        2,
        ("the federation does not carry per-item tables",),
        no_out,
    ),
    # output locations: checked before any work, never reused silently
    Case(
        "out-is-a-file",
        lambda e: [*sim()(e)[:3], "--out", str(a_file(e))],
        2,
        ("is a file, not a folder",),
    ),
    Case(
        "out-under-a-file",
        lambda e: [*sim()(e)[:3], "--out", str(a_file(e) / "run")],
        2,
        ("cannot be created", "is a file"),
    ),
    Case(
        "out-holds-a-run",
        lambda e: [*sim()(e)[:3], "--out", str(earlier_run(e))],
        2,
        ("already holds files", "--resume"),
        earlier_run_untouched,
    ),
    Case("out-resume-nothing", sim("--resume"), 2, ("holds no earlier run to resume",), no_out),
    Case(
        "deploy-out-holds-a-run",
        lambda e: [
            "deploy",
            "local",
            "--insecure",
            "--data",
            str(e.world),
            "--out",
            str(earlier_run(e)),
        ],
        2,
        ("already holds files", "give a new --out."),
        earlier_run_untouched,
    ),
    Case(
        "encode-out-is-a-file",
        lambda e: ["encode", str(e.world), "--out", str(a_file(e)), "--model-dir", str(e.bert)],
        2,
        ("is a file",),
    ),
    # recommend: requests a platform's serving must refuse
    Case(
        "rec-not-a-run-dir",
        lambda e: ["recommend", str(e.world), "--channel", "finance", "--user", USER],
        2,
        ("is not a run directory (no config.json)",),
    ),
    Case(
        "rec-missing-run-dir",
        lambda e: ["recommend", str(e.tmp / "nope"), "--channel", "finance", "--user", USER],
        2,
        ("is not a run directory",),
        lambda e: None if not (e.tmp / "nope").exists() else pytest.fail("created the run dir"),
    ),
    Case(
        "rec-corrupt-config",
        rec(corrupt_config, "--channel", "finance", "--user", USER),
        2,
        ("config.json: not a readable run record",),
    ),
    Case(
        "rec-truncated-checkpoint",
        rec(truncated_checkpoint, "--channel", "finance", "--user", USER),
        2,
        ("round-0002.safetensors: not a readable checkpoint",),
    ),
    Case(
        "rec-no-checkpoint",
        rec(no_checkpoint, "--channel", "finance", "--user", USER),
        2,
        ("has no checkpoint",),
    ),
    Case(
        "rec-moved-data",
        rec(moved_data, "--channel", "finance", "--user", USER),
        2,
        ("is not there (moved or deleted?)", "--data"),
    ),
    Case(
        "rec-config-edited",
        rec(edited_model, "--channel", "finance", "--user", USER),
        2,
        ("does not fit the model its config.json describes",),
    ),
    Case(
        "rec-unknown-channel",
        rec(None, "--channel", "travel", "--user", USER),
        2,
        ("channel 'travel' is not in this run",),
    ),
    Case(
        "rec-unknown-user",
        rec(None, "--channel", "finance", "--user", "nobody"),
        2,
        ("user 'nobody' has no interactions on channel 'finance'",),
    ),
    Case("rec-no-user-no-query", rec(None, "--channel", "finance"), 2, ("give --user, --query",)),
    Case(
        "rec-empty-query",
        rec(None, "--channel", "finance", "--query", " "),
        2,
        ("--query is empty",),
    ),
    Case(
        "rec-k-zero",
        rec(None, "--channel", "finance", "--user", USER, "--k", "0"),
        2,
        ("'--k'", "1<=x<=10000"),
    ),
    Case(
        "rec-incomplete-run",
        rec(incomplete, "--channel", "ecommerce", "--user", USER, "--k", "3"),
        0,
        ("is an incomplete run", "top 3 on ecommerce"),
    ),
    # train, encode, world
    Case(
        "train-missing-data",
        lambda e: ["train", "--data", str(e.tmp / "nope"), "--channel", "finance"],
        2,
        ("does not exist",),
    ),
    Case(
        "train-unknown-channel",
        lambda e: ["train", "--data", str(e.world), "--channel", "travel"],
        2,
        ("unknown channel 'travel'",),
    ),
    Case(
        "train-not-encoded",
        lambda e: ["train", "--data", str(e.world), "--channel", "finance"],
        2,
        ("no item matrix", "fedrec encode"),
    ),
    Case(
        "train-epsilon-inf",
        lambda e: ["train", "--data", str(e.world), "--channel", "finance", "--epsilon", "inf"],
        2,
        ("must be a finite number > 0",),
    ),
    Case(
        "train-delta-one",
        lambda e: ["train", "--data", str(e.world), "--channel", "finance", "--delta", "1"],
        2,
        ("must be in (0, 1)",),
    ),
    Case(
        "encode-missing-data",
        lambda e: ["encode", str(e.tmp / "nope")],
        2,
        ("does not exist",),
    ),
    Case(
        "encode-unknown-channel",
        lambda e: ["encode", str(e.world), "--channels", "travel"],
        2,
        ("unknown channel(s) ['travel']",),
    ),
    Case(
        "encode-not-a-model",
        lambda e: ["encode", str(e.world), "--model-dir", str(e.world)],
        1,
        ("is not a model folder",),
    ),
    Case(
        "world-users-malformed",
        lambda e: ["world", "--out", str(e.tmp / "w"), "--users", "finance"],
        2,
        ("--users takes CHANNEL=N",),
    ),
    Case(
        "world-users-unknown-channel",
        lambda e: ["world", "--out", str(e.tmp / "w"), "--users", "travel=5"],
        2,
        ("names channel 'travel'",),
    ),
    Case(
        "world-overlap-range",
        lambda e: ["world", "--out", str(e.tmp / "w"), "--overlap", "2"],
        2,
        ("overlap must be in [0, 1]",),
    ),
    Case(
        "world-movielens-absent",
        lambda e: [
            "world",
            "--scenario",
            "movielens-1m",
            "--data-root",
            str(e.tmp),
            "--out",
            str(e.tmp / "w"),
        ],
        1,
        ("movielens-1m data not found", "--data-root"),
    ),
    Case("cli-unknown-command", lambda e: ["simulat"], 2, ("No such command 'simulat'",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_clear_message_and_a_nonzero_exit(
    case: Case, env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = run(case.argv(env))

    # Assert
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    assert code == case.code, text[-2000:]
    for words in case.says:
        assert " ".join(words.split()) in text, text[-2000:]
    assert "Traceback" not in text
    if case.check is not None:
        case.check(env)


def test_debug_shows_the_traceback_a_message_hides(env: Env) -> None:
    # Execute / Assert: the same bad input, with --debug, raises the original error
    from fedrec.shared.errors import FedrecError

    with pytest.raises(FedrecError, match="dataset folder not found"):
        run(["--debug", "simulate", "--data", str(env.tmp / "nope")])


def test_an_unexpected_error_is_reported_as_a_bug_with_exit_70(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the dataset loader fails the way only a bug would
    import fedrec.shared.datasets as datasets

    def broken(*_: object, **__: object) -> None:
        raise KeyError("manifest-cache")

    monkeypatch.setattr(datasets, "load_manifest", broken)

    # Execute
    code = run(["simulate", "--data", str(env.world), "--out", str(env.tmp / "out")])

    # Assert
    text = " ".join(capsys.readouterr().err.split())
    assert code == INTERNAL_ERROR
    assert "internal error (KeyError: 'manifest-cache')" in text and "--debug" in text
    assert "Traceback" not in text


def test_an_unusable_run_key_stops_simulate_before_any_work(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: FEDREC_RUN_KEY names a short key, by a path relative to this folder
    (env.tmp / "short.key").write_text("too short")
    monkeypatch.setenv("FEDREC_RUN_KEY", "short.key")

    # Execute
    code = run(["simulate", "--data", str(env.world), "--out", str(env.tmp / "out")])

    # Assert: one message, exit 2, nothing written (it used to fail in the ServerApp, exit 70)
    text = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "at least 32 are needed" in text and "openssl rand -hex 32" in text
    assert str(env.tmp / "short.key") in text  # the path made absolute for the ServerApp
    assert not (env.tmp / "out").exists()


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (
            TimeoutError("simulation exceeded 30s; log: run/flower.log"),
            "TimeoutError: simulation exceeded 30s; log: run/flower.log",
        ),
        (
            PermissionError(13, "Permission denied", "/srv/runs/x"),
            "Permission denied: /srv/runs/x.",
        ),
    ],
    ids=["timeout", "permission"],
)
def test_an_os_error_says_what_happened_and_where(
    error: OSError,
    says: str,
    env: Env,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedrec.shared.datasets as datasets

    def fail(*_: object, **__: object) -> None:
        raise error

    monkeypatch.setattr(datasets, "load_manifest", fail)

    code = run(["simulate", "--data", str(env.world), "--out", str(env.tmp / "out")])

    text = " ".join(capsys.readouterr().err.split())
    assert code == 1 and says in text and "Traceback" not in text


def test_a_fingerprint_from_the_server_never_names_a_file_outside_the_item_cache(
    tmp_path: Path,
) -> None:
    from fedrec.client.node import Node, NodeConfigError, items_path

    node = Node(channel="finance", data_dir=tmp_path, state_dir=tmp_path / "state")

    with pytest.raises(NodeConfigError, match="not a sha256 hex digest"):
        items_path(node, "../../etc/cron.d/x")
    assert items_path(node, "ab" * 32).parent == tmp_path / "state" / "items"


def test_the_reliability_table_lists_every_case() -> None:
    doc = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`([a-z0-9-]+)`", doc))

    missing = [c.id for c in CASES if c.id not in listed]

    assert not missing, f"docs/reliability.md does not list: {missing}"
    assert len({c.id for c in CASES}) == len(CASES)


def test_strict_json_everywhere_a_run_writes_json(tmp_path: Path) -> None:
    from fedrec.server.rundir import RunDir
    from fedrec.shared import hashlog

    run_dir = RunDir(tmp_path / "run")
    run_dir.metrics(1, "finance", "evaluate", {"loss": float("nan")})
    run_dir.ledger({"round": 1, "channel": "finance", "epsilon": float("inf")})
    run_dir.results({"channels": {"finance": {"privacy": {"epsilon": float("inf")}}}})

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in {text!r}"))

    for name in ("metrics.jsonl", "privacy-ledger.jsonl"):
        for line in (run_dir.path / name).read_text().splitlines():
            strict(line)
    results = strict((run_dir.path / "results.json").read_text())
    assert results["channels"]["finance"]["privacy"]["epsilon"] is None  # type: ignore[index]
    assert hashlog.verify(run_dir.path / "privacy-ledger.jsonl").ok  # the chain still holds

"""Small, fast stand-ins for real components, shared by tests: a tiny randomly initialised
BERT saved to disk (loaded through the normal offline path), a small synthetic world, and a
command stopped by a signal at a chosen moment (``stop_when``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "travel rewards credit card carry on suitcase frequent flyer organic baby food pouch "
    "savings account loan mortgage insurance phone laptop charger cable shoe running jacket "
    "rain coffee tea mug book novel history science kitchen knife pan oven garden seed lamp "
    "desk chair sofa bed pillow towel soap shampoo toy game puzzle music guitar piano camera "
    "lens bag wallet watch ring gold silver red blue green black white small large new"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    # transformers 5 reads the vocabulary from `vocab=`; `vocab_file=` is silently ignored.
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_small_world(folder: Path, people: int = 400, seed: int = 0) -> Path:
    """The synthetic world, scaled down (same generator, fewer people)."""
    from fedrec.shared.datasets import write_dataset
    from fedrec.simulations.world import WorldConfig, generate_world

    world = generate_world(WorldConfig(seed=seed).resized(people=people))
    return Path(
        write_dataset(
            folder,
            name="small",
            catalogues=world.catalogues,
            interactions=world.interactions,
            source=world.source(),
            extra_files=world.ground_truth_files(),
        )
    )


@dataclass(frozen=True)
class TinyRun:
    world: Path
    bert: Path
    cache: Path
    run: Path


def write_tiny_run(root: Path, people: int = 120) -> TinyRun:
    """A small world, a tiny random BERT (32-dim vectors) and a run directory whose round-1
    and round-2 checkpoints fit them (as ``fedrec simulate`` leaves it, without training)."""
    from fedrec.server.rundir import RunDir
    from fedrec.shared.config import FedrecConfig, ModelConfig
    from fedrec.shared.model import build_model, param_shapes

    world = write_small_world(root / "world", people=people)
    bert = save_tiny_bert(root / "bert")
    cfg = FedrecConfig(
        channels=("ecommerce", "social", "finance"),
        data_dir=str(world),
        encoder_dir=str(bert),
        cache_dir=str(root / "cache"),
        model=ModelConfig(dim=16),
    )
    model = build_model(cfg, 32)
    run = RunDir(root / "run")
    run.start(cfg.to_run_config(), list(cfg.channels), param_shapes(model))
    for r in (1, 2):
        run.checkpoint(r, {k: v.numpy() for k, v in model.state_dict().items()})
    run.results({"rounds_completed": 2, "channels": {}})
    return TinyRun(world, bert, root / "cache", run.path)


@dataclass(frozen=True)
class CliResult:
    exit_code: int
    output: str  # stdout and stderr together


def fedrec_cli(args: list[str]) -> CliResult:
    """``fedrec ARGS`` in this process through the console script's own entry point
    (``fedrec.cli.main.run``: its one error path included), on a wide terminal."""
    import contextlib
    import io
    import os

    from fedrec.cli.main import run

    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "200"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = run(args)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return CliResult(code, out.getvalue())


def stop_when(
    cmd: list[str],
    env: dict[str, str],
    ready: Callable[[], bool],
    sig: int,
    what: str,
    timeout: float = 300,
) -> int:
    """Start ``cmd`` in its own session, send ``sig`` to its whole process group once
    ``ready()`` holds (``what`` names that moment in a failure), and return its exit code."""
    import os
    import subprocess
    import time

    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"the command ended before {what}"
            assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)  # SIGKILL


def tiny_simulate(world: Path, bert: Path, out: Path, rounds: int, *extra: str) -> list[str]:
    """The ``fedrec simulate`` command line of a small, fast run on ``world`` with ``bert``."""
    import sys

    fedrec = str(Path(sys.executable).with_name("fedrec"))
    return [
        fedrec,
        "simulate",
        "--data",
        str(world),
        "--out",
        str(out),
        "--rounds",
        str(rounds),
        "--no-baselines",
        "--set",
        f"encoder-dir={bert}",
        "--set",
        "model.dim=16",
        "--set",
        "train.local-steps=2",
        *extra,
    ]

"""DP-SGD throughput benchmark: users/s with DP ÷ users/s without, same model, same batch size.

Every variant (no DP, and DP with each ``grad_sample_mode``) lives in one process with its own
model, optimizer and loader, and is timed in short windows that alternate between variants
round after round (the order rotates every round), so load from other processes hits all
variants alike. Reported: median users/s per variant, and the median over rounds of the
per-round time ratio DP / no DP. The training step is the one ``client.training.train_local``
runs (``train_step``): the tower's examples (``--tower``; Poisson-sampled under DP), the
default model (per-platform tower included; ``--item-table``: with item tables),
``LinearizedLoss``, Adam, σ = 1, C = 1, full-catalogue softmax with scores in ``--scores-dtype``.

``--profile`` adds where one step's time goes (data pipeline, forward+backward, optimizer).

Run::

    python -m fedrec.simulations.bench.dp [--users 20000] [--batch-sizes 128,512] [--rounds 5]

Must not: be imported by ``client/`` or ``server/``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer

if TYPE_CHECKING:
    import torch

    from fedrec.shared.data import Sequences
    from fedrec.shared.model import ModelSpec

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
MODES = ("ghost", "hooks", "ew", "functorch")


def synthetic_sequences(users: int, items: int, seed: int = 0) -> tuple[torch.Tensor, Sequences]:
    """Random unit 384-d item vectors and users with 5..60 interactions (histories 4..59)."""
    import torch

    from fedrec.shared.data import Sequences

    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(items, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    lengths = rng.integers(5, 61, size=users)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = rng.integers(0, items, size=int(offsets[-1])).astype(np.int64)
    names = np.array([f"u{i}" for i in range(users)])
    return torch.from_numpy(vectors), Sequences(names, offsets, flat)


class Variant:
    """One model + optimizer + loader, stepped like ``train_local``."""

    def __init__(
        self,
        name: str,
        mode: str | None,
        items: torch.Tensor,
        seqs: Sequences,
        batch_size: int,
        low_precision: bool,
        seed: int = 0,
        spec: ModelSpec | None = None,
    ) -> None:
        import torch

        from fedrec.client.training import LinearizedLoss, TrainSpec, _collate, examples_for
        from fedrec.shared.model import ModelSpec, RecModel

        torch.manual_seed(seed)
        self.name, self.items, self.low_precision = name, items, low_precision
        model = RecModel(spec or ModelSpec(own_tower=True))
        examples = examples_for(model, seqs, items, TrainSpec(batch_size=batch_size, seed=seed))
        loader = torch.utils.data.DataLoader(
            examples,
            batch_size=batch_size,
            shuffle=mode is None,
            collate_fn=_collate,
            generator=torch.Generator().manual_seed(seed),
        )
        self.optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.criterion: Callable[..., torch.Tensor] = LinearizedLoss()
        self.net: torch.nn.Module = model  # Opacus's wrapper under DP
        self.model = model
        if mode is not None:
            from fedrec.client.dp import DPSession
            from fedrec.client.training import trainable_users
            from fedrec.shared.config import DPConfig

            session = DPSession(
                DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode),
                users=trainable_users(seqs),
                batch_size=batch_size,
                planned_steps=1,
                channel=name,
            )
            self.net, self.optimizer, self.criterion, loader = session.make_private(
                model, self.optimizer, loader, self.criterion
            )
        self.loader = loader
        self.batches = self._forever()

    def _forever(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            yield from self.loader

    def step(self) -> int:
        from fedrec.client.training import train_step

        batch = next(self.batches)
        args = (self.net, self.model, self.optimizer, self.criterion, self.items, batch)
        train_step(*args, self.low_precision)
        return len(batch[1])  # the users drawn (cands: one row per user)

    def window(self, steps: int) -> float:
        """Users per second over ``steps`` steps."""
        start = time.perf_counter()
        users = sum(self.step() for _ in range(steps))
        return users / (time.perf_counter() - start)


def run_ratio(
    items: torch.Tensor,
    seqs: Sequences,
    batch_size: int,
    modes: list[str],
    rounds: int,
    window_users: int,
    low_precision: bool,
    spec: ModelSpec | None = None,
) -> list[tuple[str, float, float]]:
    """(variant, median users/s, median per-round time ratio vs no DP) per variant."""
    args = (items, seqs, batch_size, low_precision)
    variants = [Variant("no DP", None, *args, spec=spec)]
    for mode in modes:
        try:
            variants.append(Variant(f"DP {mode}", mode, *args, spec=spec))
            variants[-1].window(1)  # warm-up; also proves the mode works on this model
        except Exception as exc:  # noqa: BLE001 - a mode that fails is reported, not fatal
            typer.echo(f"  B={batch_size} {mode}: failed ({type(exc).__name__}: {exc})")
            variants.pop()
    variants[0].window(1)
    steps = max(1, window_users // batch_size)
    speeds: dict[str, list[float]] = {v.name: [] for v in variants}
    ratios: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        this = {v.name: v.window(steps) for v in order}
        for name, speed in this.items():
            speeds[name].append(speed)
            ratios[name].append(this["no DP"] / speed)
    return [
        (v.name, statistics.median(speeds[v.name]), statistics.median(ratios[v.name]))
        for v in variants
    ]


def profile(
    items: torch.Tensor,
    seqs: Sequences,
    batch_size: int,
    repeats: int,
    low_precision: bool,
    spec: ModelSpec | None = None,
) -> None:
    """Where one ghost-mode DP step spends its time, against the same step without DP."""
    from fedrec.client.training import TrainSpec, examples_for, linearized_loss
    from fedrec.shared.model import ModelSpec, RecModel

    model = RecModel(spec or ModelSpec(own_tower=True))
    examples = examples_for(model, seqs, items, TrainSpec(batch_size=batch_size))
    rng = np.random.default_rng(1)
    idx = iter(
        [rng.choice(len(examples), size=batch_size, replace=False).tolist() for _ in range(repeats)]
    )
    start = time.perf_counter()
    batches = [examples.__getitems__(next(idx)) for _ in range(repeats)]
    get_ms = (time.perf_counter() - start) / repeats * 1e3

    def steps(v: Variant) -> tuple[float, float, float]:
        v.window(1)
        scores, model, opt = [], [], []
        for inputs, cands in batches:
            v.optimizer.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            users = v.net(**inputs)
            t1 = time.perf_counter()
            _, args = linearized_loss(v.model, users, items, cands, low_precision)
            t2 = time.perf_counter()
            v.criterion(*args).backward()
            t3 = time.perf_counter()
            v.optimizer.step()
            scores.append(t2 - t1)
            model.append(t1 - t0 + t3 - t2)
            opt.append(time.perf_counter() - t3)
        return tuple(statistics.median(t) * 1e3 for t in (scores, model, opt))  # type: ignore[return-value]

    args = (items, seqs, batch_size, low_precision)
    dp = steps(Variant("DP ghost", "ghost", *args, spec=spec))
    plain = steps(Variant("no DP", None, *args, spec=spec))
    typer.echo(
        f"  B={batch_size} per step (median of {repeats}): examples' __getitems__ "
        f"{get_ms:.2f} ms; catalogue scores forward+backward (+ the output table's term) "
        f"{dp[0]:.1f} ms (DP) / "
        f"{plain[0]:.1f} ms (no DP); model forward+backward {dp[1]:.1f} / {plain[1]:.1f} ms; "
        f"optimizer step {dp[2]:.1f} / {plain[2]:.1f} ms"
    )


@app.command()
def main(
    users: Annotated[int, typer.Option(min=1)] = 20_000,
    items: Annotated[int, typer.Option(min=2)] = 5_000,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "128,512",
    modes: Annotated[str, typer.Option(help="grad_sample_mode values.")] = ",".join(MODES),
    rounds: Annotated[int, typer.Option(min=1, help="Timed windows per variant.")] = 5,
    window_users: Annotated[int, typer.Option(min=1, help="Users per timed window.")] = 1024,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 1,
    scores_dtype: Annotated[
        str, typer.Option(help="auto, float32 or bfloat16 (train.scores-dtype).")
    ] = "auto",
    profile_steps: Annotated[
        int, typer.Option("--profile", help="Also profile this many steps (0: skip).")
    ] = 0,
    tower: Annotated[str, typer.Option(help="model.tower: mean or attention.")] = "mean",
    item_table: Annotated[
        bool, typer.Option("--item-table", help="With item tables (model.item-table).")
    ] = False,
) -> None:
    """Print users/s and the DP / no-DP time ratio per grad_sample_mode and batch size."""
    import torch

    torch.set_num_threads(threads)
    from fedrec.client.training import TrainSpec, resolve_scores_dtype
    from fedrec.shared.model import ModelSpec, RecModel

    dtype = resolve_scores_dtype(scores_dtype)
    vectors, seqs = synthetic_sequences(users, items)
    spec = ModelSpec(own_tower=True, tower=tower, item_table=items if item_table else 0)
    model = RecModel(spec)
    n_params = sum(p.numel() for p in model.parameters())
    typer.echo(f"model {model.spec} ({n_params:,} parameters)")
    typer.echo(
        f"{users} users, {items} items, torch threads {threads}, scores {dtype}, Adam, sigma 1, C 1, "
        f"{TrainSpec(scores_dtype=dtype)}, {rounds} interleaved windows of ~{window_users} "
        "users per variant"
    )
    from fedrec.client.standalone import quiet_opacus

    with quiet_opacus():
        for b in (int(x) for x in batch_sizes.split(",")):
            low = dtype == "bfloat16"
            chosen = [m for m in modes.split(",") if m]
            results = run_ratio(vectors, seqs, b, chosen, rounds, window_users, low, spec)
            typer.echo(f"\n| B={b} | median users/s | median time ratio vs no DP |")
            typer.echo("|---|---|---|")
            for name, speed, ratio in results:
                typer.echo(f"| {name} | {speed:,.0f} | {ratio:.2f}x |")
            if profile_steps:
                profile(vectors, seqs, b, profile_steps, low, spec)


if __name__ == "__main__":
    app()

"""DP-SGD throughput benchmark: users/s with DP ÷ users/s without, same model, same batch size.

Every variant (no DP, and DP with each ``grad_sample_mode``) lives in one process with its own
model, optimizer and loader, and is timed in short windows that alternate between variants
round after round (the order rotates every round), so load from other processes hits all
variants alike. Reported: median users/s per variant, and the median over rounds of the
per-round time ratio DP / no DP. The training step is the one ``client.training.train_local``
runs: ``UserExamples`` batches (Poisson-sampled under DP), ``_loss_inputs``, Adam, σ = 1, C = 1.

``--profile`` adds where one step's time goes (data pipeline, forward+backward, optimizer) and
compares ``pad_histories`` with the vectorised :func:`pad_histories_vectorised` below.

Run::

    python -m simulations.bench_dp [--users 20000] [--batch-sizes 128,512] [--rounds 5]

Must not: be imported by ``client/`` or ``server/`` (the vectorised padding is a proposal).
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

    from shared.data import Sequences

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
MODES = ("ghost", "hooks", "ew", "functorch")


def synthetic_sequences(users: int, items: int, seed: int = 0) -> tuple[torch.Tensor, Sequences]:
    """Random unit 384-d item vectors and users with 5..60 interactions (histories 4..59)."""
    import torch

    from shared.data import Sequences

    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(items, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    lengths = rng.integers(5, 61, size=users)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = rng.integers(0, items, size=int(offsets[-1])).astype(np.int64)
    names = np.array([f"u{i}" for i in range(users)])
    return torch.from_numpy(vectors), Sequences(names, offsets, flat)


def pad_histories_vectorised(
    seqs: Sequences, rows: np.ndarray, ends: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Same output as ``client.training.pad_histories`` without a Python loop per row.

    Row i holds ``item_index[s + max(0, e - max_len) : s + e]`` right-aligned, where
    ``s = offsets[rows[i]]`` and ``e = ends[i]``.
    """
    rows, ends = np.asarray(rows, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    first = seqs.offsets[rows] + np.maximum(ends - max_len, 0)  # (B,) first item position
    n = np.minimum(ends, max_len)  # (B,) window length
    col = np.arange(max_len)[None, :]  # (1, L)
    pad = max_len - n[:, None]  # (B, 1) padded columns on the left
    mask = col >= pad  # (B, L)
    if not len(seqs.item_index):
        return np.zeros(mask.shape, dtype=np.int64), mask
    pos = np.where(mask, first[:, None] + col - pad, 0)  # (B, L)
    return np.where(mask, seqs.item_index[pos], 0).astype(np.int64), mask


class Variant:
    """One model + optimizer + loader, stepped like ``train_local``."""

    def __init__(
        self,
        name: str,
        mode: str | None,
        items: torch.Tensor,
        seqs: Sequences,
        batch_size: int,
        seed: int = 0,
    ) -> None:
        import torch

        from client.training import TrainSpec, UserExamples, _collate
        from shared.model import RecModel

        torch.manual_seed(seed)
        self.name, self.items = name, items
        spec = TrainSpec(batch_size=batch_size, seed=seed)
        model = RecModel()
        examples = UserExamples(seqs, len(items), spec)
        loader = torch.utils.data.DataLoader(
            examples,
            batch_size=batch_size,
            shuffle=mode is None,
            collate_fn=_collate,
            generator=torch.Generator().manual_seed(seed),
        )
        self.optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.criterion: Callable[..., torch.Tensor] = torch.nn.CrossEntropyLoss()
        self.net: torch.nn.Module = model
        if mode is not None:
            from opacus import PrivacyEngine

            made = PrivacyEngine(accountant="rdp").make_private(
                module=model,
                optimizer=self.optimizer,
                data_loader=loader,
                criterion=self.criterion,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=True,
                grad_sample_mode=mode,
            )
            if mode == "ghost":
                self.net, self.optimizer, self.criterion, loader = made
            else:
                self.net, self.optimizer, loader = made
        self.loader = loader
        self.batches = self._forever()

    def _forever(self) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            yield from self.loader

    def step(self) -> int:
        from client.training import _loss_inputs

        batch = next(self.batches)
        self.optimizer.zero_grad(set_to_none=True)
        logits, labels = _loss_inputs(self.net, self.items, batch)
        self.criterion(logits, labels).backward()
        self.optimizer.step()
        return len(batch[0])

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
) -> list[tuple[str, float, float]]:
    """(variant, median users/s, median per-round time ratio vs no DP) per variant."""
    variants = [Variant("no DP", None, items, seqs, batch_size)]
    for mode in modes:
        try:
            variants.append(Variant(f"DP {mode}", mode, items, seqs, batch_size))
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


def profile(items: torch.Tensor, seqs: Sequences, batch_size: int, repeats: int) -> None:
    """Where one ghost-mode DP step spends its time, and the padding loop vs vectorised."""
    from client.training import TrainSpec, UserExamples, pad_histories

    examples = UserExamples(seqs, len(items), TrainSpec(batch_size=batch_size))
    rng = np.random.default_rng(1)
    idx = [
        rng.choice(len(examples), size=batch_size, replace=False).tolist() for _ in range(repeats)
    ]

    def timed(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e3

    it = iter(idx * 2)
    get_ms = timed(lambda: examples.__getitems__(next(it)))
    rows = examples.rows[np.asarray(idx[0])]
    ends = (rng.random(batch_size) * (seqs.lengths()[rows] - 1)).astype(np.int64) + 1
    loop_ms = timed(lambda: pad_histories(seqs, rows, ends, 50))
    vec_ms = timed(lambda: pad_histories_vectorised(seqs, rows, ends, 50))
    a, b = pad_histories(seqs, rows, ends, 50), pad_histories_vectorised(seqs, rows, ends, 50)
    same = np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])

    import torch

    from client.training import _loss_inputs

    v = Variant("DP ghost", "ghost", items, seqs, batch_size)
    v.window(1)
    batches = [next(v.batches) for _ in range(repeats)]
    fb, opt = [], []
    for batch in batches:
        v.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits, labels = _loss_inputs(v.net, items, batch)
        v.criterion(logits, labels).backward()
        t1 = time.perf_counter()
        v.optimizer.step()
        fb.append(t1 - t0)
        opt.append(time.perf_counter() - t1)
    plain = Variant("no DP", None, items, seqs, batch_size)
    plain.window(1)
    pfb, popt = [], []
    for batch in batches:
        plain.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits, labels = _loss_inputs(plain.net, items, batch)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        t1 = time.perf_counter()
        plain.optimizer.step()
        pfb.append(t1 - t0)
        popt.append(time.perf_counter() - t1)
    med = statistics.median
    typer.echo(
        f"  B={batch_size} per step (median of {repeats}): UserExamples.__getitems__ "
        f"{get_ms:.2f} ms (pad_histories loop {loop_ms:.2f} ms, vectorised {vec_ms:.3f} ms, "
        f"identical={same}); ghost forward+backward {med(fb) * 1e3:.1f} ms, DP optimizer step "
        f"{med(opt) * 1e3:.1f} ms; no-DP forward+backward {med(pfb) * 1e3:.1f} ms, Adam step "
        f"{med(popt) * 1e3:.1f} ms"
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
    profile_steps: Annotated[
        int, typer.Option("--profile", help="Also profile this many steps (0: skip).")
    ] = 0,
) -> None:
    """Print users/s and the DP / no-DP time ratio per grad_sample_mode and batch size."""
    import torch

    torch.set_num_threads(threads)
    from shared.model import RecModel

    vectors, seqs = synthetic_sequences(users, items)
    model = RecModel()
    n_params = sum(p.numel() for p in model.parameters())
    typer.echo(f"model {model.spec} ({n_params:,} parameters)")
    typer.echo(
        f"{users} users, {items} items, torch threads {threads}, Adam, sigma 1, C 1, "
        f"100 negatives, history <= 50, {rounds} interleaved windows of ~{window_users} "
        "users per variant"
    )
    from simulations.train import quiet_opacus

    with quiet_opacus():
        for b in (int(x) for x in batch_sizes.split(",")):
            results = run_ratio(
                vectors, seqs, b, [m for m in modes.split(",") if m], rounds, window_users
            )
            typer.echo(f"\n| B={b} | median users/s | median time ratio vs no DP |")
            typer.echo("|---|---|---|")
            for name, speed, ratio in results:
                typer.echo(f"| {name} | {speed:,.0f} | {ratio:.2f}x |")
            if profile_steps:
                profile(vectors, seqs, b, profile_steps)


if __name__ == "__main__":
    app()

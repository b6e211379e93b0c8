"""Quality benchmark: what DP costs in ranking quality, per channel and pooled.

For every channel of a dataset (and all channels pooled into one dataset, catalogues
concatenated), on the leave-last-out split with full ranking (seen items excluded):
popularity, text similarity, the model without DP, and the model with DP-SGD at each target ε
(δ fixed). Prints one markdown table of NDCG@10 / HR@10 and the ratio
NDCG@10(DP, largest ε) / NDCG@10(no DP).

Run::

    python -m fedrec.simulations.bench.quality --data worlds/synthetic [--items DIR] [--steps 150]
    python -m fedrec.simulations.bench.quality --tiny /tmp/tiny   # self-contained smoke run

``--tiny`` writes a small dataset with 384-d topic-structured item vectors standing in for the
encoder (no transformer needed) and benchmarks that.

Must not: hold training logic (it calls :func:`fedrec.client.standalone.fit`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedrec.shared.config import FedrecConfig

if TYPE_CHECKING:
    import torch

    from fedrec.client.training import Split, TrainSpec

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
RUN = FedrecConfig()  # the defaults of a run: the benchmark trains as one channel would


def write_tiny_dataset(
    out: Path,
    *,
    channels: tuple[str, ...] = ("shop", "bank"),
    users: int = 400,
    items: int = 240,
    topics: int = 12,
    seed: int = 0,
) -> Path:
    """A small ``fedrec-dataset/1`` folder plus ``encoded/<channel>.items.npz``.

    Items: unit 384-d vectors, ``topic centre + noise`` (topic = item index mod ``topics``).
    Users: a start topic; each next item comes from the same topic with probability 0.5, else
    from the next topic, so text similarity alone is not enough and a model can learn the rest.
    """
    import numpy as np

    from fedrec.shared.data import Catalogue, Interactions
    from fedrec.shared.datasets import write_dataset
    from fedrec.shared.items import ItemMatrix, save_item_matrix

    rng = np.random.default_rng(seed)
    dim = 384
    centres = rng.normal(size=(topics, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    catalogues, interactions, matrices = {}, {}, {}
    for c, channel in enumerate(channels):
        topic = np.arange(items) % topics
        vectors = centres[topic] + rng.normal(size=(items, dim)) * (0.6 / np.sqrt(dim))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = np.array([f"{channel}-{i}" for i in range(items)])
        catalogues[channel] = Catalogue(
            channel=channel,
            item_ids=ids,
            titles=np.array([f"item {i}" for i in range(items)]),
            descriptions=np.array([f"topic {t}" for t in topic]),
            categories=np.array([f"t{t}" for t in topic]),
            attributes=np.full(items, ""),
        )
        rows_u, rows_i, rows_t = [], [], []
        for u in range(users):
            t = int(rng.integers(topics))
            for k in range(int(rng.integers(3, 12))):
                if k and rng.random() < 0.5:
                    t = (t + 1) % topics
                rows_u.append(f"p{c}-{u:05d}")
                rows_i.append(int(rng.choice(np.flatnonzero(topic == t))))
                rows_t.append(1_700_000_000 + 3600 * k)
        n = len(rows_u)
        interactions[channel] = Interactions(
            channel=channel,
            user_ids=np.array(rows_u),
            item_index=np.array(rows_i, np.int64),
            timestamps=np.array(rows_t, np.int64),
            events=np.full(n, "view"),
            queries=np.full(n, ""),
        )
        matrices[channel] = ItemMatrix(channel, ids, vectors.astype(np.float32), "tiny-topics")
    write_dataset(
        out,
        name="tiny",
        catalogues=catalogues,
        interactions=interactions,
        source={"generator": "fedrec.simulations.bench.quality", "seed": seed},
    )
    for channel, m in matrices.items():
        save_item_matrix(m, out / "encoded" / f"{channel}.items.npz")
    return out


def pooled(parts: dict[str, tuple[torch.Tensor, Split]]) -> tuple[torch.Tensor, Split]:
    """All channels as one dataset: catalogues concatenated, item indices offset."""
    import numpy as np
    import torch

    from fedrec.client.training import Split
    from fedrec.shared.data import Sequences

    offsets = np.cumsum([0] + [len(items) for items, _ in parts.values()])
    trains = [split.train for _, split in parts.values()]
    lengths = np.concatenate([t.lengths() for t in trains])
    train = Sequences(
        np.concatenate([t.users for t in trains]),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        np.concatenate([t.item_index + o for t, o in zip(trains, offsets, strict=False)]),
    )
    target = np.concatenate(
        [split.target + o for (_, split), o in zip(parts.values(), offsets, strict=False)]
    )
    return torch.cat([items for items, _ in parts.values()]), Split(train, target)


def bench_scope(
    items: torch.Tensor,
    split: Split,
    spec: TrainSpec,
    *,
    epsilons: list[float],
    delta: float,
    max_eval_users: int,
    name: str,
    max_grad_norm: float = 1.0,
    log: Callable[[str], None] = typer.echo,
) -> dict[str, object]:
    """Every row of one scope (a channel or the pool): metrics, σ and seconds per method."""
    from fedrec.client.standalone import fit
    from fedrec.client.training import evaluate, trainable_users
    from fedrec.shared.config import DPConfig
    from fedrec.simulations.baselines import popularity_scorer, text_similarity_scorer

    n = len(items)
    ev = {"max_history": spec.max_history, "max_users": max_eval_users, "seed": spec.seed}
    row: dict[str, object] = {"scope": name, "users": trainable_users(split.train), "items": n}
    row["popularity"] = evaluate(popularity_scorer(split.train, n), n, split, **ev)[0]
    row["text similarity"] = evaluate(text_similarity_scorer(items), n, split, **ev)[0]
    _, f = fit(items, split, spec, dp=None, channel=name, max_eval_users=max_eval_users)
    row["no DP"] = f.metrics
    log(f"  {name}: no DP ndcg@10={f.metrics['ndcg@10']:.4f} ({f.seconds:.1f}s)")
    for eps in epsilons:
        _, f = fit(
            items,
            split,
            spec,
            dp=DPConfig(target_epsilon=eps, target_delta=delta, max_grad_norm=max_grad_norm),
            channel=name,
            max_eval_users=max_eval_users,
        )
        row[f"DP ε={eps:g}"] = f.metrics
        row[f"σ ε={eps:g}"] = f.noise_multiplier
        row["q"] = f.sample_rate
        log(
            f"  {name}: DP ε={eps:g} (spent {f.epsilon:.3f}, σ={f.noise_multiplier:.3f}, "
            f"q={f.sample_rate:.4g}) ndcg@10={f.metrics['ndcg@10']:.4f} ({f.seconds:.1f}s)"
        )
    return row


def markdown(rows: list[dict[str, object]], epsilons: list[float]) -> str:
    """One line per scope; cells are NDCG@10 / HR@10."""
    methods = ["popularity", "text similarity", "no DP", *(f"DP ε={e:g}" for e in epsilons)]
    top = f"DP ε={max(epsilons):g}"
    head = ["scope", "users", *methods, f"NDCG@10 {top} / no DP", "σ per ε"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["scope"]), str(r["users"])]
        for m in methods:
            metrics = r[m]
            cells.append(f"{metrics['ndcg@10']:.4f} / {metrics['hr@10']:.4f}")  # type: ignore[index]
        ratio = r[top]["ndcg@10"] / r["no DP"]["ndcg@10"]  # type: ignore[index]
        cells.append(f"{ratio:.2f}")
        cells.append(", ".join(f"{r[f'σ ε={e:g}']:.3f}" for e in epsilons))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@app.command()
def main(
    data: Annotated[Path | None, typer.Option(help="Dataset folder.")] = Path("worlds/synthetic"),
    items_dir: Annotated[
        Path | None, typer.Option("--items", help="Encoded item matrices [DATA/encoded].")
    ] = None,
    extra: Annotated[
        list[Path] | None,
        typer.Option(help="More dataset folders (e.g. a MovieLens-1M scenario), benched too."),
    ] = None,
    tiny: Annotated[
        Path | None, typer.Option(help="Write a tiny generated dataset here and bench it instead.")
    ] = None,
    channels: Annotated[str | None, typer.Option(help="Comma-separated channels [all].")] = None,
    no_pooled: Annotated[bool, typer.Option("--no-pooled", help="Skip the pooled scope.")] = False,
    steps: Annotated[
        int, typer.Option(min=1, help="As many as a run's rounds x local steps.")
    ] = RUN.planned_steps(),
    batch_size: Annotated[int, typer.Option(min=1)] = RUN.train.batch_size,
    lr: float = RUN.train.lr,
    head_lr_scale: Annotated[
        float, typer.Option(help="The head's projection learns at lr x this.")
    ] = RUN.train.head_lr_scale * RUN.model.head_scale,  # the run's W_o rate, at head scale 1
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = RUN.train.optimizer,
    max_grad_norm: Annotated[
        float, typer.Option(help="Per-user clipping bound C.")
    ] = RUN.dp.max_grad_norm,
    negatives: Annotated[
        int, typer.Option(min=0, help="0: softmax over the catalogue.")
    ] = RUN.train.negatives,
    positions: Annotated[
        int, typer.Option(min=1, help="Predictions per user per step.")
    ] = RUN.train.positions,
    epsilons: Annotated[str, typer.Option(help="Target ε values.")] = "1,4,8",
    delta: float = RUN.dp.target_delta,
    max_eval_users: Annotated[int, typer.Option(min=1)] = RUN.eval.max_users,
    seed: int = RUN.seed,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 1,
) -> None:
    """Popularity, text similarity, no DP and DP at each ε: NDCG@10 / HR@10 per scope."""
    import torch

    from fedrec.client.standalone import load_channel_data, quiet_opacus
    from fedrec.client.training import TrainSpec
    from fedrec.shared.datasets import load_manifest
    from fedrec.shared.model import ModelSpec

    torch.set_num_threads(threads)
    eps = sorted(float(e) for e in epsilons.split(",") if e.strip())
    if not eps or min(eps) <= 0:
        raise typer.BadParameter(f"need positive ε values. Found {epsilons!r}.")
    if optimizer not in ("adam", "sgd"):
        raise typer.BadParameter(f"must be adam or sgd. Found {optimizer!r}.")
    spec = TrainSpec(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        head_lr_scale=head_lr_scale,
        optimizer=optimizer,
        negatives=negatives,
        positions=positions,
        seed=seed,
    )
    datasets = [write_tiny_dataset(tiny)] if tiny is not None else [data, *(extra or [])]
    start = time.perf_counter()
    with quiet_opacus():  # ghost clipping's per-step notice, in this block only
        for ds in datasets:
            if ds is None or not (ds / "manifest.json").is_file():
                raise typer.BadParameter(
                    f"{ds} is not a dataset folder (no manifest.json). Build it "
                    "with `fedrec world`, or pass --tiny DIR."
                )
            names = list(load_manifest(ds).channels)
            if channels and tiny is None:
                names = [c for c in names if c in {x.strip() for x in channels.split(",")}]
            enc = items_dir if (items_dir is not None and ds == data) else ds / "encoded"
            typer.echo(f"{ds}: channels {names}; {dataclasses.asdict(spec)}; {ModelSpec()}")
            parts = {ch: load_channel_data(ds, ch, enc) for ch in names}
            if len(names) > 1 and not no_pooled:
                parts["pooled"] = pooled(parts)
            rows = [
                bench_scope(
                    items,
                    split,
                    spec,
                    epsilons=eps,
                    delta=delta,
                    max_eval_users=max_eval_users,
                    max_grad_norm=max_grad_norm,
                    name=name,
                )
                for name, (items, split) in parts.items()
            ]
            typer.echo(
                f"\n### {ds} (δ={delta:g}, {steps} steps, batch {batch_size}, lr {lr:g}, "
                f"full ranking, NDCG@10 / HR@10)\n"
            )
            typer.echo(markdown(rows, eps))
            typer.echo("")
    typer.echo(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    app()

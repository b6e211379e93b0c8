"""``fedrec recommend``, ``fedrec serve`` and ``fedrec export``: a platform using a trained run.

All three load one channel through :meth:`fedrec.serving.platform.Platform.load` and rank
through its one :class:`~fedrec.serving.recommend.Recommender`; errors are
:class:`~fedrec.serving.recommend.RecommendError` (exit 2) through the command line's one
error path.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import typer

from fedrec.serving.recommend import RecommendError

if TYPE_CHECKING:
    from fedrec.serving.platform import Platform

RUN_DIR = typer.Argument(..., help="A run directory written by fedrec simulate / a deployment.")
CHANNEL = typer.Option(..., help="The platform whose catalogue and users to serve.")
DATA = typer.Option(None, help="Dataset directory (default: the run's data-dir).")
CACHE = typer.Option(
    None, help="Encoder cache (default: $FEDREC_CACHE_DIR or ~/.cache/fedrec/encoder)."
)
INDEX = typer.Option("auto", help="Item index: auto, exact, fp16 or sq8 (see docs/serving.md).")


def _load(
    run_dir: Path, channel: str, data: Path | None, cache: Path | None, index: str
) -> Platform:
    from rich.console import Console

    from fedrec.server.rundir import INCOMPLETE
    from fedrec.serving.index import KINDS
    from fedrec.serving.platform import Platform

    if index not in KINDS:
        raise RecommendError(f"--index must be one of {', '.join(KINDS)}. Found {index!r}.")
    if (run_dir / INCOMPLETE).exists():
        Console(stderr=True).print(
            f"[yellow]warning: {run_dir} is an incomplete run (it stopped before its last "
            "round); serving its last checkpoint."
        )
    return Platform.load(run_dir, channel, data=data, cache_dir=cache, index_kind=index)


def register(app: typer.Typer) -> None:
    @app.command("recommend")
    def recommend_cmd(
        run_dir: Path = RUN_DIR,
        channel: str = CHANNEL,
        user: str = typer.Option(
            None, help="User id on that platform (their local history is used)."
        ),
        query: str = typer.Option(None, help="Free-text query: hybrid search (docs/serving.md)."),
        k: int = typer.Option(10, min=1, max=10_000, help="How many items."),
        data: Path = DATA,
        cache_dir: Path = CACHE,
    ) -> None:
        """Top-K items for one user (and/or a query) from a trained run."""
        from rich.console import Console
        from rich.table import Table

        if user is None and query is None:
            raise RecommendError("give --user, --query, or both")
        if query is not None and not query.strip():
            raise RecommendError("--query is empty. Fix: give words to search for, or drop it.")
        t0 = time.perf_counter()
        platform = _load(run_dir, channel, data, cache_dir, "auto")
        history = platform.history(user) if user is not None else np.zeros(0, np.int64)
        if query:
            platform.queries(query)  # encoder loaded and query encoded before timing the rank
        t1 = time.perf_counter()
        top = platform.search(query, history, k) if query else platform.recommend(history, k)
        t2 = time.perf_counter()
        table = Table(
            title=f"top {k} on {channel}"
            + (f" for {user}" if user else "")
            + (f", query {query!r}" if query else "")
        )
        for col in ("#", "item_id", "title", "score"):
            table.add_column(col)
        for i, item in enumerate(platform.items(top), 1):
            table.add_row(str(i), item["item_id"], item["title"], f"{item['score']:.3f}")
        console = Console()
        console.print(table)
        console.print(
            f"history: {len(history)} items; loaded in {t1 - t0:.2f}s; ranked "
            f"{platform.version.items} items in {1000 * (t2 - t1):.1f} ms"
        )

    @app.command("serve")
    def serve_cmd(
        run_dir: Path = RUN_DIR,
        channel: str = CHANNEL,
        host: str = typer.Option("127.0.0.1", help="Address to listen on."),
        port: int = typer.Option(8080, min=1, max=65535, help="Port to listen on."),
        reload_every: float = typer.Option(
            2.0, min=0.0, help="Seconds between checks for a newer checkpoint (0: never)."
        ),
        index: str = INDEX,
        threads: int = typer.Option(
            1, min=1, help="Threads per request for torch and FAISS (more helps one client)."
        ),
        data: Path = DATA,
        cache_dir: Path = CACHE,
    ) -> None:
        """Serve one platform's recommendations and search over HTTP (docs/serving.md)."""
        import logging

        import faiss
        import torch
        import uvicorn
        from rich.console import Console

        from fedrec.serving.platform import Platform
        from fedrec.serving.service import Reloader, create_app

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        console = Console(stderr=True)
        t0 = time.perf_counter()
        platform = _load(run_dir, channel, data, cache_dir, index)
        platform.queries.warm()

        def reload(current: Platform) -> Platform:
            return Platform.load(
                current.run_dir,
                current.channel,
                data=data,
                cache_dir=cache_dir,
                encoder=current.queries.encoder,
                index_kind=index,
            )

        app = create_app(Reloader(platform, reload), reload_every or None)
        v = platform.version
        console.print(
            f"serving {channel} from {run_dir} ({v.checkpoint}, {v.items} items, {v.users} "
            f"users, {platform.recommender.index.kind} index) on http://{host}:{port} "
            f"(loaded in {time.perf_counter() - t0:.1f}s)"
        )
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        # access_log off: uvicorn's line holds the query string (user ids, queries);
        # the app logs method, path, status and time instead
        uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")

    @app.command("export")
    def export_cmd(
        run_dir: Path = RUN_DIR,
        channel: str = CHANNEL,
        out: Path = typer.Option(..., help="Parquet file to write (replaced atomically)."),
        k: int = typer.Option(100, min=1, max=10_000, help="Items per user."),
        index: str = INDEX,
        data: Path = DATA,
        cache_dir: Path = CACHE,
    ) -> None:
        """Top-K items for every user of a platform, as Parquet (user_id, rank, item_id, score)."""
        from rich.console import Console

        from fedrec.serving.export import export_top_k
        from fedrec.shared.fsio import out_dir_problem

        if out.is_dir():
            raise RecommendError(
                f"--out {out} is a folder. Fix: give a file name, e.g. recs.parquet."
            )
        problem = out_dir_problem(out.parent)
        if problem:
            raise RecommendError(
                problem.replace(f"--out {out.parent}", f"--out {out}: folder {out.parent}")
            )
        t0 = time.perf_counter()
        platform = _load(run_dir, channel, data, cache_dir, index)
        t1 = time.perf_counter()
        users = export_top_k(platform, out, k)
        t2 = time.perf_counter()
        Console().print(
            f"wrote top {k} for {users} users of {channel} to {out} "
            f"(loaded in {t1 - t0:.1f}s, ranked and written in {t2 - t1:.1f}s)"
        )

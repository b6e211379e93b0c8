"""``fedrec export``: top-K items for every user of one platform, as one Parquet file.

Owns: :func:`export_top_k`. Users are ranked in batches through the same
:class:`~fedrec.serving.recommend.Recommender` as ``fedrec serve`` (seen items left out) and
each batch is written as a row group with ``pyarrow.parquet.ParquetWriter``, so memory holds
one batch, not every user's list. The file is written under a temporary name in the output's
folder and renamed into place at the end: a reader sees the old file or the whole new one.

Columns (long format, one row per user and rank): ``user_id`` (string), ``rank`` (int16,
1 = best), ``item_id`` (string), ``score`` (float32). A platform loads it into its own
stores; it stays on the platform like the histories it came from.

Must not: import ``fedrec.client``, ``deploy``, ``audit``, ``simulations`` or ``cli``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedrec.serving.platform import Platform


def export_top_k(
    platform: Platform,
    out: Path,
    k: int,
    *,
    batch: int = 512,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write every user's top ``k`` to ``out`` (Parquet); returns the number of users."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("user_id", pa.string()),
            ("rank", pa.int16()),
            ("item_id", pa.string()),
            ("score", pa.float32()),
        ]
    )
    h, rec = platform.histories, platform.recommender
    ids = np.asarray(platform.catalogue.item_ids, dtype=str)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for start in range(0, len(h), batch):
                users = range(start, min(start + batch, len(h)))
                histories = [h.item_index[h.offsets[u] : h.offsets[u + 1]] for u in users]
                found = rec.top(rec.user_vectors(histories), k, histories)
                counts = [len(rows) for rows, _ in found]
                rows = np.concatenate([r for r, _ in found])
                table = pa.table(
                    {
                        "user_id": np.repeat(h.users[start : start + len(counts)], counts),
                        "rank": np.concatenate([np.arange(1, c + 1) for c in counts]).astype(
                            np.int16
                        ),
                        "item_id": ids[rows],
                        "score": np.concatenate([s for _, s in found]),
                    },
                    schema=schema,
                )
                writer.write_table(table)
                if progress is not None:
                    progress(len(counts))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        mask = os.umask(0o022)  # the only way to read it; restored at once
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # as a plain open() would have made it
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return len(h)

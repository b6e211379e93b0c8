"""MovieLens parsers and the cross-domain split.

Fixtures in tests/data/ml100k-fictional and tests/data/ml1m are hand-written, fictional movies in the
original file formats (no MovieLens rows are copied: the licence forbids redistribution).
Tests marked ``data`` read the real files from ../shared/data (or $FEDREC_SHARED_DATA) and skip
when they are absent.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedrec.simulations.movielens import (
    DATA_ENV,
    Movies,
    Ratings,
    assign_domains,
    cross_domain,
    default_data_root,
    load_ml1m,
    load_ml100k,
    natural_title,
    pooled,
    recbole_time,
    scenario_dir,
)

FIXTURES = Path(__file__).parent / "data"


def _sequences(interactions, catalogue) -> dict[str, list[str]]:
    """user -> item ids in stored order."""
    out: dict[str, list[str]] = {}
    for user, index in zip(interactions.user_ids, interactions.item_index, strict=True):
        out.setdefault(str(user), []).append(str(catalogue.item_ids[index]))
    return out


def _gzip_crlf(src: Path, dst: Path) -> None:
    """Store a fixture as the shared copy is stored: gzip-compressed, CRLF line ends."""
    data = src.read_bytes().replace(b"\n", b"\r\n")
    with gzip.open(dst, "wb") as f:
        f.write(data)


# --- ML-100K --------------------------------------------------------------------------------

# The fictional fixture is stored under neutral names (the real files' names are reserved for
# licensed MovieLens data, which never enters the repo) and laid out as u.* in a temp folder.
ML100K_NAMES = {"ratings.tsv": "u.data", "movies.psv": "u.item", "genres.psv": "u.genre"}


def _copy_ml100k_fixture(folder):
    for stored, name in ML100K_NAMES.items():
        shutil.copy(FIXTURES / "ml100k-fictional" / stored, folder / name)
    return folder


@pytest.fixture
def ml100k_fixture(tmp_path):
    return _copy_ml100k_fixture(tmp_path)


def test_ml100k_parser_reads_fixture(ml100k_fixture):
    # Prepare / Execute
    ratings, movies = load_ml100k(ml100k_fixture)

    # Assert
    assert len(ratings) == 14
    assert len(movies) == 8
    assert ratings.user_ids[:2].tolist() == ["u1", "u1"]
    assert ratings.item_ids[:2].tolist() == ["ml100k-3", "ml100k-4"]
    assert ratings.ratings[:2].tolist() == [4.0, 5.0]
    assert ratings.timestamps[:2].tolist() == [300, 200]
    assert movies.genres[0] == ("Animation", "Children's", "Comedy")


def test_ml100k_reads_latin1_titles_and_restores_articles(ml100k_fixture):
    # Prepare / Execute
    _, movies = load_ml100k(ml100k_fixture)

    # Assert
    assert movies.text(2) == ("The Quiet Rooms (1994)", "Genres: Drama, Romance")
    assert movies.titles[3] == "Café Lumière"
    assert movies.years[4] == ""  # the "unknown" movie has no date


def test_ml100k_reports_file_and_line_of_bad_row(tmp_path):
    # Prepare
    _copy_ml100k_fixture(tmp_path)
    with open(tmp_path / "u.data", "a") as f:
        f.write("4\tnine\t3\t100\n")

    # Execute / Assert
    with pytest.raises(ValueError, match=r"u\.data:15"):
        load_ml100k(tmp_path)


# --- ML-1M (RecBole atomic files) ------------------------------------------------------------


def test_ml1m_parser_maps_titles_to_row_ids():
    # Prepare / Execute
    ratings, movies = load_ml1m(FIXTURES / "ml1m")

    # Assert
    assert movies.item_ids.tolist() == [f"ml1m-{i}" for i in range(1, 6)]
    assert ratings.user_ids.tolist() == ["u7"] * 4 + ["u12"] * 4
    assert ratings.item_ids[:4].tolist() == ["ml1m-2", "ml1m-5", "ml1m-4", "ml1m-3"]
    assert ratings.timestamps[0] == 978300760
    assert movies.text(2) == ("The Quiet Rooms (1994)", "Genres: Drama, Romance")


def test_ml1m_gzip_crlf_reads_like_plain(tmp_path):
    # Prepare
    for name in ("ml-1m.item", "ml-1m.inter"):
        _gzip_crlf(FIXTURES / "ml1m" / name, tmp_path / f"{name}.gz")

    # Execute
    plain_ratings, plain_movies = load_ml1m(FIXTURES / "ml1m")
    gz_ratings, gz_movies = load_ml1m(tmp_path)

    # Assert
    assert gz_movies.titles.tolist() == plain_movies.titles.tolist()
    assert gz_movies.genres == plain_movies.genres
    for field in ("user_ids", "item_ids", "ratings", "timestamps"):
        assert np.array_equal(getattr(gz_ratings, field), getattr(plain_ratings, field))


def test_ml1m_rejects_missing_header_column(tmp_path):
    # Prepare
    shutil.copy(FIXTURES / "ml1m" / "ml-1m.item", tmp_path / "ml-1m.item")
    (tmp_path / "ml-1m.inter").write_text("user_id:token\titem_id:token\trating:float\n")

    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"ml-1m\.inter:1: header lacks column\(s\) \['timestamp'\]"
    ):
        load_ml1m(tmp_path)


def test_ml1m_reports_bad_user_id_with_line(tmp_path):
    # Prepare
    shutil.copy(FIXTURES / "ml1m" / "ml-1m.item", tmp_path / "ml-1m.item")
    text = (FIXTURES / "ml1m" / "ml-1m.inter").read_text()
    (tmp_path / "ml-1m.inter").write_text(text.replace("1m_12\tPaper", "user12\tPaper"))

    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"ml-1m\.inter:6: user_id is not '1m_<n>'. Found 'user12'"
    ):
        load_ml1m(tmp_path)


def test_ml1m_reports_unknown_item_with_line(tmp_path):
    # Prepare
    shutil.copy(FIXTURES / "ml1m" / "ml-1m.item", tmp_path / "ml-1m.item")
    text = (FIXTURES / "ml1m" / "ml-1m.inter").read_text()
    (tmp_path / "ml-1m.inter").write_text(text + "1m_3\tNo Such Film (2001)\t4\t978300000\n")

    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"ml-1m\.inter:10: item not in .* 'No Such Film \(2001\)'"
    ):
        load_ml1m(tmp_path)


# --- Cross-domain split ----------------------------------------------------------------------


def test_natural_title_moves_english_article_only():
    assert natural_title("Quiet Rooms, The") == "The Quiet Rooms"
    assert natural_title("Quiet Rooms, The (Les Chambres)") == "The Quiet Rooms (Les Chambres)"
    assert natural_title("Misérables, Les") == "Misérables, Les"


def test_domain_rule_follows_priority_order(ml100k_fixture):
    # Prepare
    _, movies = load_ml100k(ml100k_fixture)

    # Execute
    domains = assign_domains(movies)

    # Assert: War outranks Sci-Fi, Romance outranks Comedy, "unknown" has no domain
    assert domains.tolist() == [
        "family",
        "action",
        "drama",
        "drama",
        "",
        "drama",
        "action",
        "action",
    ]


def test_cross_domain_puts_each_item_in_exactly_one_domain(ml100k_fixture):
    # Prepare
    ratings, movies = load_ml100k(ml100k_fixture)

    # Execute
    catalogues, _ = cross_domain(ratings, movies)

    # Assert
    ids = [i for cat in catalogues.values() for i in cat.item_ids.tolist()]
    assert len(ids) == len(set(ids)) == 7  # the "unknown" movie is dropped
    assert catalogues["drama"].texts()[0] == "The Quiet Rooms (1994). Genres: Drama, Romance"


def test_cross_domain_keeps_users_with_three_and_orders_by_time_then_row(ml100k_fixture):
    # Prepare
    ratings, movies = load_ml100k(ml100k_fixture)

    # Execute
    catalogues, interactions = cross_domain(ratings, movies)

    # Assert: u1 drama by time; u10 has a timestamp tie (4 and 3 at t=7) kept in file order
    assert _sequences(interactions["drama"], catalogues["drama"]) == {
        "u1": ["ml100k-6", "ml100k-4", "ml100k-3"],
        "u10": ["ml100k-4", "ml100k-3", "ml100k-6"],
    }
    assert _sequences(interactions["action"], catalogues["action"]) == {
        "u2": ["ml100k-2", "ml100k-8", "ml100k-7"],
    }
    assert len(interactions["family"]) == 0
    assert set(interactions["drama"].events.tolist()) == {"rate"}
    assert interactions["drama"].timestamps.tolist() == [100, 200, 300, 7, 7, 9]


def test_cross_domain_min_interactions_is_configurable():
    # Prepare
    ratings, movies = load_ml1m(FIXTURES / "ml1m")

    # Execute
    catalogues, interactions = cross_domain(ratings, movies, min_interactions=2)

    # Assert
    assert _sequences(interactions["action"], catalogues["action"]) == {
        "u12": ["ml1m-2", "ml1m-5"],
        "u7": ["ml1m-5", "ml1m-2"],
    }
    assert _sequences(interactions["drama"], catalogues["drama"]) == {
        "u7": ["ml1m-4", "ml1m-3"],
    }


def test_pooled_is_one_channel_of_rated_movies_in_recboles_time_order():
    # Prepare: 978300750 and 978300760 round to the same float32 (64-s steps), so RecBole keeps
    # them in file order although 750 came first; movie 3 is never rated.
    ratings = Ratings(
        user_ids=np.array(["u2", "u1", "u1", "u1", "u2"]),
        item_ids=np.array(["m-1", "m-4", "m-2", "m-1", "m-2"]),
        ratings=np.ones(5, dtype=np.float32),
        timestamps=np.array([5000, 978300760, 978300750, 978300900, 4000], dtype=np.int64),
    )
    movies = Movies(
        item_ids=np.array(["m-1", "m-2", "m-3", "m-4"]),
        titles=np.array(["A", "B", "C", "D"]),
        years=np.array(["1990", "", "1995", "2000"]),
        genres=(("Drama",), ("Comedy",), ("War",), ()),
    )

    # Execute
    catalogues, interactions = pooled(ratings, movies)

    # Assert
    (name,) = catalogues
    assert list(interactions) == [name]
    assert catalogues[name].item_ids.tolist() == ["m-1", "m-2", "m-4"]
    assert _sequences(interactions[name], catalogues[name]) == {
        "u1": ["m-4", "m-2", "m-1"],
        "u2": ["m-2", "m-1"],
    }
    assert (
        interactions[name].timestamps.tolist()
        == recbole_time(np.array([978300760, 978300750, 978300900, 4000, 5000])).tolist()
    )
    assert recbole_time(np.array([978300750]))[0] == recbole_time(np.array([978300760]))[0]


def test_data_root_follows_environment(monkeypatch, tmp_path):
    # Prepare
    monkeypatch.setenv(DATA_ENV, str(tmp_path))

    # Execute / Assert
    assert default_data_root() == tmp_path
    assert scenario_dir("movielens-1m") == tmp_path / "movielens-1m"


# --- Real data (skips cleanly without ../shared/data) ----------------------------------------


def _real(folder: str) -> Path:
    path = default_data_root() / folder
    if not path.is_dir():
        pytest.skip(f"{path} not present (set {DATA_ENV} to the folder holding {folder}/)")
    return path


@pytest.mark.data
def test_real_ml100k_counts_and_split():
    # Prepare
    ratings, movies = load_ml100k(_real("movielens-100k"))

    # Execute
    catalogues, interactions = cross_domain(ratings, movies)

    # Assert: counts from SOURCES.md; 2 movies have only the "unknown" genre
    assert (len(ratings), len(np.unique(ratings.user_ids)), len(movies)) == (100_000, 943, 1682)
    assert sum(len(c) for c in catalogues.values()) == 1680
    for x in interactions.values():
        _, counts = np.unique(x.user_ids, return_counts=True)
        assert counts.min() >= 3


@pytest.mark.data
def test_real_ml1m_counts_and_split():
    # Prepare
    ratings, movies = load_ml1m(_real("movielens-1m"))

    # Execute
    catalogues, interactions = cross_domain(ratings, movies)

    # Assert: counts from SOURCES.md
    assert (len(ratings), len(np.unique(ratings.user_ids))) == (1_000_209, 6040)
    assert len(np.unique(ratings.item_ids)) == 3706
    ids = np.concatenate([c.item_ids for c in catalogues.values()])
    assert len(ids) == len(np.unique(ids)) == len(movies) == 3883
    for x in interactions.values():
        _, counts = np.unique(x.user_ids, return_counts=True)
        assert counts.min() >= 3


@pytest.mark.data
def test_real_ml1m_pooled_through_the_dataset_format_is_recboles_split(tmp_path):
    # Prepare: the digest of RecBole 1.2.1's leave-one-out split of ML-1M (all ratings,
    # time order by float32 timestamp then file row): lines "user<TAB>valid<TAB>test" in
    # RecBole's tokens, sorted, UTF-8, SHA-256 (computed with RecBole itself)
    import hashlib

    from fedrec.shared.data import to_sequences
    from fedrec.shared.datasets import load_channel, write_dataset

    folder = _real("movielens-1m")
    ratings, movies = load_ml1m(folder)
    with gzip.open(folder / "ml-1m.item.gz", "rt", encoding="utf-8") as f:
        f.readline()
        token = {f"ml1m-{i + 1}": line.split("\t")[0] for i, line in enumerate(f) if line.strip()}

    # Execute: written as fedrec's CSV and read back as any channel is
    catalogues, interactions = pooled(ratings, movies)
    write_dataset(
        tmp_path / "d", name="ml", catalogues=catalogues, interactions=interactions, source={}
    )
    (name,) = catalogues
    catalogue, loaded = load_channel(tmp_path / "d", name)
    seqs = to_sequences(loaded)

    # Assert
    assert (len(catalogue), len(loaded), len(seqs)) == (3706, 1_000_209, 6040)
    ids = catalogue.item_ids[seqs.item_index]
    lines = sorted(
        f"1m_{user[1:]}\t{token[ids[end - 2]]}\t{token[ids[end - 1]]}\n"
        for user, end in zip(seqs.users, seqs.offsets[1:], strict=True)
    )
    digest = hashlib.sha256("".join(lines).encode()).hexdigest()
    assert digest == "2158f61d6e1eaf120488ea56d46d73a659edbe35a0245cb95af28c8dbafded02"

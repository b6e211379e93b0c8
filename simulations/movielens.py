"""MovieLens as a cross-domain scenario: one rating file split into genre domains ("channels").

Owns: parsers for GroupLens MovieLens-100K (``u.data``, ``u.item``, ``u.genre``) and for
MovieLens-1M in RecBole's atomic-file format (``ml-1m.inter[.gz]``, ``ml-1m.item[.gz]``), and
``cross_domain``, which turns ratings into per-domain ``Catalogue``/``Interactions``: the same
users appear in every domain, each with only their ratings of that domain's movies.

Domain rule (deterministic): ``DEFAULT_DOMAINS`` is an ordered list of ``(genre, domain)``
pairs; a movie goes to the domain of the *first* pair whose genre it has. Children's,
animation, musical and fantasy films are ``family`` before anything else, documentaries and war
films ``drama``; then horror, sci-fi, action, adventure, western and thriller make ``action``;
then romance → ``drama``, comedy → ``family``, and crime, film-noir, mystery and drama →
``drama``. On ML-1M this gives 1,082 / 1,215 / 1,586 movies and 29% / 41% / 30% of the ratings
for family / action / drama. Movies with no listed genre (ML-100K's "unknown") are dropped.

``pooled`` (``fedrec world --domains none``) instead writes every rating in one channel, in
RecBole's time order (:func:`recbole_time`), so that fedrec's leave-last-out split is RecBole's
leave-one-out split of the same file (the comparison rows of ``fedrec.simulations.bench.ml1m``).

Every rating is one implicit interaction (event ``rate``); a user is kept in a domain when they
have at least ``min_interactions`` ratings there. Item ids are ``ml1m-<n>`` / ``ml100k-<n>``,
user ids ``u<n>``. ML-1M's RecBole files name movies by title, so ``<n>`` there is the movie's
1-based row in ``ml-1m.item``, not GroupLens's MovieID.

Licence: MovieLens is for non-commercial research and may not be redistributed. Read it from
``../shared/data`` (or ``$FEDREC_SHARED_DATA``); never copy it into the repository.

Must not: hold training logic, or write anything
(:func:`fedrec.shared.datasets.write_dataset` does that).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.shared.data import Catalogue, Interactions

logger = logging.getLogger(__name__)

DATA_ENV = "FEDREC_SHARED_DATA"

# (genre, domain) in priority order: a movie goes to the domain of its first matching genre.
DEFAULT_DOMAINS: tuple[tuple[str, str], ...] = (
    ("Children's", "family"),
    ("Animation", "family"),
    ("Musical", "family"),
    ("Fantasy", "family"),
    ("Documentary", "drama"),
    ("War", "drama"),
    ("Horror", "action"),
    ("Sci-Fi", "action"),
    ("Action", "action"),
    ("Adventure", "action"),
    ("Western", "action"),
    ("Thriller", "action"),
    ("Romance", "drama"),
    ("Comedy", "family"),
    ("Crime", "drama"),
    ("Film-Noir", "drama"),
    ("Mystery", "drama"),
    ("Drama", "drama"),
)

ML1M_DIR = "movielens-1m"
ML100K_DIR = "movielens-100k"


@dataclass(frozen=True)
class Ratings:
    """Explicit ratings in file order."""

    user_ids: np.ndarray  # (R,) str, "u<n>"
    item_ids: np.ndarray  # (R,) str, "<dataset>-<n>"
    ratings: np.ndarray  # (R,) float32
    timestamps: np.ndarray  # (R,) int64, Unix seconds

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass(frozen=True)
class Movies:
    """A movie table in file order."""

    item_ids: np.ndarray  # (N,) str
    titles: np.ndarray  # (N,) str, without the year, leading article restored
    years: np.ndarray  # (N,) str, "" when unknown
    genres: tuple[tuple[str, ...], ...]  # (N,) genre names, in the file's order

    def __len__(self) -> int:
        return len(self.item_ids)

    def text(self, i: int) -> tuple[str, str]:
        """``(title, description)`` of movie ``i``: "Title (Year)" and "Genres: A, B"."""
        year = self.years[i]
        title = f"{self.titles[i]} ({year})" if year else str(self.titles[i])
        return title, "Genres: " + ", ".join(self.genres[i])


# ---------------------------------------------------------------------------------------------
# Locating the data


def default_data_root() -> Path:
    """``$FEDREC_SHARED_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _find(directory: Path, name: str) -> Path:
    """``directory/name.gz`` or ``directory/name``, whichever exists."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{name}(.gz) not found in {directory}")


def _open_text(path: Path, encoding: str):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


_ARTICLE = re.compile(r"^(?P<head>.*), (?P<art>The|A|An)(?P<tail> \(.*\))?$")
_YEAR_SUFFIX = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)$")


def natural_title(title: str) -> str:
    """ "Usual Suspects, The" → "The Usual Suspects" (English articles only)."""
    m = _ARTICLE.match(title)
    if m is None:
        return title
    return f"{m['art']} {m['head']}{m['tail'] or ''}"


# ---------------------------------------------------------------------------------------------
# MovieLens-1M (RecBole atomic files)


def _typed_header(line: str, path: Path, required: Sequence[str]) -> dict[str, int]:
    """Column positions by name from a RecBole header such as ``user_id:token``."""
    names = [field.split(":", 1)[0] for field in line.rstrip("\r\n").split("\t")]
    missing = [name for name in required if name not in names]
    if missing:
        raise ValueError(
            f"{path}:1: header lacks column(s) {missing}. Found {line.rstrip()!r}; "
            f"expected RecBole typed columns such as 'user_id:token'."
        )
    return {name: names.index(name) for name in required}


def load_ml1m(directory: str | Path) -> tuple[Ratings, Movies]:
    """Read ML-1M from RecBole atomic files (``ml-1m.inter[.gz]``, ``ml-1m.item[.gz]``).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a malformed line, with file and line number.
    """
    directory = Path(directory)
    item_path = _find(directory, "ml-1m.item")
    inter_path = _find(directory, "ml-1m.inter")

    titles: list[str] = []
    years: list[str] = []
    genres: list[tuple[str, ...]] = []
    row_of: dict[str, int] = {}
    with _open_text(item_path, "utf-8") as f:
        cols = _typed_header(f.readline(), item_path, ("item_id", "movie_title", "genre"))
        year_col = cols.get("release_year")
        header_names = None
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if header_names is None:
                header_names = len(parts)
            if len(parts) != header_names or len(parts) <= max(cols.values()):
                raise ValueError(f"{item_path}:{lineno}: expected {header_names} fields: {line!r}")
            key = parts[cols["item_id"]]
            if key in row_of:
                raise ValueError(f"{item_path}:{lineno}: duplicate item_id {key!r}")
            row_of[key] = len(titles)
            year = ""
            if year_col is None or not parts[year_col]:
                m = _YEAR_SUFFIX.match(key)
                year = m["year"] if m else ""
            else:
                year = str(int(float(parts[year_col])))
            titles.append(natural_title(parts[cols["movie_title"]]))
            years.append(year)
            genres.append(tuple(parts[cols["genre"]].split()))
    movies = Movies(
        item_ids=np.array([f"ml1m-{i + 1}" for i in range(len(titles))], dtype=str),
        titles=np.array(titles, dtype=str),
        years=np.array(years, dtype=str),
        genres=tuple(genres),
    )

    return _read_ml1m_inter(inter_path, list(row_of), movies), movies


def _read_ml1m_inter(path: Path, titles_in_order: list[str], movies: Movies) -> Ratings:
    """The 1M-row interaction file, parsed by pyarrow (a Python loop takes ~10x longer)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    with _open_text(path, "utf-8") as f:
        header = f.readline()
    cols = _typed_header(header, path, ("user_id", "item_id", "rating", "timestamp"))
    full_names = header.rstrip("\r\n").split("\t")
    try:
        with pa.input_stream(str(path), compression="gzip" if path.suffix == ".gz" else None) as s:
            table = pacsv.read_csv(
                s,
                read_options=pacsv.ReadOptions(column_names=full_names, skip_rows=1),
                parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in full_names}
                ),
            )
    except pa.ArrowInvalid as err:
        raise ValueError(f"{path}: {err}") from None

    def column(name: str):
        return table.column(full_names[cols[name]])

    def first_bad(ok, what: str, name: str) -> None:
        ok = pc.fill_null(ok, False)
        if not pc.all(ok).as_py():
            i = int(np.argmin(ok.to_numpy(zero_copy_only=False)))
            raise ValueError(f"{path}:{i + 2}: {what}. Found {column(name)[i].as_py()!r}")

    first_bad(
        pc.match_substring_regex(column("user_id"), r"^1m_[0-9]+$"),
        "user_id is not '1m_<n>'",
        "user_id",
    )
    number = r"^-?[0-9]+(\.[0-9]*)?$"
    first_bad(pc.match_substring_regex(column("rating"), number), "rating not numeric", "rating")
    first_bad(
        pc.match_substring_regex(column("timestamp"), number), "timestamp not numeric", "timestamp"
    )
    rows = pc.index_in(column("item_id"), value_set=pa.array(titles_in_order, pa.string()))
    first_bad(
        pc.is_valid(rows), f"item not in the item file ({len(titles_in_order)} items)", "item_id"
    )

    users = pc.binary_join_element_wise("u", pc.utf8_slice_codeunits(column("user_id"), 3), "")
    return Ratings(
        user_ids=users.to_numpy(zero_copy_only=False).astype(str),
        item_ids=movies.item_ids[rows.to_numpy(zero_copy_only=False).astype(np.int64)],
        ratings=pc.cast(column("rating"), pa.float32()).to_numpy(zero_copy_only=False),
        timestamps=pc.cast(pc.cast(column("timestamp"), pa.float64()), pa.int64()).to_numpy(
            zero_copy_only=False
        ),
    )


# ---------------------------------------------------------------------------------------------
# MovieLens-100K (GroupLens originals)


def load_ml100k(directory: str | Path) -> tuple[Ratings, Movies]:
    """Read ML-100K (``u.data``, ``u.item`` latin-1 ``|``-separated, ``u.genre``).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a malformed line, with file and line number.
    """
    directory = Path(directory)
    genre_path, item_path, data_path = (directory / n for n in ("u.genre", "u.item", "u.data"))
    for path in (genre_path, item_path, data_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path.name} not found in {directory}")

    genre_names: dict[int, str] = {}
    with open(genre_path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            name, sep, index = line.rpartition("|")
            if not sep or not index.isdigit():
                raise ValueError(f"{genre_path}:{lineno}: expected 'name|index': {line!r}")
            genre_names[int(index)] = name
    if sorted(genre_names) != list(range(len(genre_names))):
        raise ValueError(f"{genre_path}: genre indices must be 0..n-1. Found {sorted(genre_names)}")
    n_genres = len(genre_names)

    ids: list[str] = []
    titles: list[str] = []
    years: list[str] = []
    genres: list[tuple[str, ...]] = []
    with open(item_path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("|")
            if len(parts) != 5 + n_genres or not parts[0].isdigit():
                raise ValueError(
                    f"{item_path}:{lineno}: expected id|title|release|video|url|{n_genres} "
                    f"genre flags ({5 + n_genres} fields), found {len(parts)}: {line!r}"
                )
            flags = parts[5:]
            if any(flag not in ("0", "1") for flag in flags):
                raise ValueError(f"{item_path}:{lineno}: genre flags must be 0/1: {flags}")
            title, year = parts[1], ""
            m = _YEAR_SUFFIX.match(title)
            if m:
                title, year = m["title"], m["year"]
            elif parts[2][-4:].isdigit():
                year = parts[2][-4:]
            ids.append(f"ml100k-{parts[0]}")
            titles.append(natural_title(title))
            years.append(year)
            genres.append(tuple(genre_names[g] for g, flag in enumerate(flags) if flag == "1"))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{item_path}: duplicate movie ids")
    movies = Movies(
        item_ids=np.array(ids, dtype=str),
        titles=np.array(titles, dtype=str),
        years=np.array(years, dtype=str),
        genres=tuple(genres),
    )

    known = set(ids)
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    stamps: list[int] = []
    with open(data_path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4 or not all(p.isdigit() for p in parts):
                raise ValueError(f"{data_path}:{lineno}: expected user item rating ts: {line!r}")
            item = f"ml100k-{parts[1]}"
            if item not in known:
                raise ValueError(f"{data_path}:{lineno}: item {parts[1]} not in {item_path}")
            users.append(f"u{parts[0]}")
            items.append(item)
            ratings.append(float(parts[2]))
            stamps.append(int(parts[3]))
    return (
        Ratings(
            user_ids=np.array(users, dtype=str),
            item_ids=np.array(items, dtype=str),
            ratings=np.asarray(ratings, dtype=np.float32),
            timestamps=np.asarray(stamps, dtype=np.int64),
        ),
        movies,
    )


# ---------------------------------------------------------------------------------------------
# Cross-domain split


def assign_domains(
    movies: Movies, domains: Sequence[tuple[str, str]] = DEFAULT_DOMAINS
) -> np.ndarray:
    """Domain of each movie (``""`` when none of its genres is listed)."""
    out = []
    for movie_genres in movies.genres:
        found = ""
        for genre, domain in domains:
            if genre in movie_genres:
                found = domain
                break
        out.append(found)
    return np.array(out, dtype=object).astype(str)


def _catalogue(channel: str, movies: Movies, members: np.ndarray) -> Catalogue:
    """The movies at rows ``members``, in that order, as a channel's catalogue."""
    texts = [movies.text(int(i)) for i in members]
    return Catalogue(
        channel=channel,
        item_ids=movies.item_ids[members],
        titles=np.array([t for t, _ in texts], dtype=str),
        descriptions=np.array([d for _, d in texts], dtype=str),
        categories=np.full(len(members), "", dtype=str),
        attributes=np.full(len(members), "", dtype=str),
    )


def cross_domain(
    ratings: Ratings,
    movies: Movies,
    domains: Sequence[tuple[str, str]] = DEFAULT_DOMAINS,
    *,
    min_interactions: int = 3,
) -> tuple[dict[str, Catalogue], dict[str, Interactions]]:
    """Split ratings into per-domain channels (see the module docstring for the rule).

    Args:
        ratings: every rating becomes one ``rate`` interaction.
        movies: the movie table ``ratings.item_ids`` refer to.
        domains: ordered ``(genre, domain)`` pairs; first match wins.
        min_interactions: users with fewer ratings in a domain are left out of that domain.

    Returns:
        ``(catalogues, interactions)`` keyed by domain name, in order of first appearance in
        ``domains``. A catalogue holds all of the domain's movies, rated or not.
    """
    if min_interactions < 1:
        raise ValueError(f"min_interactions must be >= 1. Found {min_interactions}.")
    movie_domain = assign_domains(movies, domains)
    dropped = int(np.sum(movie_domain == ""))
    if dropped:
        logger.info("%d movie(s) have no genre in the domain rule and are dropped", dropped)

    order = np.argsort(movies.item_ids, kind="stable")
    pos = np.searchsorted(movies.item_ids[order], ratings.item_ids)
    pos = np.minimum(pos, len(order) - 1)
    bad = movies.item_ids[order][pos] != ratings.item_ids
    if bad.any():
        raise ValueError(
            f"rating {int(np.argmax(bad))} refers to unknown item {ratings.item_ids[bad][0]!r}"
        )
    movie_of_rating = order[pos]  # (R,) row in movies
    rating_domain = movie_domain[movie_of_rating]
    user_codes_all = np.unique(ratings.user_ids, return_inverse=True)[1]
    rows = np.arange(len(ratings), dtype=np.int64)

    catalogues: dict[str, Catalogue] = {}
    interactions: dict[str, Interactions] = {}
    for name in dict.fromkeys(domain for _, domain in domains):
        members = np.flatnonzero(movie_domain == name)
        local = np.full(len(movies), -1, dtype=np.int64)
        local[members] = np.arange(len(members))
        catalogues[name] = _catalogue(name, movies, members)

        sel = np.flatnonzero(rating_domain == name)
        counts = np.bincount(user_codes_all[sel], minlength=int(user_codes_all.max(initial=0)) + 1)
        sel = sel[counts[user_codes_all[sel]] >= min_interactions]
        # users sort as strings (code order from np.unique), then time, then file row
        sel = sel[np.lexsort((rows[sel], ratings.timestamps[sel], user_codes_all[sel]))]
        interactions[name] = Interactions(
            channel=name,
            user_ids=ratings.user_ids[sel],
            item_index=local[movie_of_rating[sel]],
            timestamps=ratings.timestamps[sel].astype(np.int64),
            events=np.full(len(sel), "rate"),
            queries=np.full(len(sel), "", dtype=str),
        )
    return catalogues, interactions


POOLED_CHANNEL = "movies"


def recbole_time(timestamps: np.ndarray) -> np.ndarray:
    """Unix seconds as RecBole orders them: rounded through float32 (64-s steps in 2000).

    RecBole stores ``:float`` fields as float32 and sorts stably on them, so its "time order"
    is this key, then file row.
    """
    return np.asarray(timestamps, dtype=np.float64).astype(np.float32).astype(np.int64)


def pooled(
    ratings: Ratings, movies: Movies, *, channel: str = POOLED_CHANNEL
) -> tuple[dict[str, Catalogue], dict[str, Interactions]]:
    """Every rating as one implicit interaction in one channel, in RecBole's order.

    The catalogue holds the movies rated at least once (the item set RecBole builds from the
    interaction file). Interactions are sorted by (user, :func:`recbole_time`, file row) and
    carry the rounded times, so any loader that orders by (user, timestamp, row) rebuilds
    RecBole's leave-one-out split exactly.
    """
    rated = np.unique(ratings.item_ids)
    order = np.argsort(movies.item_ids, kind="stable")
    pos = np.minimum(np.searchsorted(movies.item_ids[order], rated), len(order) - 1)
    if np.any(movies.item_ids[order][pos] != rated):
        raise ValueError("a rating refers to an item that is not in the movie table")
    members = np.sort(order[pos])  # rated movies, in movie-file order
    catalogue = _catalogue(channel, movies, members)
    by_id = np.argsort(catalogue.item_ids)
    local = by_id[np.searchsorted(catalogue.item_ids[by_id], ratings.item_ids)]
    user_codes = np.unique(ratings.user_ids, return_inverse=True)[1]
    time = recbole_time(ratings.timestamps)
    sel = np.lexsort((np.arange(len(ratings)), time, user_codes))
    interactions = Interactions(
        channel=channel,
        user_ids=ratings.user_ids[sel],
        item_index=local[sel].astype(np.int64),
        timestamps=time[sel],
        events=np.full(len(sel), "rate"),
        queries=np.full(len(sel), "", dtype=str),
    )
    return {channel: catalogue}, {channel: interactions}


# ---------------------------------------------------------------------------------------------
# Scenarios for ``fedrec world``

SCENARIOS: dict[str, tuple[str, str]] = {
    # scenario: (folder under the data root, loader name)
    "movielens-1m": (ML1M_DIR, "load_ml1m"),
    "movielens-100k": (ML100K_DIR, "load_ml100k"),
}


def scenario_dir(scenario: str, data_root: str | Path | None = None) -> Path:
    """The folder a MovieLens scenario reads from (``<data-root>/movielens-1m`` …)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown MovieLens scenario {scenario!r}; known: {sorted(SCENARIOS)}")
    root = Path(data_root) if data_root is not None else default_data_root()
    return root / SCENARIOS[scenario][0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


DOMAIN_SPLITS = ("genre", "none")  # genre domains (the default), or one pooled channel


def load_scenario(
    scenario: str, data_root: str | Path | None = None, *, domains: str = "genre"
) -> tuple[dict[str, Catalogue], dict[str, Interactions], dict]:
    """Load a MovieLens scenario: ``(catalogues, interactions, source)`` for ``write_dataset``.

    ``domains="genre"`` splits it into genre domains (:func:`cross_domain`); a domain left
    without interactions (no user with 3 ratings there) is dropped, with a warning: a dataset
    channel needs interactions. ``domains="none"`` writes one channel (:func:`pooled`).

    Raises:
        FileNotFoundError: the scenario's folder is missing (message names it).
    """
    directory = scenario_dir(scenario, data_root)
    if not directory.is_dir():
        raise FileNotFoundError(f"{scenario} data folder not found: {directory}")
    if domains not in DOMAIN_SPLITS:
        raise ValueError(f"domains must be one of {list(DOMAIN_SPLITS)}. Found {domains!r}.")
    loader = load_ml1m if scenario == "movielens-1m" else load_ml100k
    ratings, movies = loader(directory)
    if domains == "none":
        catalogues, interactions = pooled(ratings, movies)
    else:
        catalogues, interactions = cross_domain(ratings, movies)
    for name in [n for n, x in interactions.items() if len(x) == 0]:
        logger.warning("%s: domain %r has no user with >= 3 ratings; left out", scenario, name)
        del catalogues[name], interactions[name]
    files = sorted(
        p for p in directory.iterdir() if p.is_file() and p.name.startswith(("ml-", "u."))
    )
    source: dict[str, object] = {
        "scenario": scenario,
        "generator": "fedrec.simulations.movielens",
        "origin": "GroupLens MovieLens, see shared/data/SOURCES.md",
        "licence": "MovieLens terms: non-commercial research only, no redistribution",
        "event": "rate (every rating counts, implicit)",
        "files": {p.name: _sha256(p) for p in files},
    }
    if domains == "none":
        source["domains"] = "none: one channel, rated movies only, RecBole's time order"
    else:
        source["domains"] = [list(pair) for pair in DEFAULT_DOMAINS]
        source["min_interactions"] = 3
    return catalogues, interactions, source

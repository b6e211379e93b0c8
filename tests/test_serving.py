"""A platform's serving in process: the item index, lexical search, the HTTP app (Starlette's
TestClient, the real FastAPI app), hot reload, batch export and their errors, on a small world
with a tiny random BERT and a run directory whose checkpoints fit them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.tiny import TinyRun, fedrec_cli, write_tiny_run


def write_changed_checkpoint(run_dir: Path, round_: int, seed: int = 7) -> None:
    """A newer checkpoint whose heads differ from the last one (as another round would)."""
    from fedrec.server.rundir import RunDir

    run = RunDir(run_dir, create=False)
    last = run.last_checkpoint()
    assert last is not None
    rng = np.random.default_rng(seed)
    arrays = {
        k: (v + rng.normal(scale=1.0, size=v.shape).astype(v.dtype) if "to_items" in k else v)
        for k, v in last[1].items()
    }
    run.checkpoint(round_, arrays)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return write_tiny_run(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def platform(tiny: TinyRun):  # type: ignore[no-untyped-def]
    from fedrec.serving.platform import Platform

    return Platform.load(tiny.run, "ecommerce")


@pytest.fixture(scope="module")
def client(platform):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from fedrec.serving.service import Reloader, create_app

    app = create_app(Reloader(platform, lambda p: p))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


# -- the item index -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["exact", "fp16", "sq8"])
def test_the_index_returns_the_exact_top_k_without_seen_items(kind: str) -> None:
    from fedrec.serving.index import ItemIndex

    rng = np.random.default_rng(0)
    codes = rng.normal(size=(3000, 65)).astype(np.float32)
    v = rng.normal(size=(2, 65)).astype(np.float32)
    seen = [np.array([0, 5]), np.array([], dtype=np.int64)]
    exact = codes @ v.T  # (N, 2)

    found = ItemIndex(codes, kind).search(v, 10, seen)

    for b in range(2):
        s = exact[:, b].copy()
        s[seen[b]] = -np.inf
        expected = np.argsort(-s)[:10]
        rows, scores = found[b]
        assert not set(rows.tolist()) & set(seen[b].tolist())
        # fp16/sq8 pick candidates approximately; refined scores are exact
        assert len(set(rows.tolist()) & set(expected.tolist())) >= (10 if kind == "exact" else 9)
        np.testing.assert_allclose(scores, exact[rows, b], rtol=1e-4, atol=1e-4)


def test_an_unknown_index_kind_is_refused() -> None:
    from fedrec.serving.index import ItemIndex

    with pytest.raises(ValueError, match="index kind must be one of auto, exact, fp16, sq8"):
        ItemIndex(np.ones((3, 4), np.float32), "hnsw")


# -- lexical search -----------------------------------------------------------------------------


def test_bm25_stems_and_ignores_words_outside_the_catalogue() -> None:
    from fedrec.serving.search import LexicalIndex

    index = LexicalIndex(["Global Equity Index Fund", "Grocery Cashback Card", "Festival Pot"])

    funds = index.scores("low fee index funds")
    nothing = index.scores("zzz qqq")

    assert funds.argmax() == 0 and funds[0] > 0 and funds[1] == 0 == funds[2]
    assert not nothing.any()


def test_ranked_keeps_the_best_scores_without_excluded_or_non_positive_rows() -> None:
    from fedrec.serving.search import ranked

    scores = np.array([0.0, 3.0, -1.0, 5.0, 3.0, 0.5], dtype=np.float32)

    best = ranked(scores, 3, np.array([3]), positive=True)
    every = ranked(scores, 10, np.zeros(0, np.int64))

    # by hand: row 3 excluded, rows 0 and 2 not positive; ties keep row order
    assert best.tolist() == [1, 4, 5]
    assert every.tolist() == [3, 1, 4, 5, 0, 2]


def test_the_lru_keeps_the_most_recently_used_keys() -> None:
    from fedrec.serving.search import LRU

    cache: LRU[int] = LRU(2)
    made: list[str] = []

    def make(key: str) -> int:
        made.append(key)
        return len(made)

    cache.get("a", lambda: make("a"))
    cache.get("b", lambda: make("b"))
    assert cache.get("a", lambda: make("a")) == 1  # a hit: "a" is now the most recent
    cache.get("c", lambda: make("c"))  # evicts "b"
    cache.get("b", lambda: make("b"))

    assert made == ["a", "b", "c", "b"]


def test_a_cached_query_ranks_as_it_did_when_computed(platform) -> None:  # type: ignore[no-untyped-def]
    engine = platform.search_engine
    history = platform.history(str(platform.histories.users[0]))
    query = "Running SHOES for rain"
    vec = platform.queries(query)
    first = engine.search(query, vec, history, 10)

    again = engine.search("  running shoes FOR rain ", vec, history, 10)
    computed = engine._rank(query, vec)

    assert again == first
    assert engine.rankings(query.lower(), vec) is engine.rankings(query, vec)  # one entry
    for name, rows in computed.items():
        np.testing.assert_array_equal(engine.rankings(query, vec)[name], rows)


def test_recentring_pulls_a_topic_displaced_by_edge_anchors_back_into_its_cluster() -> None:
    from fedrec.serving.search import recentred_topic

    # Prepare: unit vectors in a plane, cluster A at 0..40 degrees and cluster B at 60..100
    # (one item a degree); anchors at A's edge (35..39) and one stray from B (60)
    degrees = np.concatenate([np.arange(0, 41), np.arange(60, 101)]).astype(float)
    space = np.stack([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))], axis=1)
    in_a = degrees <= 40
    anchors = np.array([35, 36, 37, 38, 39, 41])  # rows; row 41 is 60 degrees

    def nearest(v: np.ndarray, n: int) -> np.ndarray:
        return np.argsort(-(space @ v), kind="stable")[:n]

    # Execute
    plain = recentred_topic(nearest, space, anchors, depth=40, recentre=0)
    recentred = recentred_topic(nearest, space, anchors, depth=40, recentre=2)

    # Assert: the anchors' centroid (40.8 degrees) takes in B's near edge (60..70: 11 of 40);
    # re-centred twice on the nearer half, the topic is A alone
    assert in_a[plain].mean() < 0.8
    assert in_a[recentred].all() and len(recentred) == 40


# -- the HTTP app -------------------------------------------------------------------------------


def test_recommend_for_a_stored_user_leaves_out_what_they_saw(client, platform) -> None:  # type: ignore[no-untyped-def]
    user = str(platform.histories.users[0])
    seen = {str(platform.catalogue.item_ids[r]) for r in platform.history(user)}

    got = client.get("/recommend", params={"user": user, "k": 7})

    assert got.status_code == 200, got.text
    body = got.json()
    assert body["channel"] == "ecommerce" and body["model"]["round"] == 2
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 7 and not set(ids) & seen
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_an_inline_history_ranks_like_the_same_stored_user(client, platform) -> None:  # type: ignore[no-untyped-def]
    user = str(platform.histories.users[1])
    history = [str(platform.catalogue.item_ids[r]) for r in platform.history(user)]

    stored = client.get("/recommend", params={"user": user, "k": 5}).json()["items"]
    inline = client.post("/recommend", json={"history": history, "k": 5})

    assert inline.status_code == 200, inline.text
    assert inline.json()["items"] == stored


def test_search_with_and_without_a_user(client, platform) -> None:  # type: ignore[no-untyped-def]
    user = str(platform.histories.users[0])
    seen = {str(platform.catalogue.item_ids[r]) for r in platform.history(user)}

    anonymous = client.get("/search", params={"q": "running shoe", "k": 5})
    personal = client.get("/search", params={"q": "running shoe", "user": user, "k": 50})

    assert anonymous.status_code == 200 and len(anonymous.json()["items"]) == 5
    assert personal.status_code == 200
    assert not {i["item_id"] for i in personal.json()["items"]} & seen


@pytest.mark.parametrize(
    ("method", "path", "args", "status", "says"),
    [
        ("get", "/recommend", {"user": "nobody"}, 404, "user 'nobody' has no interactions"),
        ("get", "/recommend", {"user": "u00000", "k": 0}, 422, "k: Input should be greater"),
        ("get", "/recommend", {"user": "u00000", "k": "ten"}, 422, "k: Input should be a valid"),
        ("get", "/recommend", {}, 422, "user: Field required"),
        (
            "get",
            "/recommend",
            {"user": "u00000", "channel": "travel"},
            404,
            "'travel' is not served",
        ),
        ("get", "/search", {"q": "   "}, 400, "the query q is empty"),
        ("get", "/search", {"q": "shoe", "user": "nobody"}, 404, "user 'nobody'"),
        ("post", "/recommend", {"history": ["nope-1"]}, 400, "not in the ecommerce catalogue"),
        ("post", "/recommend", {"history": []}, 400, "the history is empty"),
        (
            "post",
            "/recommend",
            {"history": "x", "k": 3},
            422,
            "history: Input should be a valid list",
        ),
        ("post", "/recommend", {"history": [], "user": "u1"}, 422, "user: Extra inputs"),
        ("get", "/nowhere", {}, 404, "Not Found"),
    ],
)
def test_bad_requests_get_a_json_error_with_the_reason(  # type: ignore[no-untyped-def]
    client, method: str, path: str, args: dict, status: int, says: str
) -> None:
    got = client.get(path, params=args) if method == "get" else client.post(path, json=args)

    assert got.status_code == status, got.text
    error = got.json()["error"]
    assert error["status"] == status and says in error["message"]
    assert "Traceback" not in got.text


def test_health_and_metrics(client) -> None:  # type: ignore[no-untyped-def]
    client.get("/recommend", params={"user": "nobody"})

    health = client.get("/health").json()
    metrics = client.get("/metrics")

    assert health["status"] == "ok" and health["model"]["checkpoint"] == "round-0002.safetensors"
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'fedrec_requests_total{endpoint="/recommend",status="404"}' in text
    assert 'fedrec_request_seconds_bucket{endpoint="/recommend",le="0.005"}' in text
    assert "fedrec_model_round 2.0" in text
    assert 'fedrec_model_info{channel="ecommerce",checkpoint="round-0002.safetensors"} 1.0' in text


def test_an_unexpected_error_is_a_json_500_and_is_counted(client, platform, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def broken(*args: object) -> None:
        raise RuntimeError("disk gone")

    monkeypatch.setattr(platform, "recommend", broken)
    user = str(platform.histories.users[0])

    got = client.get("/recommend", params={"user": user})
    metrics = client.get("/metrics").text

    assert got.status_code == 500
    assert got.json()["error"]["message"].startswith("internal error (RuntimeError)")
    assert 'fedrec_requests_total{endpoint="/recommend",status="500"} 1.0' in metrics


def test_request_logs_hold_no_user_ids_or_queries(client, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("INFO", logger="fedrec.serve")

    client.get("/search", params={"q": "secret words", "user": "u00000"})

    lines = [r.getMessage() for r in caplog.records if r.name == "fedrec.serve"]
    assert any(line.startswith("GET /search 200") for line in lines)
    assert not any("u00000" in line or "secret" in line for line in lines)


# -- hot reload ---------------------------------------------------------------------------------


def test_a_newer_checkpoint_is_swapped_in_and_a_broken_one_is_not(tmp_path: Path) -> None:
    from fedrec.serving.platform import Platform
    from fedrec.serving.service import Reloader

    tiny = write_tiny_run(tmp_path, people=60)
    first = Platform.load(tiny.run, "finance")
    reloader = Reloader(first, lambda p: Platform.load(p.run_dir, p.channel))
    user = str(first.histories.users[0])
    before = first.recommend(first.history(user), 5)

    unchanged = reloader.check()
    write_changed_checkpoint(tiny.run, 3)
    swapped = reloader.check()
    after = reloader.platform.recommend(reloader.platform.history(user), 5)
    (tiny.run / "checkpoints" / "round-0004.safetensors").write_bytes(b"cut short")
    broken = reloader.check()

    assert not unchanged and swapped and not broken
    assert reloader.platform.version.round == 3 and after != before
    assert reloader.last_error is not None and "not a readable checkpoint" in reloader.last_error


# -- export -------------------------------------------------------------------------------------


def test_export_writes_every_users_top_k_without_seen_items(tiny: TinyRun, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from fedrec.serving.platform import Platform

    out = tmp_path / "recs" / "top.parquet"

    result = fedrec_cli(
        ["export", str(tiny.run), "--channel", "finance", "--k", "4", "--out", str(out)]
    )

    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    platform = Platform.load(tiny.run, "finance")
    assert table.num_rows == 4 * len(platform.histories)
    assert table.column_names == ["user_id", "rank", "item_id", "score"]
    user = str(platform.histories.users[3])
    mine = sorted((r for r in table.to_pylist() if r["user_id"] == user), key=lambda r: r["rank"])
    expected = platform.recommend(platform.history(user), 4)
    assert [r["item_id"] for r in mine] == [
        str(platform.catalogue.item_ids[r]) for r, _ in expected
    ]
    assert [p.name for p in out.parent.iterdir()] == ["top.parquet"]  # no temporary left


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--out", "{tmp}"], "is a folder"),
        (["--out", "{file}/x.parquet"], "is a file"),
        (["--out", "{tmp}/x.parquet", "--k", "0"], "'--k'"),
        (["--out", "{tmp}/x.parquet", "--index", "annoy"], "--index must be one of"),
        (
            ["--out", "{tmp}/x.parquet", "--channel", "travel"],
            "channel 'travel' is not in this run",
        ),
    ],
)
def test_export_refuses_bad_input_with_the_reason(
    tiny: TinyRun, tmp_path: Path, args: list[str], says: str
) -> None:
    (tmp_path / "f").write_text("a file")
    argv = [a.format(tmp=tmp_path, file=tmp_path / "f") for a in args]
    channel = [] if "--channel" in argv else ["--channel", "finance"]

    result = fedrec_cli(["export", str(tiny.run), *channel, *argv])

    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output

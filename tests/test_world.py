"""The synthetic world: reproducibility, shape, overlap, ordering, ground truth, difficulty,
and the ``fedrec world`` command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fedrec.shared.config import ConfigError
from fedrec.shared.data import to_sequences
from fedrec.shared.datasets import load_channel, write_dataset
from fedrec.simulations.world import (
    INTEREST_NAMES,
    ChannelSpec,
    World,
    WorldConfig,
    generate_world,
)

FIXTURES = Path(__file__).parent / "data"

# 600 people, half on >= 2 channels: 940 memberships (bounds 900..1200)
SMALL = WorldConfig(
    seed=3,
    people=600,
    channels=(
        ChannelSpec("ecommerce", items=240, users=430, mean_length=20.0),
        ChannelSpec("social", items=180, users=340, mean_length=12.0),
        ChannelSpec("finance", items=60, users=170, mean_length=5.0),
    ),
)


@pytest.fixture(scope="module")
def small() -> World:
    return generate_world(SMALL)


@pytest.fixture(scope="module")
def default_world() -> World:
    return generate_world(WorldConfig())


def _arrays(world: World) -> dict[str, np.ndarray]:
    out = {"theta": world.theta, "membership": world.membership, "T": world.transition}
    for name, cat in world.catalogues.items():
        for f in dataclasses.fields(cat):
            if f.name != "channel":
                out[f"{name}.items.{f.name}"] = getattr(cat, f.name)
        x = world.interactions[name]
        for f in dataclasses.fields(x):
            if f.name != "channel":
                out[f"{name}.x.{f.name}"] = getattr(x, f.name)
    return out


# --- Reproducibility -------------------------------------------------------------------------


def test_same_seed_gives_identical_world(small):
    # Execute
    again = generate_world(SMALL)

    # Assert
    a, b = _arrays(small), _arrays(again)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert small.ground_truth_files() == again.ground_truth_files()


def test_different_seed_gives_different_world(small):
    # Execute
    other = generate_world(dataclasses.replace(SMALL, seed=4))

    # Assert
    assert not np.array_equal(small.theta, other.theta)
    assert small.catalogues["ecommerce"].titles.tolist() != (
        other.catalogues["ecommerce"].titles.tolist()
    )
    assert not np.array_equal(
        small.interactions["social"].item_index[:50], other.interactions["social"].item_index[:50]
    )


# --- Shape -----------------------------------------------------------------------------------


def test_channel_sizes_match_config(small):
    for spec in SMALL.channels:
        x = small.interactions[spec.name]
        assert len(small.catalogues[spec.name]) == spec.items
        assert len(np.unique(x.user_ids)) == spec.users


def test_finance_sparsest_and_ecommerce_densest(small):
    """Sparsity as interactions per user (finance also has the fewest items)."""
    # Execute
    lengths = {n: to_sequences(x).lengths() for n, x in small.interactions.items()}

    # Assert
    means = {n: v.mean() for n, v in lengths.items()}
    assert means["ecommerce"] > means["social"] > means["finance"]
    assert means["ecommerce"] == pytest.approx(20.0, rel=0.15)
    assert means["finance"] == pytest.approx(5.0, rel=0.15)
    assert min(v.min() for v in lengths.values()) >= 3


def test_overlap_share_is_as_configured(small):
    # Prepare
    users = [set(np.unique(x.user_ids).tolist()) for x in small.interactions.values()]

    # Execute
    everyone = set().union(*users)
    several = sum(1 for u in everyone if sum(u in s for s in users) >= 2)

    # Assert
    assert len(everyone) == SMALL.people
    assert several / len(everyone) == pytest.approx(SMALL.overlap, abs=0.01)


def test_same_person_keeps_one_id_across_channels(small):
    # Prepare
    names = [c.name for c in SMALL.channels]
    person = int(np.flatnonzero(small.membership.sum(axis=1) == 3)[0])
    pid = small.person_ids[person]

    # Execute / Assert
    for name in names:
        assert pid in set(small.interactions[name].user_ids.tolist())


def test_interactions_sorted_by_user_with_strictly_increasing_time(small):
    for x in small.interactions.values():
        assert np.all(x.user_ids[:-1] <= x.user_ids[1:])
        same_user = x.user_ids[1:] == x.user_ids[:-1]
        assert np.all(np.diff(x.timestamps)[same_user] > 0)


def test_no_item_repeats_within_a_users_channel_history(small):
    for x in small.interactions.values():
        pairs = np.char.add(np.char.add(x.user_ids, "|"), x.item_index.astype(str))
        assert len(np.unique(pairs)) == len(pairs)


def test_events_fit_each_channel(small):
    events = {n: set(x.events.tolist()) for n, x in small.interactions.items()}
    assert events == {
        "ecommerce": {"view", "click", "purchase"},
        "social": {"follow", "join", "like"},
        "finance": {"view", "apply"},
    }


def test_queries_on_about_a_fifth_of_ecommerce_only(small):
    share = np.mean(small.interactions["ecommerce"].queries != "")
    assert share == pytest.approx(0.2, abs=0.03)
    assert not np.any(small.interactions["finance"].queries != "")
    assert not np.any(small.interactions["social"].queries != "")


def test_popularity_is_skewed(small):
    for name, x in small.interactions.items():
        counts = np.sort(np.bincount(x.item_index, minlength=len(small.catalogues[name])))[::-1]
        top = counts[: len(counts) // 10].sum() / counts.sum()
        assert top > 0.25, (name, top)  # uniform would give 0.10


def test_badge_in_item_text_signals_popularity(small):
    # Prepare
    cat = small.catalogues["ecommerce"]
    badge = np.char.find(cat.attributes.astype(str), "badge=") >= 0

    # Execute
    pop = small.popularity["ecommerce"]

    # Assert: a visible but noisy signal
    assert 0.05 < badge.mean() < 0.25
    assert np.median(pop[badge]) > 2 * np.median(pop[~badge])
    assert pop[~badge].max() > np.median(pop[badge])


def test_items_have_text_and_no_field_ends_with_a_period(small):
    for cat in small.catalogues.values():
        assert all(t and d for t, d in zip(cat.titles, cat.descriptions, strict=True))
        assert ".." not in " ".join(cat.texts())


def test_people_have_few_dominant_interests(small):
    top3 = np.sort(small.theta, axis=1)[:, -3:].sum(axis=1)
    assert top3.mean() > 0.8


def test_transition_matrix_is_stochastic_without_self_loops(small):
    assert small.transition.shape == (len(INTEREST_NAMES),) * 2
    assert np.allclose(small.transition.sum(axis=1), 1.0)
    assert np.all(np.diag(small.transition) == 0)


# --- Ground truth ----------------------------------------------------------------------------


def test_ground_truth_lives_outside_every_channel_folder(small):
    # Execute
    files = small.ground_truth_files()

    # Assert
    assert set(files) == {
        "ground_truth/people.csv",
        "ground_truth/items.csv",
        "ground_truth/model.json",
    }
    channel_dirs = {c.name for c in SMALL.channels}
    assert all(path.split("/")[0] not in channel_dirs for path in files)
    header = files["ground_truth/people.csv"].decode().splitlines()[0].split(",")
    assert header[:2] == ["person_id", "channels"]
    model = json.loads(files["ground_truth/model.json"])
    assert model["people_on_several_channels"] == 300


def test_written_world_keeps_ground_truth_apart_and_loads_back(small, tmp_path):
    # Execute: written as ``fedrec world`` writes it
    out = write_dataset(
        tmp_path / "w",
        name="synthetic",
        catalogues=small.catalogues,
        interactions=small.interactions,
        source=small.source(),
        extra_files=small.ground_truth_files(),
    )
    cat, x = load_channel(out, "finance")

    # Assert
    assert (out / "ground_truth" / "people.csv").is_file()
    for spec in SMALL.channels:
        assert not list((out / spec.name).rglob("*people*"))
    assert len(cat) == 60
    assert np.array_equal(x.item_index, small.interactions["finance"].item_index)


# --- Configuration ---------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        WorldConfig(people=0, overlap=1.5, stay=1.0)
    assert len(err.value.problems) >= 3
    assert "overlap must be in [0, 1]. Found 1.5." in err.value.problems


def test_config_rejects_infeasible_overlap():
    with pytest.raises(ConfigError, match="channel memberships"):
        WorldConfig(overlap=0.0)  # 11,000 memberships cannot be 7,000 single-channel people


def test_resized_overlap_keeps_channel_sizes():
    # Execute
    cfg = WorldConfig().resized(overlap=0.0)

    # Assert
    assert [c.users for c in cfg.channels] == [5000, 4000, 2000]
    assert (cfg.people, cfg.multi_channel()) == (11000, 0)


def test_resized_people_scales_channel_sizes():
    # Execute
    cfg = WorldConfig().resized(people=700)

    # Assert
    assert [c.users for c in cfg.channels] == [500, 400, 200]
    assert cfg.multi_channel() == 350


def test_with_users_makes_a_small_partner_with_the_same_people():
    # Execute: finance 2,000 -> 400 users: 9,400 memberships over the same 7,000 people, so
    # 2,400 people are on two channels (overlap 2,400 / 7,000).
    cfg = WorldConfig().with_users({"finance": 400})
    world = generate_world(cfg)

    # Assert
    assert [c.users for c in cfg.channels] == [5000, 4000, 400]
    assert (cfg.people, cfg.multi_channel()) == (7000, 2400)
    assert [
        len(set(world.interactions[c].user_ids)) for c in ("ecommerce", "social", "finance")
    ] == [
        5000,
        4000,
        400,
    ]


def test_with_users_refuses_unknown_channels_and_empty_ones():
    with pytest.raises(ConfigError) as err:
        WorldConfig().with_users({"bank": 100, "finance": 0})
    assert "'bank'" in str(err.value) and "finance=0" in str(err.value)


def test_cli_writes_a_size_skewed_world(tmp_path):
    # Prepare
    runner, app = _cli()
    out = tmp_path / "w"

    # Execute: 300 people (214 / 171 / 86 users), then finance down to 40.
    result = runner.invoke(
        app, ["world", "--out", str(out), "--people", "300", "--users", "finance=40"]
    )
    bad = runner.invoke(app, ["world", "--out", str(tmp_path / "x"), "--users", "finance"])

    # Assert
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    finance = [c for c in manifest["source"]["config"]["channels"] if c["name"] == "finance"]
    assert finance[0]["users"] == 40
    assert bad.exit_code == 2 and "CHANNEL=N" in bad.output


# --- Default world: size, speed and difficulty ----------------------------------------------


def test_default_world_has_the_planned_sizes(default_world):
    rows = {n: (len(np.unique(x.user_ids)), len(x)) for n, x in default_world.interactions.items()}
    assert {n: u for n, (u, _) in rows.items()} == {
        "ecommerce": 5000,
        "social": 4000,
        "finance": 2000,
    }
    assert {n: len(c) for n, c in default_world.catalogues.items()} == {
        "ecommerce": 1200,
        "social": 900,
        "finance": 250,
    }
    assert default_world.elapsed_s < 15.0  # ~1.5 s on one free core


def _hit_rates(world: World, channel: str, users: int, k: int = 10) -> dict[str, float]:
    """HR@k of each user's last item, ranking every item the user has not seen.

    popularity: training counts. profile_oracle: knows θ and the item interests, not the
    sequence (the best a "similar to my history" scorer can do). markov_oracle: also knows the
    last interest, ``stay`` and T, i.e. the generator's own next-interest distribution.
    """
    cfg = world.config
    seqs = to_sequences(world.interactions[channel])
    n = len(world.catalogues[channel])
    last = seqs.offsets[1:] - 1
    train = np.ones(len(seqs.item_index), dtype=bool)
    train[last] = False
    pop = np.bincount(seqs.item_index[train], minlength=n).astype(float)
    primary, secondary = world.item_interests[channel].T
    member = np.zeros((len(world.interests), n))
    member[primary, np.arange(n)] = 1.0
    member[secondary[secondary >= 0], np.flatnonzero(secondary >= 0)] = 0.5
    weights = member * world.popularity[channel] ** cfg.popularity_exponent  # (K, N)
    person = {p: i for i, p in enumerate(world.person_ids.tolist())}
    eye = np.eye(len(world.interests))
    hits = dict.fromkeys(("popularity", "profile_oracle", "markov_oracle"), 0)
    for u in range(min(users, len(seqs))):
        seq = seqs.item_index[seqs.offsets[u] : seqs.offsets[u + 1]]
        hist, target = seq[:-1], seq[-1]
        theta = world.theta[person[seqs.users[u]]]
        w = weights.copy()
        w[:, hist] = 0.0
        p_item = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)  # (K, N)
        z = primary[hist[-1]]
        p_next = cfg.stay * eye[z] + (1 - cfg.stay) * (
            cfg.follow_transition * world.transition[z] + (1 - cfg.follow_transition) * theta
        )
        for name, score in (
            ("popularity", pop.copy()),
            ("profile_oracle", theta @ p_item),
            ("markov_oracle", p_next @ p_item),
        ):
            score[hist] = -np.inf
            hits[name] += int((score > score[target]).sum() < k)
    return {name: h / min(users, len(seqs)) for name, h in hits.items()}


@pytest.mark.parametrize("channel", ["ecommerce", "social", "finance"])
def test_default_world_is_learnable_but_not_trivial(default_world, channel):
    # Execute
    hr = _hit_rates(default_world, channel, users=400)

    # Assert: popularity is far from solving it; the sequence (recency + T) roughly doubles it;
    # knowing only long-term interests (what text similarity to the history can hope for) is
    # not enough.
    assert hr["popularity"] < 0.35
    assert hr["markov_oracle"] > 1.4 * hr["popularity"]
    assert hr["markov_oracle"] > 1.3 * hr["profile_oracle"]


# --- fedrec world ------------------------------------------------------------------------------


def _cli():
    from typer.testing import CliRunner

    from fedrec.cli.main import app

    return CliRunner(), app


def test_cli_writes_small_world_and_prints_table(tmp_path):
    # Prepare
    runner, app = _cli()
    out = tmp_path / "w"

    # Execute
    result = runner.invoke(app, ["world", "--out", str(out), "--people", "300", "--seed", "1"])

    # Assert
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["channels"]) == {"ecommerce", "social", "finance"}
    assert manifest["source"]["config"]["people"] == 300
    assert (out / "ground_truth" / "model.json").is_file()
    assert "ecommerce" in result.output and "214" in result.output  # 5000 * 300 / 7000
    assert str(out) in result.output.replace("\n", "")


def test_cli_refuses_to_overwrite_without_force(tmp_path):
    # Prepare
    runner, app = _cli()
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    # Execute
    result = runner.invoke(app, ["world", "--out", str(out), "--people", "300"])

    # Assert
    assert result.exit_code == 1
    assert "already exists" in result.output and "--force" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_force_replaces_existing_output(tmp_path):
    # Prepare
    runner, app = _cli()
    out = tmp_path / "w"
    out.mkdir()
    (out / "old.txt").write_text("old")

    # Execute
    result = runner.invoke(app, ["world", "--out", str(out), "--people", "300", "--force"])

    # Assert
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists()
    assert (out / "manifest.json").is_file()


def test_cli_default_output_is_worlds_scenario_under_cwd(tmp_path, monkeypatch):
    # Prepare
    runner, app = _cli()
    monkeypatch.chdir(tmp_path)

    # Execute
    result = runner.invoke(app, ["world", "--people", "200"])

    # Assert
    assert result.exit_code == 0, result.output
    assert (tmp_path / "worlds" / "synthetic" / "manifest.json").is_file()


def test_cli_missing_movielens_names_path_and_flag(tmp_path):
    # Prepare
    runner, app = _cli()

    # Execute
    result = runner.invoke(
        app,
        [
            "world",
            "--scenario",
            "movielens-1m",
            "--data-root",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
    )

    # Assert
    text = result.output.replace("\n", "")
    assert result.exit_code == 1
    assert str(tmp_path / "movielens-1m") in text and "--data-root" in text
    assert not (tmp_path / "o").exists()


def test_cli_rejects_synthetic_options_for_movielens(tmp_path):
    runner, app = _cli()
    result = runner.invoke(
        app,
        ["world", "--scenario", "movielens-100k", "--people", "5", "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 2
    assert "--people" in result.output


def test_cli_writes_movielens_100k_from_fixture(tmp_path):
    # Prepare
    runner, app = _cli()
    root = tmp_path / "data"
    (root / "movielens-100k").mkdir(parents=True)
    stored = {"u.data": "ratings.tsv", "u.item": "movies.psv", "u.genre": "genres.psv"}
    for name, fixture in stored.items():  # fictional movies, stored under neutral names
        src = FIXTURES / "ml100k-fictional" / fixture
        (root / "movielens-100k" / name).write_bytes(src.read_bytes())

    # Execute
    result = runner.invoke(
        app,
        [
            "world",
            "--scenario",
            "movielens-100k",
            "--data-root",
            str(root),
            "--out",
            str(tmp_path / "o"),
        ],
    )

    # Assert
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert list(manifest["channels"]) == ["drama", "action"]  # "family" has no user with >= 3
    assert manifest["source"]["scenario"] == "movielens-100k"


def test_cli_writes_movielens_1m_as_one_channel_with_domains_none(tmp_path):
    # Prepare
    runner, app = _cli()
    root = tmp_path / "data" / "movielens-1m"
    root.mkdir(parents=True)
    for name in ("ml-1m.inter", "ml-1m.item"):  # fictional movies in RecBole's format
        (root / name).write_bytes((FIXTURES / "ml1m" / name).read_bytes())
    args = ["world", "--scenario", "movielens-1m", "--data-root", str(tmp_path / "data")]

    # Execute
    result = runner.invoke(app, [*args, "--domains", "none", "--out", str(tmp_path / "o")])
    refused = runner.invoke(app, ["world", "--domains", "none", "--out", str(tmp_path / "s")])

    # Assert: one channel, the 5 rated movies; --domains is for MovieLens only
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert list(manifest["channels"]) == ["movies"]
    assert manifest["source"]["domains"].startswith("none")
    assert refused.exit_code == 2 and "--domains" in refused.output
    assert not (tmp_path / "s").exists()

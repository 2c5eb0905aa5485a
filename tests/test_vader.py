"""The embedded VADER ratings: fetched from the registry, verified, split without overlap."""

from __future__ import annotations

import io
import tarfile

import pytest

from prospect import assets
from prospect.config import DataConfig
from prospect.data import vader
from prospect.data.pipeline import read_training
from prospect.data.sources import read_rows


@pytest.fixture(scope="module")
def movies():
    return vader.load_ratings("movieReviewSnippets")


def test_corpus_is_the_published_one(movies):
    assert len(movies) == 10605
    assert all(-4 <= m.mean <= 4 and len(m.ratings) >= 10 for m in movies)
    first = movies[0]
    assert first.id == "1" and first.mean == pytest.approx(2.26666666667)
    assert first.mean == pytest.approx(sum(first.ratings) / len(first.ratings), abs=1e-6)


def test_splits_are_disjoint_and_carry_the_ratings(movies):
    train, test = read_rows("vader-movies", "train"), read_rows("vader-movies", "test")
    train_ids = {r.values["id"] for r in train}
    test_ids = {r.values["id"] for r in test}
    assert not train_ids & test_ids
    assert len(train) + len(test) == len(movies)
    assert 0.08 < len(test) / len(movies) < 0.12
    by_id = {f"movies-{m.id}": m for m in movies}
    for row in train + test:
        assert row.values["rating"] == by_id[row.values["id"]].mean
    row = train[0].values
    assert row["prompt"][0]["content"].startswith("Write a one-sentence movie review that begins with")
    opening = row["prompt"][0]["content"].split('"')[1]
    assert row["completion"].startswith(opening)


def test_kto_labels_follow_the_thresholds(movies):
    examples = read_training(DataConfig(train="vader-movies"), "unpaired", seed=0)
    held_in = [m for m in movies if not m.held_out]
    assert sum(e.label for e in examples) == sum(m.mean > 0.5 for m in held_in)
    assert sum(not e.label for e in examples) == sum(m.mean < -0.5 for m in held_in)
    assert all((e.rating > 0.5) == e.label and abs(e.rating) > 0.5 for e in examples)


def test_pairs_from_rating_gaps_share_a_prompt(movies):
    pairs = read_training(
        DataConfig(train="vader-movies", pair_min_gap=2.0, max_pairs_per_prompt=8), "paired", 0
    )
    ratings = {m.text: m.mean for m in movies}
    assert len(pairs) > 1000
    for pair in pairs[:200]:
        opening = pair.prompt[0]["content"].split('"')[1]
        chosen, rejected = pair.chosen[0]["content"], pair.rejected[0]["content"]
        assert chosen.startswith(opening) and rejected.startswith(opening)
        assert ratings[chosen] - ratings[rejected] >= 2.0


def test_a_tampered_archive_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSPECT_CACHE", str(tmp_path))
    target = tmp_path / "data" / "hutto_ICWSM_2014.tar.gz"
    target.parent.mkdir(parents=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz"):
        pass
    target.write_bytes(buffer.getvalue())
    monkeypatch.setattr(
        assets, "fetch", lambda dist: (_ for _ in ()).throw(AssertionError("re-fetch expected"))
    )
    with pytest.raises(AssertionError, match="re-fetch expected"):
        vader.corpus_archive()  # a cached file with the wrong checksum is not trusted


def test_every_corpus_loads_with_distinct_ids():
    """Amazon's ratings file opens with a byte-order mark, and Amazon's and NYT's ids are `review_sentence`
    (`2_11`): read as integers, `2_11` and `21_1` were one id and 50 NYT snippets took others' ratings."""
    for corpus in vader.CORPORA:
        items = vader.load_ratings(corpus)
        assert len({t.id for t in items}) == len(items) > 3000, corpus
        assert all(len(t.ratings) >= 5 and min(t.ratings) >= -4 and max(t.ratings) <= 4 for t in items)
    nyt = {t.id: t for t in vader.load_ratings("nytEditorialSnippets")}
    assert "2_11" in nyt and "21_1" in nyt and nyt["2_11"].text != nyt["21_1"].text

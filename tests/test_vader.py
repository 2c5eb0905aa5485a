"""The embedded VADER ratings: fetched from the registry, verified, split without overlap."""

from __future__ import annotations

import io
import tarfile

import pytest

from prospect.data import vader
from prospect.data.sources import read_rows


@pytest.fixture(scope="module")
def movies():
    return vader.load_ratings("movieReviewSnippets")


def test_corpus_is_the_published_one(movies):
    assert len(movies) == 10605
    assert all(-4 <= m.mean <= 4 and len(m.ratings) >= 10 for m in movies)
    first = movies[0]
    assert first.id == 1 and first.mean == pytest.approx(2.26666666667)
    assert first.mean == pytest.approx(sum(first.ratings) / len(first.ratings), abs=1e-6)


def test_splits_are_disjoint_and_labels_follow_the_thresholds(movies):
    train, test = read_rows("vader-movies", "train"), read_rows("vader-movies", "test")
    train_ids = {r.values["id"] for r in train}
    test_ids = {r.values["id"] for r in test}
    assert not train_ids & test_ids
    assert 0.08 < len(test) / (len(train) + len(test)) < 0.12
    for row in train + test:
        mean = row.values["rating_mean"]
        assert row.values["label"] == (mean > 0.5) and abs(mean) > 0.5
    kept = sum(abs(m.mean) > 0.5 for m in movies)
    assert len(train) + len(test) == kept
    row = train[0].values
    assert row["prompt"][0]["content"].startswith("Write a one-sentence movie review that begins with")
    opening = row["prompt"][0]["content"].split('"')[1]
    assert row["completion"].startswith(opening)


def test_a_tampered_archive_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSPECT_CACHE", str(tmp_path))
    target = tmp_path / "data" / "hutto_ICWSM_2014.tar.gz"
    target.parent.mkdir(parents=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz"):
        pass
    target.write_bytes(buffer.getvalue())
    monkeypatch.setattr(
        vader, "fetch", lambda dist: (_ for _ in ()).throw(AssertionError("re-fetch expected"))
    )
    with pytest.raises(AssertionError, match="re-fetch expected"):
        vader.corpus_archive()  # a cached file with the wrong checksum is not trusted

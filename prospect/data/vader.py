"""The embedded default data: human sentiment ratings from the VADER study (Hutto & Gilbert, ICWSM 2014).

About 20 people rated each snippet from -4 to +4. The corpus ships in the `vaderSentiment==3.3.2` source
release on PyPI; it is fetched from there, checked against a pinned sha256 and cached, never committed.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from prospect.assets import Distribution, fetch_member
from prospect.data.row import Row
from prospect.errors import UserError

SDIST = Distribution(
    name="vaderSentiment",
    version="3.3.2",
    filename="vaderSentiment-3.3.2.tar.gz",
    sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    sdist=True,
)
CORPUS_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
CORPUS_SHA256 = "d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa"
CORPORA = ("movieReviewSnippets", "tweets", "amazonReviewSnippets", "nytEditorialSnippets")
HELD_OUT_PERCENT = 10


@dataclass
class RatedText:
    corpus: str
    id: str  # as the corpus writes it: `42`, or `211_1` (review 211, sentence 1) for Amazon and NYT
    text: str
    mean: float
    std: float
    ratings: list[int]

    @property
    def held_out(self) -> bool:
        """A fixed ~10% test split, by a hash of the snippet id (stable under any reordering)."""
        return zlib.crc32(f"{self.corpus}:{self.id}".encode()) % 100 < HELD_OUT_PERCENT


def corpus_archive() -> Path:
    """The verified inner corpus archive, extracted once from the cached sdist."""
    return fetch_member(SDIST, CORPUS_MEMBER, CORPUS_SHA256, "hutto_ICWSM_2014.tar.gz")


def load_ratings(corpus: str = "movieReviewSnippets") -> list[RatedText]:
    """Every snippet of one corpus with its mean, standard deviation and raw ratings."""
    if corpus not in CORPORA:
        raise UserError(f"unknown VADER corpus '{corpus}'; expected one of {', '.join(CORPORA)}")
    with tarfile.open(corpus_archive()) as archive:
        truth = read_member(archive, f"hutto_ICWSM_2014/{corpus}_GroundTruth.txt")
        raw = read_member(archive, f"hutto_ICWSM_2014/{corpus}_anonDataRatings.txt")
    # Ids stay text: int() would read `21_11` and `2_111` (review_sentence) as the same 2111.
    ratings = {}
    for line in raw:
        ident, _mean, std_text, values_text = line.split("\t")
        ratings[ident] = (float(std_text), [int(v) for v in values_text.strip("[] ").split(",")])
    items = []
    for line in truth:
        ident, mean, text = line.split("\t", 2)
        std, values = ratings[ident]
        items.append(RatedText(corpus, ident, clean(text), float(mean), std, values))
    return items


def read_member(archive: tarfile.TarFile, name: str) -> list[str]:
    handle = archive.extractfile(name)
    if handle is None:
        raise UserError(f"VADER corpus archive lacks {name}")
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="replace").read()  # Amazon's has a BOM
    return [line for line in text.splitlines() if line.strip()]


def clean(text: str) -> str:
    """The corpus writes double quotes as two single quotes."""
    return " ".join(text.replace("''", '"').split())


def review_prompt(text: str) -> str:
    """Ask for a one-sentence review that opens with the snippet's first two words (one for short ones).
    Snippets sharing an opening share a prompt, so ratings can also be turned into preference pairs."""
    words = text.split()
    opening = " ".join(words[: 2 if len(words) > 3 else 1])
    return f'Write a one-sentence movie review that begins with "{opening}".'


def vader_movies(split: str) -> list[Row]:
    """Movie-review snippets rated by people: {prompt, completion, rating (the raters' mean), ratings}.
    Losses turn them into what they need: labels by threshold (desirable above data.desirable_above=0.5,
    undesirable below data.undesirable_below=-0.5) or pairs of the same prompt by rating gap.
    Split 'test' is the held-out ~10%; 'all' is both."""
    if split not in ("train", "test", "all"):
        raise UserError(f"vader-movies: no split '{split}'; it has train, test, all")
    rows = []
    for item in load_ratings("movieReviewSnippets"):
        if split != "all" and item.held_out != (split == "test"):
            continue
        values = {
            "prompt": [{"role": "user", "content": review_prompt(item.text)}],
            "completion": item.text,
            "rating": item.mean,
            "ratings": item.ratings,
            "id": f"movies-{item.id}",
        }
        rows.append(Row(f"vader-movies[{split}]: id {item.id}", values))
    return rows


BUILTINS = {"vader-movies": vader_movies}

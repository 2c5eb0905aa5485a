"""Judges that score generated text independently of the training labels."""

from __future__ import annotations

from collections.abc import Callable

from prospect.errors import UserError

Judge = Callable[[list[str]], list[float]]


def vader_judge() -> Judge:
    """VADER's lexicon-and-rules sentiment: the compound score in [-1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return lambda texts: [analyzer.polarity_scores(t)["compound"] for t in texts]


def get_judge(name: str) -> Judge | None:
    if name == "none":
        return None
    if name == "vader":
        return vader_judge()
    raise UserError(f"unknown judge '{name}'; expected vader or none")

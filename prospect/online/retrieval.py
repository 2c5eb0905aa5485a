"""Demonstrations for in-context alignment (ICDPO, online/icdpo.py): the preferred and dispreferred responses
of the user's feedback rows, and the retrievers that choose k of them for a query prompt.

* `two-stage` (the ICDPO paper's retriever): BM25 over the demonstrations' prompts (the maintained `bm25s`
  package) shortlists those that share the query's words; the shortlist is then re-ranked by the cosine
  similarity of mean-pooled last hidden states. The paper re-ranks with a separate SBERT encoder; here the
  model being aligned embeds the prompts itself (`HiddenStateEmbedder`), so nothing else is loaded.
* `bm25`: the lexical stage alone.
* `random`: the paper's baseline, k demonstrations drawn at random (seeded by the seed and the query, so a
  query gets the same ones in any order of queries).

A demonstration whose prompt is the query's own prompt is never returned: it would show the model an answer
to the very prompt it is asked.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import bm25s
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from prospect.data.batching import pad
from prospect.data.formats import Example, Pair, Text
from prospect.errors import UserError
from prospect.models.scoring import TokenScorer
from prospect.online.icdpo_options import RETRIEVERS

logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets its logger to DEBUG: every index says so
Side = Literal["preferred", "dispreferred"]
Embed = Callable[[list[str]], torch.Tensor]  # texts -> [n, hidden] vectors


@dataclass(frozen=True)
class Demonstration:
    """A prompt of the feedback data with a preferred response (a chosen side, a desirable completion), a
    dispreferred one (a rejected side, an undesirable completion), or both (a pair)."""

    prompt: Text
    location: str  # where the row is: file:line, or a built-in's id
    preferred: Text | None = None
    dispreferred: Text | None = None

    def response(self, side: Side) -> Text:
        value = self.preferred if side == "preferred" else self.dispreferred
        if value is None:
            raise ValueError(f"{self.location}: no {side} response")
        return value


def plain_text(text: Text) -> str:
    """Text as is, or a conversation's message contents, one per line."""
    return text if isinstance(text, str) else "\n".join(str(m.get("content", "")) for m in text)


def prompt_text(prompt: Text) -> str:
    """A prompt as retrieval compares it: its plain text, stripped."""
    return plain_text(prompt).strip()


def demonstrations(rows: Sequence[Example | Pair]) -> list[Demonstration]:
    """The demonstrations of feedback rows in the unpaired or paired shape (pipeline.read_training): a pair
    gives both sides, a desirable example a preferred response, an undesirable one a dispreferred response.
    A prompt with the same response twice (a chosen side in several pairs) is kept once."""
    out: list[Demonstration] = []
    seen: set[str] = set()
    for row in rows:
        if isinstance(row, Pair):
            demo = Demonstration(row.prompt, row.location, row.chosen, row.rejected)
        elif row.label is None:
            continue  # unlabelled rows (prompts only) show nothing
        elif row.label:
            demo = Demonstration(row.prompt, row.location, preferred=row.completion)
        else:
            demo = Demonstration(row.prompt, row.location, dispreferred=row.completion)
        # A pair is keyed by its chosen side: several pairs of one prompt often share it.
        key = repr(
            (demo.prompt, demo.preferred)
            if demo.preferred is not None
            else (demo.prompt, None, demo.dispreferred)
        )
        if key not in seen:
            seen.add(key)
            out.append(demo)
    return out


class Retriever:
    """k demonstrations for a query prompt, the most relevant first, each with a response on the asked side
    and none with the query's own prompt. Subclasses rank the candidates."""

    def __init__(self, demos: list[Demonstration]):
        self.demos = demos
        self.prompts = np.array([prompt_text(d.prompt) for d in demos], dtype=object)
        self.has = {
            "preferred": np.array([d.preferred is not None for d in demos], dtype=bool),
            "dispreferred": np.array([d.dispreferred is not None for d in demos], dtype=bool),
        }

    def count(self, side: Side) -> int:
        return int(self.has[side].sum())

    def eligible(self, query: Text, side: Side) -> np.ndarray:
        """Indices of the demonstrations that have a `side` response and another prompt than the query's."""
        return np.flatnonzero(self.has[side] & (self.prompts != prompt_text(query)))

    def retrieve(self, query: Text, k: int, side: Side) -> list[Demonstration]:
        return [self.demos[i] for i in self.rank(query, self.eligible(query, side), k)]

    def rank(self, query: Text, candidates: np.ndarray, k: int) -> list[int]:
        raise NotImplementedError


class RandomRetriever(Retriever):
    """The paper's random-demonstration baseline."""

    def __init__(self, demos: list[Demonstration], seed: int):
        super().__init__(demos)
        self.seed = seed

    def rank(self, query: Text, candidates: np.ndarray, k: int) -> list[int]:
        chooser = random.Random(f"{self.seed}\n{prompt_text(query)}")
        return [int(i) for i in chooser.sample(list(candidates), min(k, len(candidates)))]


class LexicalRetriever(Retriever):
    """BM25 over the demonstrations' prompts, then (with `embed`) a semantic re-rank of its shortlist.

    The shortlist holds the best `shortlist` demonstrations that share at least one word with the query, topped
    up to k with the next ones when fewer do. The re-rank orders the shortlist by the cosine similarity of the
    query's embedding to each prompt's; embeddings of demonstration prompts are computed once and kept."""

    def __init__(self, demos: list[Demonstration], shortlist: int, embed: Embed | None = None):
        super().__init__(demos)
        self.shortlist, self.embed = shortlist, embed
        self.index = bm25s.BM25()
        self.index.index(words(list(self.prompts)), show_progress=False)
        self.vectors: dict[str, torch.Tensor] = {}

    def bm25_scores(self, query: Text) -> np.ndarray:
        (tokens,) = words([prompt_text(query)])
        known = [t for t in tokens if t and t in self.index.vocab_dict]
        if not known:
            return np.zeros(len(self.demos), dtype=np.float32)
        return np.asarray(self.index.get_scores(known))

    def rank(self, query: Text, candidates: np.ndarray, k: int) -> list[int]:
        scores = self.bm25_scores(query)[candidates]
        order = candidates[np.argsort(-scores, kind="stable")]  # ties keep the data's order
        matched = int((scores > 0).sum())
        shortlist = order[: max(min(self.shortlist, matched), k)]
        if self.embed is None or len(shortlist) == 0:
            return [int(i) for i in shortlist[:k]]
        similarity = self.similarities(prompt_text(query), [str(self.prompts[i]) for i in shortlist])
        reranked = torch.argsort(-similarity, stable=True)[:k]
        return [int(shortlist[i]) for i in reranked]

    def similarities(self, query: str, texts: list[str]) -> torch.Tensor:
        """Cosine similarity of the query's embedding to each text's."""
        if self.embed is None:
            raise ValueError("no embedder")
        missing = list(dict.fromkeys(t for t in [query, *texts] if t not in self.vectors))
        if missing:
            self.vectors.update(zip(missing, self.embed(missing).float().cpu()))
        stacked = torch.stack([self.vectors[t] for t in texts])
        return torch.nn.functional.cosine_similarity(stacked, self.vectors[query].unsqueeze(0), dim=-1)


def words(texts: list[str]) -> list[list[str]]:
    """Lower-cased words of two or more letters, English stop words dropped (bm25s' tokenizer); a text with
    none is the one word "" (which bm25s needs to index it, and which no query matches)."""
    split = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False, allow_empty=False)
    return [list(tokens) for tokens in split]  # return_ids=False: lists of words


class HiddenStateEmbedder:
    """Texts embedded by the model itself: its last hidden state, mean-pooled over the text's tokens, through
    prospect's scorer (bf16 autocast as the rest of the run). Each text keeps its last `max_tokens` tokens."""

    def __init__(
        self, scorer: TokenScorer, tokenizer: PreTrainedTokenizerBase, max_tokens: int = 128, batch: int = 32
    ):
        self.scorer, self.tokenizer, self.max_tokens, self.batch = scorer, tokenizer, max_tokens, batch

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.cat([self.embed(texts[i : i + self.batch]) for i in range(0, len(texts), self.batch)])

    def embed(self, texts: list[str]) -> torch.Tensor:
        fallback = [self.tokenizer.eos_token_id or 0]  # a text with no tokens still gets a vector
        ids = [
            self.tokenizer(t, add_special_tokens=False)["input_ids"][-self.max_tokens :] or fallback
            for t in texts
        ]
        seqs = pad(ids, [[] for _ in ids], self.tokenizer.pad_token_id).to(self.device)
        input_ids, attention_mask, position_ids, layout = seqs.model_inputs()
        hidden = self.scorer.compute(
            input_ids, attention_mask, seqs.completion_mask, position_ids, layout, hidden=True
        ).hidden
        if hidden is None:
            raise ValueError("the scorer returned no hidden states")
        mask = (seqs.sequence_index >= 0).unsqueeze(-1).float()
        return (hidden.float() * mask).sum(1) / mask.sum(1)

    @property
    def device(self) -> torch.device:
        return next(self.scorer.model.parameters()).device


def make_retriever(
    name: str, demos: list[Demonstration], seed: int, shortlist: int, embed: Embed | None
) -> Retriever:
    """A retriever by name (RETRIEVERS); `embed` is the two-stage retriever's re-ranking embedder."""
    if name == "random":
        return RandomRetriever(demos, seed)
    if name == "bm25":
        return LexicalRetriever(demos, shortlist)
    if name == "two-stage":
        if embed is None:
            raise ValueError("the two-stage retriever needs an embedder")
        return LexicalRetriever(demos, shortlist, embed)
    raise UserError(f"retriever: expected one of {', '.join(RETRIEVERS)}, got {name!r}")

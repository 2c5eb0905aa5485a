"""ICDPO, in-context direct preference optimization (Song et al., 2024, "ICDPO: Effectively Borrowing Alignment
Capability of Others via In-context Direct Preference Optimization"): alignment at inference time, no training.

DPO's implied reward is `beta * log pi*(y|x) / pi_0(y|x)` (up to a term of x alone). ICDPO stands in an
"expert" for the aligned pi*: the same model shown k retrieved demonstrations d+ of preferred responses before
the prompt (in-context learning as an implicit fine-tuning), and the model without them for the "amateur"
pi_0. For each prompt x it samples N candidates from the expert and returns the one with the highest

    S(y) = log p(y | d+, x) - log p(y | x)         (amateur "plain": the paper's ICDPO)

each log-prob summed over the completion's tokens (its end-of-turn token included when it stopped). Two
other amateurs are built:

* "dispreferred", the paper's upgraded, contrastive scorer as the authors' code runs it (`do_scoring.py`
  with `neg_mode=icl` in the negative direction): the amateur is the model shown k dispreferred
  demonstrations d- instead, `S(y) = log p(y | d+, x) - log p(y | d-, x)`. Pairs give d- as the rejected
  sides of the very demonstrations the expert sees; unpaired data retrieves d- among its undesirable examples.
* "none", the expert alone (`S(y) = log p(y | d+, x)`), the ablation the paper compares with.

The authors also put an instruction before each context ("be polite/harmless/helpful/honest", and its
opposite for d-); here demonstrations are earlier user/assistant turns of the chat template, with no
instruction. Demonstrations come from online/retrieval.py; the most relevant sits nearest the prompt, as the
authors order them.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prospect.data.batching import pad
from prospect.data.formats import Messages, Text
from prospect.data.pipeline import read_eval_prompts, read_training
from prospect.data.tokenize import Encoder
from prospect.errors import UserError
from prospect.io import write_json, write_jsonl
from prospect.models.loading import load_model
from prospect.models.precision import use_bf16
from prospect.models.sampling import HFSampler, SamplingParams
from prospect.models.scoring import TokenScorer
from prospect.online.icdpo_options import ICDPOConfig, ICDPORequest
from prospect.online.retrieval import (
    Demonstration,
    HiddenStateEmbedder,
    Retriever,
    Side,
    demonstrations,
    make_retriever,
    plain_text,
)
from prospect.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class Context:
    ids: list[int]
    truncated: bool


@dataclass
class Candidate:
    token_ids: list[int]
    completion: str
    finished: bool
    expert_logp: float
    amateur_logp: float | None
    score: float  # S: expert_logp - amateur_logp (expert_logp with no amateur)

    def row(self) -> dict[str, Any]:
        keys = ("completion", "score", "expert_logp", "amateur_logp", "finished")
        return {"tokens": len(self.token_ids), **{k: getattr(self, k) for k in keys}}


@dataclass
class Choice:
    """One prompt's ICDPO result: its demonstrations, the scored candidates and the best of them."""

    prompt: Text
    location: str
    shown: list[Demonstration]  # to the expert, most relevant first
    amateur_shown: list[Demonstration]  # to the amateur ("dispreferred" only)
    candidates: list[Candidate]
    seconds: float
    truncated: bool  # a context lost its beginning to max_context_tokens

    @property
    def best(self) -> Candidate:
        return best_candidate(self.candidates)

    def row(self) -> dict[str, Any]:
        best = self.best
        out: dict[str, Any] = {
            "prompt": self.prompt,
            "location": self.location,
            "completion": best.completion,
            "score": best.score,
            "candidates": [c.row() for c in self.candidates],
            "demonstrations": [d.location for d in self.shown],
        }
        if self.amateur_shown:
            out["amateur_demonstrations"] = [d.location for d in self.amateur_shown]
        return {**out, "seconds": self.seconds}


def best_candidate(candidates: list[Candidate]) -> Candidate:
    """The candidate with the highest S (the first of equals)."""
    return max(candidates, key=lambda c: c.score)


def in_context(prompt: Text, shots: list[tuple[Text, Text]]) -> Text:
    """The prompt after (prompt, response) demonstrations, in the order given. A conversation gets them as
    earlier user/assistant turns (its own system message stays first); plain text gets prompt + response
    blocks separated by a blank line."""
    if isinstance(prompt, str):
        return "".join(f"{plain_text(p)}{plain_text(r)}\n\n" for p, r in shots) + prompt
    turns = [m for p, r in shots for m in as_messages(p, "user") + as_messages(r, "assistant")]
    system = [m for m in prompt if m.get("role") == "system"]
    rest = [m for m in prompt if m.get("role") != "system"]
    return system + [m for m in turns if m.get("role") != "system"] + rest


def as_messages(text: Text, role: str) -> Messages:
    return text if isinstance(text, list) else [{"role": role, "content": text}]


class ICDPO:
    """Retrieve, sample from the expert, score against the amateur, choose: one prompt at a time."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        retriever: Retriever,
        options: ICDPOConfig,
        bf16: bool = False,
    ):
        self.tokenizer, self.retriever, self.options = tokenizer, retriever, options
        length = options.max_context_tokens
        self.encoder = Encoder(tokenizer, length + options.max_new_tokens, length)
        self.sampler = HFSampler(model, tokenizer, batch_size=options.batch_size, bf16=bf16)
        self.scorer = TokenScorer(model, bf16=bf16)

    def context(self, prompt: Text, shown: list[Demonstration], side: Side, location: str) -> Context:
        """The prompt after the demonstrations' `side` responses, the most relevant nearest the prompt."""
        shots = [(d.prompt, d.response(side)) for d in reversed(shown)]
        ids = self.encoder.prompt_ids(in_context(prompt, shots), location)
        keep = self.options.max_context_tokens
        return Context(ids[-keep:], len(ids) > keep)

    def amateur_demonstrations(self, prompt: Text, shown: list[Demonstration]) -> list[Demonstration]:
        """d-: the rejected sides of the expert's own demonstrations when they are pairs, else retrieved."""
        if self.options.amateur != "dispreferred":
            return []
        if shown and all(d.dispreferred is not None for d in shown):
            return shown
        return self.retriever.retrieve(prompt, self.options.demonstrations, "dispreferred")

    def choose(self, prompt: Text, location: str, seed: int) -> Choice:
        started = time.perf_counter()
        o = self.options
        shown = self.retriever.retrieve(prompt, o.demonstrations, "preferred")
        expert = self.context(prompt, shown, "preferred", location)
        amateur_shown = self.amateur_demonstrations(prompt, shown)
        amateur = (
            None if o.amateur == "none" else self.context(prompt, amateur_shown, "dispreferred", location)
        )
        params = SamplingParams(o.max_new_tokens, o.temperature, o.top_p, n=o.samples, seed=seed)
        samples = self.sampler.generate([expert.ids], params)[0]
        completions = [s.token_ids for s in samples]
        expert_logps = self.logps(expert.ids, completions)
        amateur_logps = self.logps(amateur.ids, completions) if amateur else [None] * len(samples)
        candidates = [
            Candidate(
                s.token_ids,
                cast(str, self.tokenizer.decode(s.token_ids, skip_special_tokens=True)),
                s.finished,
                e,
                a,
                e - a if a is not None else e,
            )
            for s, e, a in zip(samples, expert_logps, amateur_logps)
        ]
        truncated = expert.truncated or bool(amateur and amateur.truncated)
        seconds = time.perf_counter() - started
        return Choice(prompt, location, shown, amateur_shown, candidates, seconds, truncated)

    @torch.no_grad()
    def logps(self, context: list[int], completions: list[list[int]]) -> list[float]:
        """log p(completion | context), summed over each completion's tokens, through prospect's scorer."""
        out: list[float] = []
        step = self.options.batch_size
        device = next(self.scorer.model.parameters()).device
        for start in range(0, len(completions), step):
            part = completions[start : start + step]
            seqs = pad([context] * len(part), part, self.tokenizer.pad_token_id).to(device)
            out += self.scorer.sequence_logps(seqs).tolist()
        return out


def check(request: ICDPORequest) -> Path:
    """Refuse what cannot run before anything loads; returns the output file."""
    o = request.options
    if o.shortlist < o.demonstrations and o.retriever != "random":
        raise UserError(
            f"icdpo.shortlist: expected at least icdpo.demonstrations ({o.demonstrations}), got {o.shortlist}"
        )
    out = Path(request.output)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; expected a JSONL file to write")
    for path in (out, summary_path(out)):
        if path.exists() and not request.overwrite:
            raise UserError(f"{path}: exists; pass --overwrite to replace it")
    return out


def summary_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.summary.json")


def read_demonstrations(request: ICDPORequest) -> list[Demonstration]:
    """The demonstrations of the training rows (held-out prompts left out), with enough of each side."""
    o, data = request.options, request.data
    rows = read_training(data, "paired" if o.shape == "paired" else "unpaired", o.seed, evaluating=True)
    demos = demonstrations(rows)  # type: ignore[arg-type]  # unpaired or paired rows, as asked
    if not any(d.preferred is not None for d in demos):
        raise UserError(
            f"{data.train}: no preferred responses to show (desirable examples or chosen sides); ICDPO's expert "
            "needs some"
        )
    if o.amateur == "dispreferred" and not any(d.dispreferred is not None for d in demos):
        raise UserError(
            f"{data.train}: no dispreferred responses (undesirable examples or rejected sides); "
            "icdpo.amateur=dispreferred needs some"
        )
    return demos


def run_icdpo(request: ICDPORequest) -> dict[str, Any]:
    """ICDPO on the first icdpo.num_prompts held-out prompts of request.data, demonstrations from its training
    rows. Writes one JSONL row per prompt and a summary beside it; returns the summary."""
    out = check(request)
    o = request.options
    demos = read_demonstrations(request)
    prompts = read_eval_prompts(request.data, o.num_prompts)
    if not prompts:
        raise UserError(f"{request.data.eval or request.data.train}: no held-out prompts")
    model, tokenizer = load_model(request.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.requires_grad_(False)
    model.to(device)  # type: ignore[arg-type]  # transformers' `to` takes a device
    model.eval()
    bf16 = use_bf16(o.precision, device)
    embedder = HiddenStateEmbedder(TokenScorer(model, bf16=bf16), tokenizer, batch=o.batch_size)
    retriever = make_retriever(o.retriever, demos, o.seed, o.shortlist, embedder)
    icdpo = ICDPO(model, tokenizer, retriever, o, bf16)
    choices = []
    with Progress("icdpo", len(prompts), "prompts") as progress:
        for i, p in enumerate(prompts):
            choices.append(icdpo.choose(p.prompt, p.location, o.seed + i))
            progress.update(1)
    summary = summarize(request, choices, retriever)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, [c.row() for c in choices])
    write_json(summary_path(out), summary)
    print(
        f"icdpo: {len(choices)} prompts, {summary['seconds_per_prompt']:.1f} s per prompt, mean S "
        f"{summary['mean_score']:+.3f} -> {out}",
        flush=True,
    )
    return summary


def summarize(request: ICDPORequest, choices: list[Choice], retriever: Retriever) -> dict[str, Any]:
    best = [c.best for c in choices]
    amateur = [b.amateur_logp for b in best if b.amateur_logp is not None]
    seconds = [c.seconds for c in choices]
    truncated = sum(c.truncated for c in choices)
    if truncated:
        log.warning("%d of %d prompts had a context cut to icdpo.max_context_tokens", truncated, len(choices))
    return {
        "model": request.model.name,
        "demonstrations_from": request.data.train,
        "prompts_from": request.data.eval or request.data.train,
        "options": dataclasses.asdict(request.options),
        "pool": {"preferred": retriever.count("preferred"), "dispreferred": retriever.count("dispreferred")},
        "prompts": len(choices),
        "mean_score": statistics.fmean(b.score for b in best),
        "mean_expert_logp": statistics.fmean(b.expert_logp for b in best),
        "mean_amateur_logp": statistics.fmean(amateur) if amateur else None,
        "mean_tokens": statistics.fmean(len(b.token_ids) for b in best),
        "truncated_contexts": truncated,
        "seconds_total": sum(seconds),
        "seconds_per_prompt": statistics.fmean(seconds),
    }

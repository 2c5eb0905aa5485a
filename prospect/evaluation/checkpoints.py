"""`prospect eval`: checkpoints against a baseline on the same held-out prompts, judged by any judges.

A checkpoint is a run directory (its final/ model, whose reference is the model the run started from: the
run's `model` section), a model directory inside a run (best/), or any transformers checkpoint or hub name
(its reference then comes from --reference). The baseline is each checkpoint's reference, or any model.
Every model samples each prompt once, with the same seed and settings, through the held-out evaluation the
trainer runs (heldout.evaluate), which also measures a checkpoint's KL to its reference on its own samples.
Then the judges, loaded one at a time, score every completion or compare each checkpoint's completion with
the baseline's (compare.py turns that into win rates and intervals).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prospect.config import Config, DataConfig, EvalConfig, ModelConfig
from prospect.data.formats import Example
from prospect.data.pipeline import encode_prompts, read_eval_prompts
from prospect.data.sources import BUILTINS
from prospect.data.tokenize import EncodedPrompt, Encoder
from prospect.errors import UserError
from prospect.evaluation.compare import Side, checkpoint_summary, finite, judge_agreement, table
from prospect.evaluation.heldout import evaluate
from prospect.evaluation.judges import AIJudgeOptions, check_judges, load_judge
from prospect.evaluation.winrate import BOOTSTRAP
from prospect.io import write_text_atomic
from prospect.models.default import EMBEDDED
from prospect.models.loading import load_model, looks_local
from prospect.models.precision import use_bf16
from prospect.models.scoring import TokenScorer
from prospect.recipe import MARKER, run_config

PROMPT_SOURCES = "vader, film-opinions, arithmetic, run, a prompts file, or a dataset"


@dataclass
class EvalRequest:
    """What `prospect eval` was asked (its command-line flags)."""

    checkpoints: list[str]
    output: str
    baseline: str = "reference"
    reference: str | None = None
    prompts: str = "vader"
    judges: str = "vader"
    sampling: EvalConfig = field(default_factory=lambda: EvalConfig(num_prompts=256, show=0))
    seed: int = 0
    bootstrap: int = BOOTSTRAP
    precision: str = "auto"
    ai: AIJudgeOptions = field(default_factory=AIJudgeOptions)
    overwrite: bool = False
    trust_remote_code: bool = False
    chat_template: str | None = None  # for models outside a run directory (a base model by name)


@dataclass
class Model:
    name: str  # as the user gave it
    config: ModelConfig  # what loads
    run: Config | None  # the run it comes from


def find_model(
    given: str, what: str, trust_remote_code: bool = False, chat_template: str | None = None
) -> Model:
    """A run directory (its final/), a model directory (in a run or not), or a hub or embedded name.
    `chat_template` (as model.chat_template) applies to a model outside a run; a run's model has its own."""
    path = Path(given).expanduser()
    if path.is_dir() and (path / MARKER).is_file():
        if not (path / "final" / "config.json").is_file():
            raise UserError(
                f"{what} {given}: the run has no final/ model (not finished?); give a model inside it, e.g. "
                f"{path / 'best'}"
            )
        path = path / "final"
    elif not path.exists() and (looks_local(given) or ("/" not in given and given not in EMBEDDED)):
        raise UserError(
            f"{what} {given}: no such run directory or checkpoint (expected a run directory, a transformers "
            "checkpoint directory or a hub name owner/name)"
        )
    elif path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{what} {given}: not a run directory, and no config.json: not a transformers model")
    if not path.exists():
        config = ModelConfig(name=given, trust_remote_code=trust_remote_code, chat_template=chat_template)
        return Model(given, config, None)
    run_dir = next((d for d in path.resolve().parents if (d / MARKER).is_file()), None)
    run = run_config(run_dir) if run_dir else None
    trust = trust_remote_code or bool(run and run.model.trust_remote_code)
    template = None if run else chat_template
    return Model(given, ModelConfig(name=str(path), trust_remote_code=trust, chat_template=template), run)


def reference_of(
    model: Model, given: str | None, trust_remote_code: bool, chat_template: str | None = None
) -> ModelConfig:
    """--reference when given, else the run's reference: the model it started from (or its
    train.reference_model), loaded as the run loaded it."""
    if given is not None:
        return find_model(given, "--reference", trust_remote_code, chat_template).config
    if model.run is None:
        raise UserError(
            f"checkpoint {model.name}: not in a run directory, so its reference model is unknown; give it "
            "with --reference"
        )
    source = model.run.train.reference_model
    return dataclasses.replace(model.run.model, name=source) if source else model.run.model


def prompt_data(spec: str, models: list[Model]) -> DataConfig:
    """Where the prompts come from: a built-in's test split (vader: the VADER movie reviews' held-out
    snippets), the first checkpoint's run's held-out data (`run`), or all of a file or dataset."""
    if spec == "run":
        if models[0].run is None:
            raise UserError(f"--prompts run: checkpoint {models[0].name} is not in a run directory")
        return models[0].run.data
    name = {"vader": "vader-movies"}.get(spec, spec)
    if name in BUILTINS:
        return DataConfig(eval=name, eval_split="test")
    path = Path(spec).expanduser()
    if not path.exists() and (looks_local(spec) or path.suffix or "/" not in spec):
        raise UserError(f"--prompts {spec}: no such file; expected {PROMPT_SOURCES}")
    return DataConfig(eval=spec, eval_split="test")


class Sampler:
    """Loads each model in turn and samples the prompts with it. A model used more than once (the reference
    of several checkpoints, the baseline, a checkpoint that is also a reference) is loaded once and kept."""

    def __init__(self, request: EvalRequest, prompts: list[Example], max_prompt_length: int):
        self.request, self.prompts, self.max_prompt_length = request, prompts, max_prompt_length
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.bf16 = use_bf16(request.precision, self.device)
        self.reused: list[ModelConfig] = []
        self.kept: list[tuple[ModelConfig, nn.Module, Any]] = []

    def load(self, config: ModelConfig) -> tuple[nn.Module, Any]:
        for kept, model, tokenizer in self.kept:
            if kept == config:
                return model, tokenizer
        model, tokenizer = load_model(config)
        model.requires_grad_(False)
        model.to(self.device)  # type: ignore[arg-type]  # transformers' `to` takes a device
        if config in self.reused:
            self.kept.append((config, model, tokenizer))
        return model, tokenizer

    def release(self) -> None:
        self.kept = []

    def sample(self, name: str, config: ModelConfig, reference: ModelConfig | None) -> Side:
        """The model's completions (and KL to `reference` on them, when given)."""
        model, tokenizer = self.load(config)
        reference_logps = None
        if reference is not None:
            reference_model, reference_tokenizer = self.load(reference)
            if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise UserError(
                    f"checkpoint {name}: its tokenizer differs from its reference's ({reference.name}); the KL "
                    "needs the same vocabulary (give the right one with --reference)"
                )
            reference_logps = TokenScorer(reference_model, bf16=self.bf16).sequence_logps
        cfg = self.request.sampling
        length = self.max_prompt_length
        items = encode_prompts(self.prompts, Encoder(tokenizer, length + cfg.max_new_tokens, length))
        policy = TokenScorer(model, bf16=self.bf16)
        result = evaluate(
            model, tokenizer, items, policy.sequence_logps, reference_logps, None, cfg,
            seed=self.request.seed, bf16=self.bf16, verbose=True, label=name,
        )  # fmt: skip
        return Side(name, config.name, result)

    def pairs(
        self, models: list[Model], references: list[ModelConfig], baseline: Model | None
    ) -> list[tuple[Side, Side]]:
        """(checkpoint, baseline) of every checkpoint; a baseline shared by several is sampled once."""
        uses = [m.config for m in models] + references + ([baseline.config] if baseline else references)
        self.reused = [c for i, c in enumerate(uses) if c in uses[i + 1 :]]
        baselines: dict[str, Side] = {}
        if baseline is not None:
            baselines[""] = self.sample(baseline.name, baseline.config, None)
        out = []
        for model, reference in zip(models, references):
            side = self.sample(model.name, model.config, reference)
            key = "" if baseline is not None else repr(reference)
            if key not in baselines:  # the reference as the baseline: sampled like the checkpoints, no KL
                baselines[key] = self.sample("reference", reference, None)
            out.append((side, baselines[key]))
        return out


def judge_all(
    request: EvalRequest,
    judges: list[str],
    pairs: list[tuple[Side, Side]],
    prompts: list[Example],
    sampler: Sampler,
) -> dict[str, dict]:
    """Each judge loaded in turn: scoring judges score every completion once, AI judges compare each
    checkpoint's completion with its baseline's. Returns the AI judges' call counts."""
    sampler.release()  # the models are done with
    items = [EncodedPrompt([], p.prompt, p.location, p.fields) for p in prompts]
    sides = list({id(s): s for pair in pairs for s in pair}.values())
    calls = {}
    for name in judges:
        print(f"judging with {name} ...", flush=True)
        judge = load_judge(name, request.ai, sampler.device, sampler.bf16)
        if judge.score is not None:
            for side in sides:
                side.scores[name] = judge.score(side.texts, items)
        elif judge.compare is not None:
            for model, baseline in pairs:
                texts = list(zip(model.texts, baseline.texts))
                model.preferences[name] = judge.compare([p.prompt for p in prompts], texts)
        if judge.ai is not None:
            calls[name] = judge.ai.report()
    return calls


def run_eval(request: EvalRequest) -> dict[str, Any]:
    """Sample, judge, summarize; print the table and write the JSON to request.output. Returns the JSON."""
    out = Path(request.output)
    if out.exists() and not request.overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it")
    if out.is_dir():
        raise UserError(f"{out}: is a directory; expected a JSON file to write")
    judges = check_judges(request.judges, request.ai)
    trust, template = request.trust_remote_code, request.chat_template
    models = [find_model(c, "checkpoint", trust, template) for c in request.checkpoints]
    references = [reference_of(m, request.reference, trust, template) for m in models]
    baseline = None
    if request.baseline != "reference":
        baseline = find_model(request.baseline, "--baseline", trust, template)
    data = prompt_data(request.prompts, models)
    prompts = read_eval_prompts(data, request.sampling.num_prompts)
    if not prompts:
        raise UserError(f"--prompts {request.prompts}: no prompts")
    sampler = Sampler(request, prompts, data.max_prompt_length)
    pairs = sampler.pairs(models, references, baseline)
    calls = judge_all(request, judges, pairs, prompts, sampler)
    baseline_paths = list(dict.fromkeys(b.path for _, b in pairs))
    cfg = request.sampling
    report = {
        "prompts": {"source": request.prompts, "count": len(prompts)},
        "baseline": {"name": request.baseline, "path": ", ".join(baseline_paths)},
        "judges": judges,
        "checkpoints": [
            checkpoint_summary(m, b, judges, prompts, request.bootstrap, request.seed) for m, b in pairs
        ],
        "agreement": judge_agreement(pairs, judges),
        "settings": {
            "seed": request.seed,
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "bootstrap": request.bootstrap,
            "interval": "95% percentile bootstrap over prompts",
            "lc_method": "logistic regression of the preference on tanh(char length difference / sd), "
            "ridge 1 on the slope; the predicted win rate at zero difference (prospect/evaluation/winrate.py)",
        },
        "ai_judge_calls": calls,
    }
    report = finite(report)
    print("\n" + table(report), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=1))
    print(f"wrote {out}", flush=True)
    return report

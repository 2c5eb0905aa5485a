"""`prospect preferences`: preference sources side by side on held-out human comparisons. Each source named
like a judge (pairwise:PATH, reward:PATH, vader, llm:PATH, ...) gives P(first > second) for every held-out
pair, shown in an order drawn by the seed; the file written holds each one's accuracy with its standard error,
expected calibration error, Brier score and reliability bins (`prospect report --preferences` draws them)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prospect.config import DataConfig
from prospect.data.convert import to_pairs
from prospect.data.formats import parse_rows
from prospect.data.pipeline import read_heldout_parsed
from prospect.data.splits import HELD_OUT, read_split
from prospect.data.tokenize import EncodedPrompt
from prospect.errors import UserError
from prospect.evaluation.judges import AIJudgeOptions, check_judges, load_judge
from prospect.evaluation.preferences import KIND, measure
from prospect.io import write_text_atomic
from prospect.models.precision import use_bf16


@dataclass
class PreferenceRequest:
    judges: str
    # data.train's split data.eval_split (all of a file without splits, or 'held-out': the share training
    # runs set aside), paired as for training
    data: DataConfig
    output: str
    num_pairs: int = 0  # the first N held-out pairs (0: all)
    seed: int = 0
    precision: str = "auto"
    ai: AIJudgeOptions | None = None
    overwrite: bool = False


def run_preferences(request: PreferenceRequest) -> dict[str, Any]:
    out = Path(request.output)
    if out.exists() and not request.overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it")
    ai = request.ai or AIJudgeOptions()
    names = check_judges(request.judges, ai)
    cfg = request.data
    if cfg.eval_split == HELD_OUT:  # the share of the prompts that training runs set aside
        kind, parsed = read_heldout_parsed(cfg)
    else:  # a split of a source with splits, or every row of one without (a file)
        kind, parsed = parse_rows(
            read_split(cfg.train, cfg.eval_split, cfg.subset, "--split").rows, cfg.format
        )
    pairs = to_pairs(kind, parsed, cfg, request.seed)[: request.num_pairs or None]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = use_bf16(request.precision, device)
    items = [EncodedPrompt([], p.prompt, p.location) for p in pairs]
    sources = {}
    for name in names:
        print(f"judging {len(pairs)} held-out pairs with {name} ...", flush=True)
        judge = load_judge(name, ai, device, bf16)
        quality = measure(functools.partial(judge.prefer, items=items), pairs, request.seed)
        sources[name] = quality.as_dict()
    report = {
        "kind": KIND,
        "data": {"source": cfg.eval or cfg.train, "split": cfg.eval_split, "pair_min_gap": cfg.pair_min_gap},
        "pairs": len(pairs),
        "seed": request.seed,
        "sources": sources,
    }
    print(table(report), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=1))
    print(f"wrote {out}", flush=True)
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"{'source':40}{'accuracy':>18}{'ECE':>8}{'Brier':>8}{'pairs':>7}"]
    for name, q in report["sources"].items():
        accuracy = f"{q['accuracy']:.3f} ± {q['accuracy_stderr']:.3f}" if q["accuracy"] is not None else "-"
        ece = f"{q['ece']:.3f}" if q["ece"] is not None else "-"
        brier = f"{q['brier']:.3f}" if q["brier"] is not None else "-"
        lines.append(f"{name[-40:]:40}{accuracy:>18}{ece:>8}{brier:>8}{q['comparisons']:>7}")
    return "\n".join(lines)

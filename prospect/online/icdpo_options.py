"""ICDPO's options and its command line, kept apart from icdpo.py so that building `prospect`'s parser
imports neither torch nor transformers."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from prospect.config import DataConfig, ModelConfig
from prospect.options import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    SHARE,
    Bounds,
    add_option_flags,
    build_section,
    opt,
    options_from_flags,
)

RETRIEVERS = ("two-stage", "bm25", "random")
AMATEURS = ("plain", "dispreferred", "none")


@dataclass
class ICDPOConfig:
    """What ICDPO does for each prompt; `prospect icdpo --help` shows these as flags."""

    demonstrations: int = opt(
        2, "k: demonstrations shown to the expert before each prompt.", bounds=AT_LEAST_ONE
    )
    samples: int = opt(4, "N: candidates sampled from the expert per prompt.", bounds=AT_LEAST_ONE)
    retriever: str = opt(
        "two-stage",
        "How demonstrations are chosen: two-stage (BM25 shortlist, re-ranked by the model's hidden states), "
        "bm25, or random.",
        RETRIEVERS,
    )
    shortlist: int = opt(20, "BM25 demonstrations the re-rank chooses among.", bounds=AT_LEAST_ONE)
    amateur: str = opt(
        "plain",
        "The amateur S subtracts: plain (the model without demonstrations, the paper's ICDPO), dispreferred "
        "(shown dispreferred demonstrations, the paper's upgraded scorer) or none (the expert's log-prob alone).",
        AMATEURS,
    )
    shape: str = opt(
        "unpaired",
        "How feedback rows become demonstrations: unpaired (desirable / undesirable examples; pairs give both "
        "sides as examples) or paired (chosen and rejected sides of one prompt together).",
        ("unpaired", "paired"),
    )
    num_prompts: int = opt(8, "The first N distinct held-out prompts.", bounds=AT_LEAST_ONE)
    max_new_tokens: int = opt(48, "Tokens per candidate.", bounds=AT_LEAST_ONE)
    temperature: float = opt(1.0, "Sampling temperature of the expert (0: greedy).", bounds=NON_NEGATIVE)
    top_p: float = opt(1.0, "Nucleus sampling threshold.", bounds=SHARE)
    max_context_tokens: int = opt(
        1024, "Tokens kept of each context (demonstrations and prompt), its end kept.", bounds=Bounds(2)
    )
    batch_size: int = opt(16, "Sequences decoded at once.", bounds=AT_LEAST_ONE)
    seed: int = opt(0, "Sampling seed (prompt i samples with seed + i) and the random retriever's seed.")
    precision: str = opt("auto", "bf16 autocast or fp32, as train.precision.", ("auto", "bf16", "fp32"))


@dataclass
class ICDPORequest:
    """One ICDPO run: the model, where demonstrations and prompts come from, and what to write."""

    output: str  # the JSONL file of chosen completions; the summary goes beside it (.summary.json)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # demonstrations: data.train; prompts: held-out
    options: ICDPOConfig = field(default_factory=ICDPOConfig)
    overwrite: bool = False


ICDPO_HELP = (
    "in-context alignment (ICDPO): sample from the model shown preferred demonstrations, keep the best by S"
)


def add_icdpo_parser(commands: argparse._SubParsersAction) -> None:
    """`prospect icdpo`: the flags of ICDPOConfig (one per option) and where data and model come from."""
    sub = commands.add_parser(
        "icdpo",
        help=ICDPO_HELP,
        description=ICDPO_HELP + ". S(y) = log p(y | demonstrations, x) - log p(y | x); see docs/icdpo.md.",
        epilog="example:\n  prospect icdpo --model smollm2 --data vader-movies --num-prompts 8 -o icdpo.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arg = sub.add_argument
    arg("--model", "-m", default="smollm2", help="the model (as model.name) (default: %(default)s)")
    arg(
        "--data",
        "-d",
        default="vader-movies",
        help="feedback rows to draw demonstrations from (default: %(default)s)",
    )
    arg("--eval-data", help="held-out prompts, when not the held-out part of --data")
    arg(
        "--eval-split",
        default="test",
        help="split of the held-out prompts, or held-out (default: %(default)s)",
    )
    add_option_flags(sub, ICDPOConfig)
    arg("--output", "-o", required=True, help="JSONL file to write; its summary goes to NAME.summary.json")
    arg("--overwrite", action="store_true", help="replace existing output files")
    arg("--trust-remote-code", action="store_true", help="allow custom modelling code from the hub")


def icdpo_request(args: argparse.Namespace) -> ICDPORequest:
    """What `prospect icdpo` was asked, every flag checked as its option is."""
    where = "prospect icdpo"
    options = options_from_flags(args, ICDPOConfig, f"{where}: icdpo")
    data = build_section(
        DataConfig,
        {"train": args.data, "eval": args.eval_data, "eval_split": args.eval_split},
        f"{where}: data",
    )
    model = build_section(
        ModelConfig, {"name": args.model, "trust_remote_code": args.trust_remote_code}, f"{where}: model"
    )
    return ICDPORequest(args.output, model, data, options, args.overwrite)

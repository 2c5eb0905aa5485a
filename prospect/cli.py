"""Command line: `prospect train`, `prospect demo`, `prospect options`, ...

User errors end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from prospect.errors import UserError

DEMO_RECIPE = "kto_smollm2_vader"
LAST_BARRIER: list[object] = []  # see end_processes


DESCRIPTION = (
    "prospect aligns language models with feedback, on one engine: SFT, KTO, DPO, IPO, SimPO, ORPO and other "
    "offline methods, reward and pairwise preference models, PPO, GRPO, RLOO, Nash-MD, best-of-N, online loops "
    "(iterative KTO/DPO, ReST, ReST-EM, Constitutional AI), and alignment without training (ICDPO, GPO). A run "
    "is a YAML recipe plus section.key=value overrides."
)
EXAMPLES = """examples:
  prospect demo                                   KTO on SmolLM2 with human ratings, a before/after report
  prospect train -c recipes/kto_smollm2_vader.yaml data.train=feedback.jsonl loss.beta=0.2
  prospect eval runs/kto -o eval.json             the run against its base model: judged scores, win rates, KL
  prospect options train                          the train section's options, defaults and meanings
  prospect report runs/a runs/b -o report.html    curves, samples and the reward/KL frontier in one HTML file
  prospect COMMAND --help                         a command's own flags"""
OPTIONS_HINT = """Every recipe option can also be given as section.key=value, e.g. train.learning_rate=1e-5 loss.beta=0.2.
`prospect options` lists them all with their defaults and meanings; `prospect options eval` one section,
`prospect options loss` the losses and theirs."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prospect",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("train", "train a policy or reward model with a recipe"),
        ("demo", "KTO on the embedded SmolLM2 and VADER data, with a before/after report"),
        ("best-of-n", "sample N per prompt, keep the best by reward, fine-tune on them (rejection sampling)"),
        (
            "loop",
            "online rounds: iterative KTO/DPO, ReST, ReST-EM, Constitutional AI (the recipe's loop section)",
        ),
    ):
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=OPTIONS_HINT,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name != "demo":
            sub.add_argument("--config", "-c", help="YAML recipe (a path, or a name under recipes/)")
        if name == "best-of-n":
            sub.add_argument(
                "--no-train", action="store_true", help="only sample, score and keep; no fine-tuning"
            )
        sub.add_argument("--output-dir", "-o", help="run directory (same as train.output_dir=...)")
        sub.add_argument("--resume", action="store_true", help="continue the run in the output directory")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        sub.add_argument("overrides", nargs="*", metavar="section.key=value", help="override recipe options")
    score = commands.add_parser("score", help="score {prompt, completion} rows with a trained reward model")
    score.add_argument(
        "--model", "-m", required=True, help="reward model directory (a run's final/) or hub name"
    )
    score.add_argument(
        "--data", "-d", required=True, help="rows with prompt and completion (.jsonl/.json/.csv/...)"
    )
    score.add_argument("--output", "-o", required=True, help="JSONL file to write: each row plus its score")
    score.add_argument("--max-length", type=int, default=1024, help="tokens kept per prompt + completion")
    score.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    score.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom modelling code from the hub"
    )
    add_eval_parser(commands)
    options = commands.add_parser("options", help="list every option with its default and meaning")
    options.add_argument(
        "sections", nargs="*", metavar="SECTION", help="only these (model, data, train, ...)"
    )
    report = commands.add_parser(
        "report",
        help="one self-contained HTML file: training curves, before/after samples, reward/KL frontier, win rates",
        description=(
            "Write one HTML file (figures embedded, no network needed) that any browser opens. For each run: "
            "training curves, the held-out judge before and after with intervals, the same prompts answered "
            "before and after. For several runs and `prospect eval` files: judged score against KL, one line "
            "per method, win rates with intervals, comparison tables."
        ),
    )
    report.add_argument(
        "runs", nargs="*", metavar="RUN", help="run directories (as prospect train writes them)"
    )
    report.add_argument(
        "--eval",
        "-e",
        action="append",
        default=[],
        metavar="EVAL.json",
        help="a `prospect eval` JSON file (repeatable)",
    )
    report.add_argument(
        "--preferences",
        "-p",
        action="append",
        default=[],
        metavar="PREFS.json",
        help="a `prospect preferences` JSON file: reliability curves and accuracy (repeatable)",
    )
    report.add_argument("--output", "-o", required=True, help="the HTML file to write, e.g. report.html")
    add_preferences_parser(commands)
    add_feedback_parser(commands)
    from prospect.online.gpo import add_gpo_parser  # torch is imported when a command runs
    from prospect.online.icdpo_options import add_icdpo_parser  # options only: no torch

    add_icdpo_parser(commands)
    add_gpo_parser(commands)
    push = commands.add_parser(
        "push",
        help="publish a run's final/ model on the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)",
    )
    push.add_argument("run", help="run directory: its final/ (weights, tokenizer, model card) is uploaded")
    push.add_argument("--repo-id", required=True, help="hub model repo to create or update: owner/name")
    push.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    push.add_argument("--message", help="commit message")
    return parser


EVAL_HELP = "judge checkpoints against a baseline on held-out prompts: scores, win rates with intervals, KL"
EVAL_EXAMPLES = """examples:
  prospect eval runs/kto -o eval.json                    the run's final/ against its base model, VADER judge
  prospect eval runs/kto runs/dpo --judges vader,reward:runs/rm/final,llm:HuggingFaceTB/SmolLM2-360M-Instruct \\
      --prompts vader --num-prompts 128 -o eval.json
  prospect eval runs/sft-arith --prompts arithmetic --judges exact-match -o arith.json
Judges: vader (lexicon sentiment), exact-match (tasks' answers), reward:PATH (a reward model),
gpo:RUN:CONTEXT (a group's predicted rating), verifier:MODULE:FUNCTION (f(prompt, completion[, fields]) ->
float), and judges comparing the two completions in both orders: pairwise:PATH (a pairwise preference model),
llm:PATH (a local LLM), http:URL (an OpenAI-compatible endpoint; --judge-model, --judge-key-env).
Win rates count ties as half; intervals are 95% percentile bootstraps over prompts; the length-controlled win
rate is explained in README's `prospect eval` section."""


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "eval",
        help=EVAL_HELP,
        description=EVAL_HELP,
        epilog=EVAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arg = sub.add_argument
    arg(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="run directory (its final/), model dir or hub name",
    )
    arg("--output", "-o", required=True, help="JSON file to write (the table is printed)")
    arg(
        "--baseline",
        default="reference",
        help="'reference' (each run's base model) or a model (default: %(default)s)",
    )
    arg("--reference", help="model the KL is measured against (default: the run's base model)")
    arg(
        "--prompts",
        default="vader",
        help="vader, film-opinions (open prompts unlike the training ones), arithmetic, run (the run's held-out data), a file or dataset",
    )
    arg("--num-prompts", type=int, default=256, help="first N distinct prompts (default: %(default)s)")
    arg("--judges", default="vader", help="comma-separated judges, see below (default: %(default)s)")
    arg("--judge-model", help="http judge: the model to ask for")
    arg("--judge-key-env", help="http judge: environment variable holding the API key")
    arg("--judge-allow-http", action="store_true", help="http judge: allow plain http to another machine")
    arg("--judge-cot", action="store_true", help="AI judges reason before their verdict")
    arg("--max-new-tokens", type=int, default=48, help="tokens per completion (default: %(default)s)")
    arg("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    arg("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: %(default)s)")
    arg("--batch-size", type=int, default=32, help="prompts generated at once (default: %(default)s)")
    arg("--seed", type=int, default=0, help="sampling and bootstrap seed (default: %(default)s)")
    arg("--bootstrap", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")
    arg("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="as train.precision")
    arg("--overwrite", action="store_true", help="replace an existing output file")
    arg("--trust-remote-code", action="store_true", help="allow custom modelling code from the hub")
    arg(
        "--chat-template",
        help="as model.chat_template, for models given outside a run directory (a base model by name, e.g. "
        "--baseline gemma3-270m --chat-template gemma); a run's model keeps its own",
    )


def eval_command(args: argparse.Namespace) -> None:
    from prospect.config import EvalConfig
    from prospect.evaluation.checkpoints import EvalRequest, run_eval
    from prospect.evaluation.judges import AIJudgeOptions
    from prospect.options import build_section

    if args.bootstrap < 1:
        raise UserError(f"--bootstrap {args.bootstrap}: expected a number of resamples >= 1")
    sampling = build_section(
        EvalConfig,
        {"num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
         "top_p": args.top_p, "batch_size": args.batch_size, "show": 0},
        "prospect eval: eval",
    )  # fmt: skip
    if sampling.num_prompts < 1:
        raise UserError(f"--num-prompts {args.num_prompts}: expected at least 1")
    ai = AIJudgeOptions(args.judge_model, args.judge_key_env, args.judge_allow_http, args.judge_cot)
    run_eval(
        EvalRequest(
            args.checkpoints, args.output, args.baseline, args.reference, args.prompts, args.judges,
            sampling, args.seed, args.bootstrap, args.precision, ai, args.overwrite, args.trust_remote_code,
            args.chat_template,
        )
    )  # fmt: skip


PREFERENCES_HELP = (
    "preference sources on held-out human comparisons: accuracy with its standard error, expected calibration "
    "error, Brier score, reliability bins"
)


def add_preferences_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "preferences",
        help=PREFERENCES_HELP,
        description=PREFERENCES_HELP + ". Each held-out pair is shown in an order drawn by --seed.",
        epilog="example:\n  prospect preferences --judges pairwise:runs/pm,reward:runs/rm,vader -o prefs.json\n"
        "  prospect report --preferences prefs.json -o prefs.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arg = sub.add_argument
    arg(
        "--judges",
        required=True,
        help="comma-separated sources, named as `prospect eval` judges and pairwise:PATH",
    )
    arg(
        "--data",
        default="vader-movies",
        help="held-out comparisons: a built-in, file or dataset (default: %(default)s)",
    )
    arg("--split", default="test", help="its held-out split, or 'held-out' (default: %(default)s)")
    arg(
        "--pair-min-gap",
        type=float,
        default=1.0,
        help="ratings: pairs whose means differ this much (default: %(default)s)",
    )
    arg(
        "--max-pairs-per-prompt",
        type=int,
        default=8,
        help="ratings: pairs kept per prompt (default: %(default)s)",
    )
    arg("--num-pairs", type=int, default=0, help="the first N pairs (default: all)")
    arg("--seed", type=int, default=0, help="pairing and order seed (default: %(default)s)")
    arg("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="as train.precision")
    arg("--output", "-o", required=True, help="JSON file to write (the table is printed)")
    arg("--overwrite", action="store_true", help="replace an existing output file")


def preferences_command(args: argparse.Namespace) -> None:
    from prospect.config import DataConfig
    from prospect.evaluation.calibration import PreferenceRequest, run_preferences
    from prospect.options import build_section

    data = build_section(
        DataConfig,
        {"train": args.data, "eval_split": args.split, "pair_min_gap": args.pair_min_gap,
         "max_pairs_per_prompt": args.max_pairs_per_prompt},
        "prospect preferences",
    )  # fmt: skip
    request = PreferenceRequest(
        args.judges, data, args.output, args.num_pairs, args.seed, args.precision, overwrite=args.overwrite
    )
    run_preferences(request)


FEEDBACK_HELP = (
    "look at feedback from many raters before training on it: agreement (Krippendorff's alpha), each item's "
    "consensus, rater bias, label balance, length gaps, duplicates across splits, AI judges against people"
)
FEEDBACK_EXAMPLES = """examples:
  prospect feedback                                   the VADER study's four corpora (about 20 raters per text)
  prospect feedback vader-movies --corpora movieReviewSnippets -o movies.json --html movies.html
  prospect feedback ratings.jsonl --judges none --split all
DATA rows, one shape for the whole file (docs/feedback.md):
  {prompt, completion, ratings: [numbers]}                  each item's raw ratings, raters unnamed
  {prompt, completion, rating, rater}                       one rating a row by a named rater
  {prompt, chosen, rejected, votes_chosen, votes_rejected}  pairs with vote counts
  {prompt, completion, labels: {judge: label}}              several judges' labels of each item
Optional: id (rows sharing one are one item), source or domain (a group reported on its own).
Data without splits (one file) is split as training splits it: 10% of prompts, by hash, are `test`."""


def add_feedback_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "feedback",
        help=FEEDBACK_HELP,
        description=FEEDBACK_HELP,
        epilog=FEEDBACK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arg = sub.add_argument
    arg(
        "data",
        nargs="?",
        default="vader-movies",
        metavar="DATA",
        help="a feedback file or dataset, or vader-movies: the VADER study's ratings (default: %(default)s)",
    )
    arg(
        "--corpora",
        help="vader-movies: comma-separated corpora among movieReviewSnippets, tweets, "
        "amazonReviewSnippets, nytEditorialSnippets (default: all four)",
    )
    arg("--split", default="all", choices=("train", "test", "all"), help="which items (default: %(default)s)")
    arg(
        "--judges",
        default="vader",
        help="comma-separated judges scoring each completion, compared with the people: vader, reward:PATH, "
        "verifier:MODULE:FUNCTION, or none (default: %(default)s)",
    )
    arg("--bootstrap", type=int, default=1000, help="bootstrap resamples of the items (default: %(default)s)")
    arg("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    arg("--output", "-o", help="JSON file to write: every number, and each item's consensus")
    arg("--html", help="HTML page to write: figures and tables, self-contained")
    arg("--overwrite", action="store_true", help="replace existing output files")


def feedback_command(args: argparse.Namespace) -> None:
    from prospect.evaluation.feedback import FeedbackRequest, run_feedback
    from prospect.report.feedback import check_page, text_table, write_page

    page = Path(args.html) if args.html else None
    if page is not None:
        check_page(page, args.overwrite)
    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()] if args.corpora else None
    request = FeedbackRequest(
        args.data, args.split, corpora, args.judges, args.bootstrap, args.seed, args.output, args.overwrite
    )
    report = run_feedback(request)
    print(text_table(report), flush=True)
    if page is not None:
        print(f"wrote {write_page(report, page)}", flush=True)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "options":
        from prospect.cli_help import all_options

        print(all_options(args.sections))
        return 0
    if args.command == "push":
        from prospect.engine.publish import push

        print(f"pushed {args.run}: {push(Path(args.run), args.repo_id, args.public, args.message)}")
        return 0
    if args.command == "eval":
        eval_command(args)
        return 0
    if args.command == "preferences":
        preferences_command(args)
        return 0
    if args.command == "gpo":
        from prospect.online.gpo import gpo_command

        gpo_command(args)
        return 0
    if args.command == "icdpo":
        from prospect.online.icdpo import run_icdpo
        from prospect.online.icdpo_options import icdpo_request

        run_icdpo(icdpo_request(args))
        return 0
    if args.command == "feedback":
        feedback_command(args)
        return 0
    if args.command == "report":
        from prospect.report.page import write_report

        path = write_report(
            [Path(r) for r in args.runs],
            [Path(e) for e in args.eval],
            Path(args.output),
            [Path(p) for p in args.preferences],
        )
        print(f"report: {path}")
        return 0
    if args.command == "score":
        from prospect.rewards import score_file

        n = score_file(
            args.model, args.data, args.output, args.max_length, args.overwrite, args.trust_remote_code
        )
        print(f"scored {n} rows -> {args.output}")
        return 0
    from prospect.recipe import load_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    elif args.command == "demo":
        overrides.append(f"train.output_dir=runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    overrides += ["train.resume=true"] * args.resume + ["train.overwrite=true"] * args.overwrite
    config = load_config(DEMO_RECIPE if args.command == "demo" else args.config, overrides)
    from prospect.losses import get_loss

    get_loss(config.loss_name).make_params(config.loss, f"{config.source}: loss")  # before anything loads

    if args.command == "loop":
        from prospect.online.rounds import run_loop

        run_loop(config)
        return 0
    if args.command == "best-of-n":
        from prospect.online.best_of_n import best_of_n

        best_of_n(config, train=not args.no_train)
        return 0
    from prospect.engine.factory import make_trainer

    make_trainer(config).train()
    return 0


def end_processes() -> None:
    """Every process meets a last barrier, whose handle is kept until the interpreter exits. gloo's worker
    threads free each finished collective, and a barrier holds the collectives still in flight when it was
    issued until it is freed itself; a worker that frees a tensor owning a Python object (DeepSpeed's) after
    Python began to finalize aborts the process ("terminate called without an active exception"). Held here,
    what this barrier holds is freed by the main thread; what it does not hold was freed before it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        barrier = dist.barrier(async_op=True)
        barrier.wait()
        LAST_BARRIER.append(barrier)


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("prospect").setLevel(logging.INFO)
    # DeepSpeed, once accelerate imports it, sets its logger's level itself; a filter outlasts that. Without
    # it every run on a CPU prints that DeepSpeed found no GPU.
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    quiet_libraries()
    try:
        code = run(argv)
        end_processes()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted; continue later with --resume", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()

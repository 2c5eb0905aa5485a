"""Command line: `prospect train`, `prospect demo`, `prospect options`, ...

User errors end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from prospect.errors import UserError

DEMO_RECIPE = "kto_smollm2_vader"
LAST_BARRIER: list[object] = []  # see end_processes


def loss_options() -> str:
    from prospect.losses import LOSSES

    lines = ["loss (choose with loss.name):"]
    for name, spec in sorted(LOSSES.items()):
        needs = ["reference model" if spec.needs_reference else "no reference", f"{spec.data} data"]
        if spec.reference_point is not None:
            needs.append(spec.reference_point.summary)
        lines.append(f"  {name}: {spec.describe()}")
        lines.append(f"      needs: {', '.join(needs)}")
        for f in dataclasses.fields(spec.params):
            lines.append(f"  loss.{f.name} = {f.default!r}")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def all_options(only: list[str] | None = None) -> str:
    """Every option, or those of the sections `only` ("loss": the losses and theirs)."""
    from prospect.config import SECTIONS, describe_options
    from prospect.options import suggest

    for name in only or []:
        if name not in SECTIONS and name != "loss":
            raise UserError(
                f"prospect options: unknown section '{name}'{suggest(name, [*SECTIONS, 'loss'])}; expected "
                f"{', '.join([*SECTIONS, 'loss'])}"
            )
    parts = [describe_options(only or ())] if not only or set(only) - {"loss"} else []
    return "\n".join(parts + ([loss_options()] if not only or "loss" in only else []))


DESCRIPTION = (
    "prospect aligns language models with feedback, on one engine: SFT, KTO, DPO, IPO, SimPO, ORPO and other "
    "offline methods, reward models, PPO, best-of-N, and online loops (iterative KTO/DPO, ReST, ReST-EM, "
    "Constitutional AI). A run is a YAML recipe plus section.key=value overrides."
)
EXAMPLES = """examples:
  prospect demo                                   KTO on SmolLM2 with human ratings, a before/after report
  prospect train -c recipes/kto_smollm2_vader.yaml data.train=feedback.jsonl loss.beta=0.2
  prospect options train                          the train section's options, defaults and meanings
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
    options = commands.add_parser("options", help="list every option with its default and meaning")
    options.add_argument(
        "sections", nargs="*", metavar="SECTION", help="only these (model, data, train, ...)"
    )
    push = commands.add_parser(
        "push",
        help="publish a run's final/ model on the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)",
    )
    push.add_argument("run", help="run directory: its final/ (weights, tokenizer, model card) is uploaded")
    push.add_argument("--repo-id", required=True, help="hub model repo to create or update: owner/name")
    push.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    push.add_argument("--message", help="commit message")
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "options":
        print(all_options(args.sections))
        return 0
    if args.command == "push":
        from prospect.engine.publish import push

        print(f"pushed {args.run}: {push(Path(args.run), args.repo_id, args.public, args.message)}")
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

"""GPO (Zhao, Dang & Grover, 2023, "Group Preference Optimization: Few-Shot Alignment of Large Language
Models"): meta-training the in-context preference module (prospect/models/gpo.py) over many groups, its
evaluation on held-out groups against three baselines, and `prospect gpo train | evaluate` (docs/gpo.md).

Meta-training, as the paper's Algorithm 1 and the authors' `train_gpo.py`: each step draws a batch of training
groups and one m (uniform in [min_context, max_context]); each group's examples are shuffled, the first m are
the context and the next `targets` the targets; the loss is the targets' cross-entropy. AdamW with a cosine
schedule, seeded. The held-out groups' loss on fixed episodes is logged, never used to choose anything.

Evaluation, on the held-out groups: for each resample, each group's examples are shuffled once; the last
`targets` are the targets, and the first m the context, for every m asked (so the contexts are nested and
every m is scored on the same targets). Per method and m, the measures of gpo_data.MEASURES (the paper's
alignment score, the ranked probability score, pairwise accuracy), each averaged over resamples per group,
then mean and standard error over groups, and GPO's paired difference from each baseline.

Methods: `gpo`; `pooled`, one softmax regression on the embeddings fitted to every training group's examples
(one reward model for everyone; it ignores the context); `per_group`, a ridge regression on the embeddings
fitted to the m context examples alone (a linear model per group, its penalty chosen on training groups for
each m); `context_mean`, the mean of the context's distributions for every target (the group's rating habit,
no text). Torch is imported inside functions: building the command's parser stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prospect.errors import UserError
from prospect.options import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    Bounds,
    add_option_flags,
    opt,
    options_from_flags,
)

if TYPE_CHECKING:
    import torch

    from prospect.models.gpo import GPOModule
    from prospect.online.gpo_data import EmbeddedGroup, Episode

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "bf16", "fp32")
RIDGE_PENALTIES = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
POOLED_PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1)
TRAINING, GROUPS, METRICS, EXAMPLE = (
    "training.json",
    "groups.safetensors",
    "metrics.jsonl",
    "example_context.jsonl",
)


@dataclass
class GPOTrainConfig:
    """`prospect gpo train`: where the groups come from, the embedding LLM, the module and meta-training."""

    data: str = opt(
        "movielens-users", "Groups: movielens-users, or a file of {group, prompt, completion, rating} rows."
    )
    levels: str = opt("", "A group file's rating scale, comma-separated (empty: the distinct ratings in it).")
    model: str = opt("smollm2", "The frozen LLM whose embeddings GPO reads (as model.name).")
    heldout_percent: int = opt(25, "Share of groups held out (by a hash of the name).", bounds=Bounds(1, 99))
    steps: int = opt(3000, "Meta-training steps.", bounds=AT_LEAST_ONE)
    groups_per_step: int = opt(16, "Groups in each step's batch.", bounds=AT_LEAST_ONE)
    min_context: int = opt(1, "Fewest context points of a training episode.", bounds=NON_NEGATIVE)
    max_context: int = opt(64, "Most context points of a training episode.", bounds=AT_LEAST_ONE)
    targets: int = opt(32, "Target points per group and episode.", bounds=AT_LEAST_ONE)
    learning_rate: float = opt(3e-4, "AdamW's peak learning rate (cosine decay to 0).", bounds=POSITIVE)
    weight_decay: float = opt(0.1, "AdamW's weight decay.", bounds=NON_NEGATIVE)
    width: int = opt(128, "Transformer width.", bounds=AT_LEAST_ONE)
    layers: int = opt(4, "Transformer layers.", bounds=AT_LEAST_ONE)
    heads: int = opt(4, "Attention heads.", bounds=AT_LEAST_ONE)
    feedforward: int = opt(256, "Feed-forward width.", bounds=AT_LEAST_ONE)
    dropout: float = opt(
        0.2, "Dropout in the transformer layers while meta-training.", bounds=Bounds(0, 1, high_open=True)
    )
    eval_every: int = opt(250, "Steps between held-out loss readings.", bounds=AT_LEAST_ONE)
    seed: int = opt(0, "Seed of the module's initialisation and of the episodes.")
    precision: str = opt("auto", "The LLM's precision when embedding, as train.precision.", PRECISIONS)
    max_tokens: int = opt(256, "Tokens kept of each prompt + completion when embedding.", bounds=Bounds(2))
    batch_size: int = opt(32, "Texts embedded at once.", bounds=AT_LEAST_ONE)


@dataclass
class GPOEvalConfig:
    """`prospect gpo evaluate`: the context sizes, targets and resamples."""

    contexts: str = opt("1,2,4,8,16,32,64", "Context sizes m to evaluate, comma-separated.")
    targets: int = opt(32, "Target points per held-out group.", bounds=AT_LEAST_ONE)
    resamples: int = opt(5, "Shuffles of each held-out group.", bounds=AT_LEAST_ONE)
    seed: int = opt(0, "Seed of the shuffles and of the baselines' penalty choice.")


def run_train(options: GPOTrainConfig, output: Path, overwrite: bool = False) -> dict[str, Any]:
    """Embed the groups, meta-train, save the module and what evaluation needs in `output`."""
    import torch

    from prospect.io import write_json, write_jsonl
    from prospect.models.gpo import GPOConfig, GPOModule, load_embedder, save_gpo
    from prospect.models.precision import use_bf16
    from prospect.online.gpo_data import embed_groups, read_groups, save_groups, split_groups

    check_train(options, output, overwrite)
    groups = read_groups(options.data, options.levels, options.max_context + options.targets)
    train, heldout = split_groups(groups.groups, options.heldout_percent)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = use_bf16(options.precision, device)
    embedder = load_embedder(options.model, bf16, options.max_tokens, options.batch_size)
    embedded = embed_groups(train + heldout, embedder)
    train_embedded, heldout_embedded = embedded[: len(train)], embedded[len(train) :]
    shape = {
        k: getattr(options, k) for k in ("width", "layers", "heads", "feedforward", "dropout", "max_context")
    }
    config = GPOConfig(embedder.dim, groups.levels, **shape, embedder=embedder.spec(options.model))
    config.check("gpo")
    torch.manual_seed(options.seed)
    module = GPOModule(config)
    module.standardise_with(torch.cat([g.x for g in train_embedded]))
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    readings = meta_train(module, train_embedded, heldout_embedded, options, output / METRICS)
    save_gpo(module, output)
    save_groups(output / GROUPS, embedded)
    write_jsonl(output / EXAMPLE, [e.row() for e in heldout[0].examples[:16]])
    summary = {
        "data": groups.source,
        "levels": groups.levels,
        "model": options.model,
        "options": dataclasses.asdict(options),
        "train_groups": [g.name for g in train],
        "heldout_groups": [g.name for g in heldout],
        "examples": sum(len(g.examples) for g in groups.groups),
        "texts_embedded_now": embedder.computed,
        "first_heldout_loss": readings[0]["heldout_loss"],
        "last_heldout_loss": readings[-1]["heldout_loss"],
        "seconds_training": time.perf_counter() - started,
    }
    write_json(output / TRAINING, summary)
    print(
        f"gpo: {len(train)} training and {len(heldout)} held-out groups, held-out loss "
        f"{summary['first_heldout_loss']:.3f} -> {summary['last_heldout_loss']:.3f} -> {output}",
        flush=True,
    )
    return summary


def check_train(options: GPOTrainConfig, output: Path, overwrite: bool) -> None:
    """Refuse what cannot run before anything loads."""
    if options.min_context > options.max_context:
        raise UserError(
            f"gpo.min_context: expected at most max_context ({options.max_context}), got {options.min_context}"
        )
    if options.width % options.heads:
        raise UserError(f"gpo.width: expected a multiple of heads ({options.heads}), got {options.width}")
    if output.is_file():
        raise UserError(f"{output}: is a file; expected a directory for the GPO run")
    if (output / TRAINING).exists() and not overwrite:
        raise UserError(f"{output}: holds a GPO run; pass --overwrite to replace it")


def meta_train(
    module: GPOModule,
    train: Sequence[EmbeddedGroup],
    heldout: Sequence[EmbeddedGroup],
    options: GPOTrainConfig,
    metrics: Path | None = None,
) -> list[dict[str, float]]:
    """Meta-train `module` in place; returns (and appends to `metrics`) the readings taken every eval_every
    steps and before the first: the training loss since the last reading and the held-out loss."""
    import torch

    from prospect.models.gpo import preference_loss
    from prospect.online.gpo_data import sample_episode
    from prospect.progress import Progress

    generator = torch.Generator().manual_seed(options.seed)
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay
    )
    steps = options.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    probes = heldout_episodes(heldout, options)
    readings: list[dict[str, Any]] = []
    losses: list[float] = []

    def record(step: int) -> None:
        readings.append(reading(module, probes, step, losses, optimizer))
        train_loss = readings[-1]["train_loss"]
        shown = "" if train_loss is None else f", training loss {train_loss:.3f}"
        log.info("gpo step %d: held-out loss %.3f%s", step, readings[-1]["heldout_loss"], shown)
        if metrics is not None:
            with open(metrics, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(readings[-1]) + "\n")
        losses.clear()

    if metrics is not None:
        metrics.write_text("")
    record(0)
    with Progress("gpo: meta-training", steps, "steps") as progress:
        for step in range(1, steps + 1):
            module.train()
            m = int(torch.randint(options.min_context, options.max_context + 1, (1,), generator=generator))
            picks = torch.randint(len(train), (options.groups_per_step,), generator=generator)
            episode = sample_episode([train[i] for i in picks], m, options.targets, generator)
            loss = preference_loss(
                module(episode.context_x, episode.context_y, episode.target_x), episode.target_y
            )
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            progress.update(1)
            if step % options.eval_every == 0 or step == steps:
                record(step)
    module.eval()
    return readings


def heldout_episodes(heldout: Sequence[EmbeddedGroup], options: GPOTrainConfig) -> list[Episode]:
    """Fixed held-out episodes for the loss log: every held-out group at m = 1, 4, 16, 64 (those within
    [min_context, max_context]), each with its own seeded draw."""
    import torch

    from prospect.online.gpo_data import sample_episode

    sizes = [m for m in (1, 4, 16, 64) if options.min_context <= m <= options.max_context] or [
        options.max_context
    ]
    generator = torch.Generator().manual_seed(options.seed + 1)
    return [sample_episode(heldout, m, options.targets, generator) for m in sizes]


def reading(
    module: GPOModule, probes: Sequence[Episode], step: int, losses: list[float], optimizer: Any
) -> dict:
    import torch

    from prospect.models.gpo import preference_loss

    module.eval()
    with torch.no_grad():
        heldout = [
            preference_loss(module(p.context_x, p.context_y, p.target_x), p.target_y).item() for p in probes
        ]
    return {
        "step": step,
        "train_loss": statistics.fmean(losses) if losses else None,
        "heldout_loss": statistics.fmean(heldout),
        "lr": optimizer.param_groups[0]["lr"],
    }


Predictor = Callable[["Episode"], "torch.Tensor"]  # an episode -> predicted distributions [B, n, K]


def ridge_predictor(module: GPOModule, penalty: float) -> Predictor:
    """Per group, a ridge regression of the context's distributions on its standardised embeddings (in the
    dual: m points), the intercept the context mean; predictions clipped at 0 and renormalised."""
    import torch

    def predict(episode: Episode) -> torch.Tensor:
        cx, tx = module.standardised(episode.context_x), module.standardised(episode.target_x)
        mean = episode.context_y.mean(1, keepdim=True)
        gram = cx @ cx.transpose(1, 2) / cx.shape[-1]
        eye = torch.eye(cx.shape[1]).expand_as(gram)
        weights = torch.linalg.solve(gram + penalty * eye, episode.context_y - mean)
        raw = (mean + (tx @ cx.transpose(1, 2) / cx.shape[-1]) @ weights).clamp_min(0)
        return raw / raw.sum(-1, keepdim=True)

    return predict


def context_mean(episode: Episode) -> torch.Tensor:
    return episode.context_y.mean(1, keepdim=True).expand(-1, episode.target_x.shape[1], -1)


def fit_pooled(module: GPOModule, groups: Sequence[EmbeddedGroup], penalty: float) -> Predictor:
    """One softmax regression of every group's distributions on the standardised embeddings (full-batch
    L-BFGS on cross-entropy + penalty * |W|^2 / 2): a reward model pooled over the groups."""
    import torch

    x = module.standardised(torch.cat([g.x for g in groups]))
    y = torch.cat([g.y for g in groups])
    linear = torch.nn.Linear(x.shape[1], y.shape[1])
    torch.nn.init.zeros_(linear.weight)
    with torch.no_grad():
        linear.bias.copy_(y.mean(0).clamp_min(1e-6).log())
    solver = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        solver.zero_grad()
        loss = -(y * linear(x).log_softmax(-1)).sum(-1).mean() + penalty / 2 * linear.weight.square().sum()
        loss.backward()
        return loss

    solver.step(objective)
    linear.requires_grad_(False)
    return lambda episode: linear(module.standardised(episode.target_x)).softmax(-1)


def mean_alignment(predict: Predictor, episodes: Sequence[Episode], levels: torch.Tensor) -> float:
    from prospect.online.gpo_data import alignment_scores

    return statistics.fmean(float(alignment_scores(predict(e), e.target_y, levels).mean()) for e in episodes)


def choose(candidates: dict[float, Predictor], episodes: Sequence[Episode], levels: torch.Tensor) -> float:
    """The candidate with the best mean alignment score on `episodes` (training groups only)."""
    return max(candidates, key=lambda key: mean_alignment(candidates[key], episodes, levels))


def evaluate(
    module: GPOModule,
    train: Sequence[EmbeddedGroup],
    heldout: Sequence[EmbeddedGroup],
    options: GPOEvalConfig,
) -> dict[str, Any]:
    """The measures (gpo_data.MEASURES) of GPO and the baselines on the held-out groups, for each context size;
    the baselines' penalties are chosen on the training groups."""
    import torch

    from prospect.online.gpo_data import (
        Measures,
        episode_of,
        measures,
        paired_difference,
        sample_episode,
        summarise,
    )

    contexts = context_sizes(options.contexts)
    levels, largest = module.levels, max(contexts)
    eligible = [g for g in heldout if len(g.x) >= largest + options.targets]
    if len(eligible) < 2:
        raise UserError(
            f"gpo evaluate: {len(eligible)} held-out groups have the {largest + options.targets} examples the "
            "largest context and the targets need; expected at least 2 (lower --contexts or --targets)"
        )
    generator = torch.Generator().manual_seed(options.seed)
    split = max(
        1, len(train) // 5
    )  # the pooled model's penalty: fitted on 4/5 of training groups, chosen on 1/5
    tuning = [sample_episode(train[:split], 0, options.targets, generator)]
    pooled_penalty = choose(
        {p: fit_pooled(module, train[split:], p) for p in POOLED_PENALTIES}, tuning, levels
    )
    pooled = fit_pooled(module, train, pooled_penalty)
    long_enough = [g for g in train if len(g.x) >= largest + options.targets] or list(train)
    penalties = {}
    for m in contexts:
        drawn = [sample_episode(long_enough, m, options.targets, generator) for _ in range(2)]
        penalties[m] = choose({p: ridge_predictor(module, p) for p in RIDGE_PENALTIES}, drawn, levels)
    methods: dict[str, Callable[[int], Predictor]] = {
        "gpo": lambda m: lambda e: module.predict(e.context_x, e.context_y, e.target_x),
        "pooled": lambda m: pooled,
        "per_group": lambda m: ridge_predictor(module, penalties[m]),
        "context_mean": lambda m: context_mean,
    }
    # scores[method][m][group] -> the group's measures, one per resample
    scores: dict[str, dict[int, list[list[Measures]]]] = {
        name: {m: [[] for _ in eligible] for m in contexts} for name in methods
    }
    with torch.no_grad():
        for _ in range(options.resamples):
            orders = [torch.randperm(len(g.x), generator=generator) for g in eligible]
            targets = [o[-options.targets :] for o in orders]
            for m in contexts:
                episode = episode_of(eligible, [o[:m] for o in orders], targets)
                for name, make in methods.items():
                    for i, measured in enumerate(measures(make(m)(episode), episode.target_y, levels)):
                        scores[name][m][i].append(measured)
    table = {name: {str(m): summarise(per_m[m]) for m in contexts} for name, per_m in scores.items()}
    baselines = [name for name in methods if name != "gpo"]
    gpo_minus = {
        b: {str(m): paired_difference(scores["gpo"][m], scores[b][m]) for m in contexts} for b in baselines
    }
    return {
        "heldout_groups": len(eligible),
        "targets": options.targets,
        "resamples": options.resamples,
        "contexts": contexts,
        "penalties": {"pooled": pooled_penalty, "per_group": {str(m): p for m, p in penalties.items()}},
        "methods": table,
        "gpo_minus": gpo_minus,  # paired over held-out groups: gpo's measure minus the baseline's
    }


def context_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise UserError(
            f"gpo.contexts: expected comma-separated whole numbers, e.g. 1,4,16; got {text!r}"
        ) from None
    if not sizes or sizes[0] < 1:
        raise UserError(f"gpo.contexts: expected context sizes of 1 or more, got {text!r}")
    return sizes


def run_evaluate(run: Path, options: GPOEvalConfig, output: Path | None = None) -> dict[str, Any]:
    """Evaluate a `prospect gpo train` run on its held-out groups; write and print the table."""
    from prospect.io import read_json, write_json
    from prospect.models.gpo import load_gpo
    from prospect.online.gpo_data import load_groups, result_tables

    if not (run / TRAINING).is_file():
        raise UserError(f"{run}: no {TRAINING}; expected a `prospect gpo train` directory")
    module, record = load_gpo(run), read_json(run / TRAINING)
    groups = {g.name: g for g in load_groups(run / GROUPS)}
    train = [groups[n] for n in record["train_groups"]]
    result = evaluate(module, train, [groups[n] for n in record["heldout_groups"]], options)
    result = {"run": str(run), "data": record["data"], "options": dataclasses.asdict(options), **result}
    target = output or run / "evaluation.json"
    write_json(target, result)
    print(result_tables(result), flush=True)
    print(f"gpo evaluate: {result['heldout_groups']} held-out groups -> {target}", flush=True)
    return result


GPO_HELP = "GPO: a small transformer that learns a group's preferences from a few of its examples, in context"


def add_gpo_parser(commands: argparse._SubParsersAction) -> None:
    """`prospect gpo train` and `prospect gpo evaluate`, one flag per option."""
    gpo = commands.add_parser("gpo", help=GPO_HELP, description=GPO_HELP + "; see docs/gpo.md.")
    steps = gpo.add_subparsers(dest="gpo_command", required=True, metavar="{train,evaluate}")
    train = steps.add_parser(
        "train",
        help="embed the groups with the frozen LLM and meta-train GPO on the training groups",
        epilog="example:\n  prospect gpo train --data movielens-users --model smollm2 -o runs/gpo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_option_flags(train, GPOTrainConfig)
    train.add_argument("--output", "-o", required=True, help="the run directory to write")
    train.add_argument("--overwrite", action="store_true", help="replace a GPO run in the directory")
    evaluate_parser = steps.add_parser(
        "evaluate",
        help="alignment score and accuracy on the held-out groups, against the baselines, by context size",
    )
    evaluate_parser.add_argument("run", help="a `prospect gpo train` directory")
    add_option_flags(evaluate_parser, GPOEvalConfig)
    evaluate_parser.add_argument("--output", "-o", help="JSON file to write (default: RUN/evaluation.json)")


def gpo_command(args: argparse.Namespace) -> None:
    """Run `prospect gpo train` or `prospect gpo evaluate`, every flag checked as its option is."""
    if args.gpo_command == "train":
        run_train(
            options_from_flags(args, GPOTrainConfig, "prospect gpo train"), Path(args.output), args.overwrite
        )
    else:
        options = options_from_flags(args, GPOEvalConfig, "prospect gpo evaluate")
        run_evaluate(Path(args.run), options, Path(args.output) if args.output else None)

"""Online and self-training loops, composed of the sampler, a labeller, a loss and the engine:

- iterative (online KTO / DPO): each round samples from the current policy, labels the samples (binary for
  unpaired losses, pairs for pairwise ones), and trains the policy on them with the previous round's policy
  as the reference (loop.reference=previous) or the base model (base);
- rest (Gulcehre et al.): each round Grows N samples per prompt from the current policy, then runs Improve
  steps on that same set, fine-tuning on samples above rising reward thresholds (loop.improve_thresholds);
- rest_em (Singh et al.): the E-step keeps the samples a binary signal marks correct; the M-step fine-tunes
  the *base* model on them, every iteration;
- constitutional (Bai et al., supervised stage): the policy critiques and revises its own samples against
  principles from a constitution file; the policy is fine-tuned on the revisions. The RL stage is the
  iterative loop with an AI judge (loop.judge) as the labeller.

Every round keeps its samples, training data and training run on disk (run_dir/round-NN/); a finished round
is marked DONE, so a killed loop resumes at the round it was in (and inside that round's training run), and a
round whose labelling failed is labelled again from the samples it drew.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate import PartialState

from prospect.config import Config
from prospect.data.pipeline import read_prompts
from prospect.data.splits import evaluates
from prospect.engine.rundir import RunDir
from prospect.errors import UserError
from prospect.evaluation.ai_judges import HTTPJudge, LocalJudge, local_judge, prompt_text
from prospect.io import read_jsonl, write_jsonl, write_text_atomic
from prospect.losses import LossSpec, get_loss
from prospect.models.loading import resolve_model_source
from prospect.online.labellers import (
    Group,
    JudgeLabeller,
    balance_labels,
    binary_labels,
    filtered,
    select_pairs,
)
from prospect.online.session import SamplingSession, nested_run
from prospect.rewards import check_reward

CRITIQUE = (
    "Critique your previous response by this principle: {principle} Point out, in a few sentences, "
    "where it falls short."
)
REVISE = (
    "Now rewrite your original response so that it follows the principle. Reply with the new response only."
)


@dataclass
class TrainingStep:
    """One training run of a round, in round-NN/<name>/, on the rows of `data_file`."""

    name: str
    data_file: Path
    # Set when the step writes its own data file: the round's samples scoring at least this (ReST's Improve).
    keep_above: float | None = None


class LoopKind:
    """How one kind of loop turns a round's samples into training rows, and which training runs follow."""

    labels_with_reward = True  # needs online.reward_model / reward_function unless a judge labels
    fine_tunes_on_samples = False  # trains on kept {prompt, completion} rows, so the loss must take those

    def __init__(self, config: Config, spec: LossSpec) -> None:
        self.config, self.spec = config, spec
        if self.fine_tunes_on_samples and spec.data != "completions":
            raise UserError(
                f"loop.kind={config.loop.kind} fine-tunes on kept samples; use loss.name=sft, not {spec.name}"
            )

    def label(self, session: SamplingSession, groups: list[Group]) -> tuple[list[dict], dict]:
        """This process's training rows (written to data.jsonl) and numbers about them (stats.json)."""
        return label(session, groups, self.spec.data)

    def steps(self, rdir: Path) -> list[TrainingStep]:
        return [TrainingStep("train", rdir / "data.jsonl")]

    def start_model(self, base: str, policy: str) -> str:
        """The model the round's first training step starts from."""
        return policy


class Iterative(LoopKind):
    """Online KTO / DPO: label the samples (binary or pairs, as the loss needs), train the current policy."""


class ReST(LoopKind):
    """Grow: score the samples; Improve: one training step per rising threshold, each on the samples at or
    above it, each starting from the previous step's model."""

    fine_tunes_on_samples = True

    def __init__(self, config: Config, spec: LossSpec) -> None:
        super().__init__(config, spec)
        try:
            self.thresholds = [float(x) for x in config.loop.improve_thresholds.split(",")]
        except ValueError:
            raise UserError(
                f"loop.improve_thresholds={config.loop.improve_thresholds!r}: expected numbers, comma separated"
            ) from None

    def label(self, session: SamplingSession, groups: list[Group]) -> tuple[list[dict], dict]:
        session.score(groups)
        return [], {}  # the Improve steps filter the scored samples at each threshold

    def steps(self, rdir: Path) -> list[TrainingStep]:
        return [
            TrainingStep(f"improve-{i}", rdir / f"improve-{i}.jsonl", threshold)
            for i, threshold in enumerate(self.thresholds, start=1)
        ]


class ReSTEM(LoopKind):
    """E-step: keep the samples the signal marks correct; M-step: fine-tune the base model on them."""

    fine_tunes_on_samples = True

    def start_model(self, base: str, policy: str) -> str:
        return base


class Constitutional(LoopKind):
    """The policy critiques and revises its samples against the constitution; it trains on the revisions."""

    labels_with_reward = False
    fine_tunes_on_samples = True

    def __init__(self, config: Config, spec: LossSpec) -> None:
        super().__init__(config, spec)
        self.rules = principles(config)

    def label(self, session: SamplingSession, groups: list[Group]) -> tuple[list[dict], dict]:
        return critique_and_revise(session, groups, self.rules), {}


LOOP_KINDS: dict[str, type[LoopKind]] = {
    "iterative": Iterative,
    "rest": ReST,
    "rest_em": ReSTEM,
    "constitutional": Constitutional,
}


def principles(config: Config) -> list[str]:
    path = config.loop.constitution
    if not path:
        raise UserError(
            "loop.kind=constitutional needs loop.constitution, a text file with one principle per line"
        )
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise UserError(f"{path}: cannot read the constitution ({exc.strerror})") from None
    found = [line for line in lines if line and not line.startswith("#")]
    if not found:
        raise UserError(f"{path}: no principles (one per line expected)")
    return found


def make_judge(session: SamplingSession) -> JudgeLabeller:
    """loop.judge: the policy itself, a local model, or an HTTP endpoint."""
    loop = session.config.loop
    complete: LocalJudge | HTTPJudge
    if loop.judge == "self":
        complete = LocalJudge(session.model, session.tokenizer, bf16=session.bf16)
    elif loop.judge == "http":
        if not (loop.judge_url and loop.judge_model and loop.judge_key_env):
            raise UserError(
                "loop.judge=http needs loop.judge_url, loop.judge_model and loop.judge_key_env (the name of the "
                "environment variable that holds the API key)"
            )
        complete = HTTPJudge(
            loop.judge_url, loop.judge_model, loop.judge_key_env, allow_http=loop.judge_allow_http
        )
    else:
        complete = local_judge(loop.judge, session.device, session.bf16)
    return JudgeLabeller(complete, cot=loop.judge_cot)


def label(session: SamplingSession, groups: list[Group], needs: str) -> tuple[list[dict], dict]:
    """Training rows in the shape the loss needs, and numbers about them."""
    loop, o = session.config.loop, session.config.online
    rng = random.Random(session.seed)
    stats: dict = {}
    if loop.judge != "none":
        judge = make_judge(session)
        if needs == "paired" and loop.judge_mode == "compare":
            rows = judge.judged_pairs(groups, rng)
            return rows, judge.report()
        flat = [(g, c) for g in groups for c in g.completions]
        ratings = judge.rate([g.prompt for g, _ in flat], [c for _, c in flat])
        stats.update(judge.report())
        offset = 0
        for group in groups:
            values = ratings[offset : offset + len(group.completions)]
            offset += len(group.completions)
            kept = [(c, v) for c, v in zip(group.completions, values) if v is not None]
            group.completions = [c for c, _ in kept]
            group.scores = [v for _, v in kept]
    elif o.reward_model or o.reward_function:
        session.score(groups)
    else:
        raise UserError(
            "online loops need a labeller: online.reward_model, online.reward_function or loop.judge"
        )
    every = [s for g in groups for s in g.scores]
    stats["score_mean"] = statistics.fmean(every) if every else None
    if needs == "unpaired":
        rows = binary_labels(groups, loop.threshold, loop.threshold_value)
        rows = balance_labels(rows, loop.undesirable_ratio, rng)
        stats["desirable"] = sum(r["label"] for r in rows)
        stats["undesirable"] = len(rows) - stats["desirable"]
    elif needs == "paired":
        rows = select_pairs(groups, loop.pair_selection, loop.pair_min_gap, rng)
    else:
        rows = filtered(groups, loop.threshold_value)
    return rows, stats


def critique_and_revise(session: SamplingSession, groups: list[Group], rules: list[str]) -> list[dict]:
    """Constitutional AI, supervised stage: for each sample, a critique and then a revision by the policy."""
    rng = random.Random(session.seed)
    chosen = [(g, c, rng.choice(rules)) for g in groups for c in g.completions]
    first = [
        [
            {"role": "user", "content": prompt_text(g.prompt)},
            {"role": "assistant", "content": c},
            {"role": "user", "content": CRITIQUE.format(principle=p)},
        ]
        for g, c, p in chosen
    ]
    max_new_tokens = session.config.online.max_new_tokens
    critiques = session.chat(first, max_new_tokens, "critiques")
    second = [
        [*conv, {"role": "assistant", "content": critique}, {"role": "user", "content": REVISE}]
        for conv, critique in zip(first, critiques)
    ]
    revisions = session.chat(second, max_new_tokens, "revisions")
    return [
        {"prompt": g.prompt, "completion": r, "original": c, "critique": k, "principle": p}
        for (g, c, p), k, r in zip(chosen, critiques, revisions)
        if r.strip()
    ]


def sample_round(config: Config, kind: LoopKind, policy: str, k: int, rdir: Path) -> None:
    """Sample from `policy` into generations.jsonl, label, and write samples.jsonl, data.jsonl and stats.json
    for round k. The generations are on disk before labelling starts, so a round whose labeller fails is
    labelled again from them on --resume, not sampled again (both ways label the same rows)."""
    state = PartialState()
    # Each round samples the next window of prompts, with its own seed.
    seed = config.train.seed * 1009 + (k - 1) * 31
    session = SamplingSession(config, policy, window=k - 1, seed=seed, label=f"round {k}: sampling")
    drawn = rdir / "generations.jsonl"
    if not drawn.is_file():
        generations = session.gather([dataclasses.asdict(g) for g in session.sample()])
        if state.is_main_process:
            write_jsonl(drawn, generations)
        state.wait_for_everyone()
    groups = [Group(**g) for g in session.own_share(read_jsonl(drawn))]
    kept = f"the samples are kept in {drawn}; fix the cause and rerun with --resume to label them again"
    try:
        rows, stats = kind.label(session, groups)
    except UserError as exc:
        raise UserError(f"round {k}: labelling failed: {exc}; {kept}") from None
    except Exception:
        print(f"round {k}: labelling failed (traceback below); {kept}", file=sys.stderr, flush=True)
        raise
    samples, rows = session.gather([dataclasses.asdict(g) for g in groups]), session.gather(rows)
    del session
    if state.is_main_process:
        write_jsonl(rdir / "data.jsonl", rows)
        write_text_atomic(rdir / "stats.json", json.dumps(stats))
        write_jsonl(rdir / "samples.jsonl", samples)  # written last: its presence means the step is complete
    state.wait_for_everyone()


def run_loop(config: Config) -> Path:
    """Run (or resume) the loop; returns the run directory. Each round's training run is a normal prospect
    run with its own held-out evaluation."""
    spec = get_loss(config.loss_name)
    if spec.loop != "offline" or spec.model != "policy":
        raise UserError(
            f"loss '{spec.name}' cannot be trained in rounds; use an offline policy loss (kto, dpo, sft, ...)"
        )
    kind = LOOP_KINDS[config.loop.kind](config, spec)
    run = RunDir(config)
    if config.loop.judge == "none" and kind.labels_with_reward:
        check_reward(config.online)
    # Bad model paths and bad prompt files fail here, before the run directory exists.
    resolve_model_source(config.model)
    read_prompts(config.data, config.train.seed, evaluates(config.eval))
    state = PartialState()
    if state.is_main_process:
        run.create()  # a run being overwritten is set aside until round 1 has its samples labelled
    state.wait_for_everyone()
    try:
        run_rounds(config, kind, run)
    except BaseException:
        # Failing before round 1's samples are on disk leaves nothing (and puts back the overwritten run);
        # a loop with samples is kept for --resume.
        if state.is_main_process and not (run.path / "round-01" / "generations.jsonl").is_file():
            run.abandon()
        raise
    return run.path


def run_rounds(config: Config, kind: LoopKind, run: RunDir) -> None:
    """Each round not marked DONE: sample and label it (unless its samples.jsonl is there), then train."""
    from prospect.engine.factory import make_trainer

    loop, state = config.loop, PartialState()
    base = policy = config.model.name
    history = read_jsonl(run.path / "rounds.jsonl") if (run.path / "rounds.jsonl").is_file() else []
    for k in range(1, loop.rounds + 1):
        rdir = run.path / f"round-{k:02d}"
        if (rdir / "DONE").is_file():
            policy = (rdir / "DONE").read_text().strip()
            continue
        started = time.perf_counter()
        rdir.mkdir(parents=True, exist_ok=True)
        if not (rdir / "samples.jsonl").is_file():
            sample_round(config, kind, policy, k, rdir)
        if state.is_main_process and run.set_aside:  # the overwritten run goes once a round is labelled
            run.settle()
        groups = [Group(**g) for g in read_jsonl(rdir / "samples.jsonl")]
        start_model = kind.start_model(base, policy)
        for i, step in enumerate(kind.steps(rdir)):
            if step.keep_above is not None and not step.data_file.is_file() and state.is_main_process:
                write_jsonl(step.data_file, filtered(groups, step.keep_above))
            state.wait_for_everyone()
            rows = read_jsonl(step.data_file)
            if not rows:
                raise UserError(
                    f"{step.data_file}: round {k} produced no training data; lower the threshold or sample more"
                )
            out = rdir / step.name
            step_config = nested_run(
                config,
                step.data_file,
                out,
                reference_model=base if loop.reference == "base" and start_model != base else None,
            )
            make_trainer(
                dataclasses.replace(
                    step_config,
                    model=dataclasses.replace(config.model, name=start_model),
                    # Only the loop's first training run evaluates before training: later ones would repeat
                    # the evaluation the previous run ended with.
                    eval=dataclasses.replace(config.eval, before=k == 1 and i == 0),
                )
            ).train()
            start_model = str(out / "final")
        policy = start_model
        if state.is_main_process:
            history.append(round_record(k, policy, len(rows), rdir, time.perf_counter() - started))
            write_jsonl(run.path / "rounds.jsonl", history)
            write_text_atomic(rdir / "DONE", policy)
        state.wait_for_everyone()


def round_record(k: int, policy: str, rows: int, rdir: Path, seconds: float) -> dict:
    record = {"round": k, "policy": policy, "training_rows": rows, "seconds": round(seconds, 1)}
    record.update(json.loads((rdir / "stats.json").read_text()))
    after = Path(policy).parent / "eval_after.json"
    if after.is_file():
        result = json.loads(after.read_text())
        record.update({"judge_after": result["judge_mean"], "kl_after": result["kl_mean"]})
    shown = ", ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in record.items()
    )
    print(f"round {k} done: {shown}", flush=True)
    return record

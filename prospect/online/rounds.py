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
is marked DONE, so a killed loop resumes at the round it was in (and inside that round's training run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import time
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import gather_object

from prospect.config import Config, ModelConfig
from prospect.data.pipeline import encode_all, read_training
from prospect.data.tokenize import Encoder
from prospect.engine.rundir import RunDir
from prospect.engine.trainer import bf16_supported
from prospect.errors import UserError
from prospect.losses.base import get_loss
from prospect.models.loading import load_model, resolve_model_source
from prospect.models.sampling import HFSampler, SamplingParams
from prospect.online.labellers import (
    Group,
    HTTPJudge,
    JudgeLabeller,
    LocalJudge,
    balance_labels,
    binary_labels,
    filtered,
    prompt_text,
    select_pairs,
)
from prospect.online.rewards import check_reward, load_reward

CRITIQUE = (
    "Critique your previous response by this principle: {principle} Point out, in a few sentences, "
    "where it falls short."
)
REVISE = (
    "Now rewrite your original response so that it follows the principle. Reply with the new response only."
)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Round:
    """Sampling from one policy, on this process's share of a round's prompts."""

    def __init__(self, config: Config, model_source: str, round_index: int):
        self.cfg = config
        self.state = PartialState()
        model_cfg = dataclasses.replace(config.model, name=model_source, lora_r=0)
        self.model, self.tokenizer = load_model(model_cfg)
        self.model.to(self.state.device)
        t = config.train
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and bf16_supported(self.state.device))
        prompts = read_training(config.data, "prompts", t.seed)
        per_round = config.online.prompts or len(prompts)
        start = (round_index * per_round) % len(prompts)
        chosen = (prompts + prompts)[start : start + min(per_round, len(prompts))]
        encoder = Encoder(self.tokenizer, config.data.max_length, config.data.max_prompt_length)
        self.items = encode_all(chosen, encoder, prompts_only=True).items[
            self.state.process_index :: self.state.num_processes
        ]
        self.sampler = HFSampler(
            self.model, self.tokenizer, batch_size=config.eval.batch_size, bf16=self.bf16
        )
        self.seed = t.seed * 1009 + round_index * 31 + self.state.process_index

    def sample(self) -> list[Group]:
        o = self.cfg.online
        params = SamplingParams(
            max_new_tokens=o.max_new_tokens,
            temperature=o.temperature,
            top_p=o.top_p,
            top_k=o.top_k,
            n=o.samples_per_prompt,
            seed=self.seed,
        )
        out = self.sampler.generate([it.prompt_ids for it in self.items], params)
        return [
            Group(
                it.prompt,
                [self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples],
                [],
                it.fields,
            )
            for it, samples in zip(self.items, out)
        ]

    def chat(self, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
        prompts = [
            self.tokenizer(
                self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            )["input_ids"]
            for c in conversations
        ]
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.cfg.online.temperature,
            top_p=self.cfg.online.top_p,
            seed=self.seed + 7,
        )
        return [
            self.tokenizer.decode(s[0].token_ids, skip_special_tokens=True)
            for s in self.sampler.generate(prompts, params)
        ]

    def judge(self) -> JudgeLabeller:
        loop = self.cfg.loop
        if loop.judge == "self":
            complete = LocalJudge(self.model, self.tokenizer, bf16=self.bf16)
        elif loop.judge == "http":
            if not (loop.judge_url and loop.judge_model):
                raise UserError("loop.judge=http needs loop.judge_url and loop.judge_model")
            complete = HTTPJudge(loop.judge_url, loop.judge_model, loop.judge_key_env)
        else:
            model, tokenizer = load_model(ModelConfig(name=loop.judge))
            complete = LocalJudge(model.to(self.state.device), tokenizer, bf16=self.bf16)
        return JudgeLabeller(complete, cot=loop.judge_cot)

    def gather(self, rows: list[dict]) -> list[dict]:
        return gather_object(rows) if self.state.num_processes > 1 else rows


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


def score(groups: list[Group], config: Config, device, bf16: bool) -> None:
    reward = load_reward(config.online, device, bf16)
    flat = [(g, c) for g in groups for c in g.completions]
    values = (
        reward([g.prompt for g, _ in flat], [c for _, c in flat], [g.fields for g, _ in flat]) if flat else []
    )
    offset = 0
    for group in groups:
        group.scores = values[offset : offset + len(group.completions)]
        offset += len(group.completions)


def label(
    rnd: Round, groups: list[Group], needs: str, threshold: float | None = None
) -> tuple[list[dict], dict]:
    """Training rows in the shape the loss needs, and numbers about them."""
    loop, o = rnd.cfg.loop, rnd.cfg.online
    rng = random.Random(rnd.seed)
    stats: dict = {}
    if loop.judge != "none" and needs == "paired" and loop.judge_mode == "compare":
        judge = rnd.judge()
        rows = judge.judged_pairs(groups, rng)
        stats.update(judge.report())
        return rows, stats
    if loop.judge != "none":
        judge = rnd.judge()
        flat = [(g, c) for g in groups for c in g.completions]
        ratings = judge.rate([g.prompt for g, _ in flat], [c for _, c in flat])
        stats.update(judge.report())
        offset = 0
        for group in groups:
            values = ratings[offset : offset + len(group.completions)]
            offset += len(group.completions)
            keep = [i for i, v in enumerate(values) if v is not None]
            group.completions = [group.completions[i] for i in keep]
            group.scores = [values[i] for i in keep]
    elif o.reward_model or o.reward_function:
        score(groups, rnd.cfg, rnd.state.device, rnd.bf16)
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
        rows = filtered(groups, loop.threshold_value if threshold is None else threshold)
    return rows, stats


def critique_and_revise(rnd: Round, groups: list[Group], rules: list[str]) -> list[dict]:
    """Constitutional AI, supervised stage: for each sample, a critique and then a revision by the policy."""
    rng = random.Random(rnd.seed)
    chosen = [(g, c, rng.choice(rules)) for g in groups for c in g.completions]
    first = [
        [
            {"role": "user", "content": prompt_text(g.prompt)},
            {"role": "assistant", "content": c},
            {"role": "user", "content": CRITIQUE.format(principle=p)},
        ]
        for g, c, p in chosen
    ]
    critiques = rnd.chat(first, rnd.cfg.online.max_new_tokens)
    second = [
        [*conv, {"role": "assistant", "content": critique}, {"role": "user", "content": REVISE}]
        for conv, critique in zip(first, critiques)
    ]
    revisions = rnd.chat(second, rnd.cfg.online.max_new_tokens)
    return [
        {"prompt": g.prompt, "completion": r, "original": c, "critique": k, "principle": p}
        for (g, c, p), k, r in zip(chosen, critiques, revisions)
        if r.strip()
    ]


def sample_round(config: Config, policy: str, k: int, rdir: Path, needs: str, rules: list[str]) -> None:
    """Sample from `policy`, label, and write samples.jsonl, data.jsonl and stats.json for round k."""
    state = PartialState()
    rnd = Round(config, policy, k - 1)
    groups = rnd.sample()
    if config.loop.kind == "constitutional":
        rows, stats = critique_and_revise(rnd, groups, rules), {}
    elif config.loop.kind == "rest":
        rows, stats = [], {}  # the Improve steps filter the scored samples at each threshold
        score(groups, config, rnd.state.device, rnd.bf16)
    else:
        rows, stats = label(rnd, groups, needs)
    samples, rows = rnd.gather([dataclasses.asdict(g) for g in groups]), rnd.gather(rows)
    del rnd
    if state.is_main_process:
        write_jsonl(rdir / "data.jsonl", rows)
        (rdir / "stats.json").write_text(json.dumps(stats))
        write_jsonl(rdir / "samples.jsonl", samples)  # written last: its presence means the step is complete
    state.wait_for_everyone()


def run_loop(config: Config) -> Path:
    """Run (or resume) the loop; returns the run directory. Each round's training run is a normal prospect
    run with its own held-out evaluation."""
    from prospect.engine.factory import make_trainer

    spec = get_loss(config.loss_name)
    if spec.loop != "offline" or spec.model != "policy":
        raise UserError(
            f"loss '{spec.name}' cannot be trained in rounds; use an offline policy loss (kto, dpo, sft, ...)"
        )
    loop = config.loop
    if loop.rounds < 1:
        raise UserError(f"loop.rounds={loop.rounds}: expected at least 1")
    if loop.kind in ("rest", "rest_em", "constitutional") and spec.data != "completions":
        raise UserError(
            f"loop.kind={loop.kind} fine-tunes on kept samples; use loss.name=sft, not {spec.name}"
        )
    rules = principles(config) if loop.kind == "constitutional" else []
    try:
        thresholds = [float(x) for x in loop.improve_thresholds.split(",")] if loop.kind == "rest" else [None]
    except ValueError:
        raise UserError(
            f"loop.improve_thresholds={loop.improve_thresholds!r}: expected numbers, comma separated"
        ) from None
    run = RunDir(config)
    if loop.judge == "none" and loop.kind != "constitutional":
        check_reward(config.online)
    # Bad model paths and bad prompt files fail here, before the run directory exists.
    resolve_model_source(config.model)
    read_training(config.data, "prompts", config.train.seed)
    state = PartialState()
    if state.is_main_process:
        run.create()
    state.wait_for_everyone()
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
            sample_round(config, policy, k, rdir, spec.data, rules)
        groups = [Group(**g) for g in read_jsonl(rdir / "samples.jsonl")]
        start_model = base if loop.kind == "rest_em" else policy
        for step, threshold in enumerate(thresholds, start=1):
            name = f"improve-{step}" if loop.kind == "rest" else "train"
            data_file = rdir / f"{name}.jsonl" if loop.kind == "rest" else rdir / "data.jsonl"
            if loop.kind == "rest" and not data_file.is_file() and state.is_main_process:
                write_jsonl(data_file, filtered(groups, threshold))
            state.wait_for_everyone()
            rows = read_jsonl(data_file)
            if not rows:
                raise UserError(
                    f"{data_file}: round {k} produced no training data; lower the threshold or sample more"
                )
            out = rdir / name
            train_cfg = dataclasses.replace(
                config.train,
                output_dir=str(out),
                resume=(out / "prospect-run.json").is_file(),
                overwrite=False,
                reference_model=base if loop.reference == "base" and start_model != base else None,
            )
            data_cfg = dataclasses.replace(
                config.data,
                train=str(data_file),
                train_split="train",
                format="auto",
                eval=config.data.eval or config.data.train,
                limit=0,
            )
            eval_cfg = dataclasses.replace(config.eval, before=k == 1 and step == 1)
            model_cfg = dataclasses.replace(config.model, name=start_model)
            make_trainer(
                dataclasses.replace(config, model=model_cfg, data=data_cfg, train=train_cfg, eval=eval_cfg)
            ).train()
            start_model = str(out / "final")
        policy = start_model
        if state.is_main_process:
            history.append(round_record(k, policy, len(rows), rdir, time.perf_counter() - started))
            write_jsonl(run.path / "rounds.jsonl", history)
            (rdir / "DONE").write_text(policy)
        state.wait_for_everyone()
    return run.path


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

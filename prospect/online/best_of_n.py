"""Best-of-N / rejection sampling (Llama 2): sample N completions per prompt, score them with a reward model or
function, keep the best one (or all above a threshold), and fine-tune on what was kept with the recipe's
loss (SFT by default), on the same engine.

    run_dir/samples.jsonl   every sample with its score
    run_dir/kept.jsonl      the kept ones, as {prompt, completion, score}: the fine-tuning data
    run_dir/sft/            the fine-tuning run (a normal prospect run directory)
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from accelerate import PartialState

from prospect.config import Config
from prospect.engine.rundir import RunDir
from prospect.errors import UserError
from prospect.io import write_jsonl
from prospect.online.session import SamplingSession, nested_run
from prospect.rewards import check_reward


@dataclasses.dataclass
class Scored:
    prompt: object
    completion: str
    score: float


def sample_and_score(config: Config, model_source: str | None = None) -> list[list[Scored]]:
    """N scored samples for each training prompt (online.prompts of them), sharded over processes."""
    label = f"best-of-{config.online.samples_per_prompt}: sampling"
    session = SamplingSession(config, model_source or config.model.name, 0, config.train.seed, label)
    groups = session.sample()
    session.release()  # the policy leaves memory before the reward model loads
    session.score(groups)
    scored = [[Scored(g.prompt, c, s) for c, s in zip(g.completions, g.scores)] for g in groups]
    return session.gather(scored)


def keep(groups: list[list[Scored]], mode: str, threshold: float) -> list[Scored]:
    if mode == "best":
        return [max(group, key=lambda s: s.score) for group in groups if group]
    return [s for group in groups for s in group if s.score > threshold]


def best_of_n(config: Config, train: bool = True) -> Path:
    """Sample, score, keep, and (with `train`) fine-tune on the kept samples. Returns the run directory."""
    run = RunDir(config)
    check_reward(config.online)
    state = PartialState()
    samples_file, kept_file = run.path / "samples.jsonl", run.path / "kept.jsonl"
    if not (run.resuming and kept_file.is_file()):
        groups = sample_and_score(config)
        kept = keep(groups, config.online.keep, config.online.keep_threshold)
        if not kept:
            raise UserError(
                f"best-of-N kept no samples (online.keep={config.online.keep}, "
                f"keep_threshold={config.online.keep_threshold})"
            )
        if state.is_main_process:
            run.create()
            write_jsonl(samples_file, [dataclasses.asdict(s) for group in groups for s in group])
            write_jsonl(kept_file, [dataclasses.asdict(s) for s in kept])
            run.settle()  # the new run has its data on disk: only now does the run it replaces go
            every = [s.score for group in groups for s in group]
            print(
                f"best-of-{config.online.samples_per_prompt}: {len(groups)} prompts, mean score "
                f"{statistics.fmean(every):+.3f}, kept {len(kept)} with mean {statistics.fmean(s.score for s in kept):+.3f}"
                f" -> {kept_file}",
                flush=True,
            )
        state.wait_for_everyone()
    if train:
        from prospect.engine.factory import make_trainer

        sft_dir = run.path / "sft"
        # A resumed run resumes its fine-tuning too, if that had started.
        sft = nested_run(
            config,
            kept_file,
            sft_dir,
            data_format="completions",
            resume=run.resuming and sft_dir.exists(),
        )
        make_trainer(sft).train()
    return run.path

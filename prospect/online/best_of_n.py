"""Best-of-N / rejection sampling (Llama 2): sample N completions per prompt, score them with a reward model or
function, keep the best one (or all above a threshold), and fine-tune on what was kept with the recipe's
loss (SFT by default), on the same engine.

    run_dir/samples.jsonl   every sample with its score
    run_dir/kept.jsonl      the kept ones, as {prompt, completion, score}: the fine-tuning data
    run_dir/sft/            the fine-tuning run (a normal prospect run directory)
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import gather_object

from prospect.config import Config
from prospect.data.pipeline import encode_all, read_training
from prospect.data.tokenize import Encoder
from prospect.engine.rundir import RunDir
from prospect.engine.trainer import bf16_supported
from prospect.errors import UserError
from prospect.models.loading import load_model
from prospect.models.sampling import HFSampler, SamplingParams
from prospect.online.rewards import check_reward, load_reward


@dataclasses.dataclass
class Scored:
    prompt: object
    completion: str
    score: float


def sample_and_score(config: Config, model_source: str | None = None) -> list[list[Scored]]:
    """N scored samples for each training prompt (online.prompts of them), sharded over processes."""
    state = PartialState()
    cfg = dataclasses.replace(config.model, name=model_source) if model_source else config.model
    model, tokenizer = load_model(cfg)
    model.to(state.device)
    bf16 = config.train.precision == "bf16" or (
        config.train.precision == "auto" and bf16_supported(state.device)
    )
    prompts = read_training(config.data, "prompts", config.train.seed)
    if config.online.prompts:
        prompts = prompts[: config.online.prompts]
    encoder = Encoder(tokenizer, config.data.max_length, config.data.max_prompt_length)
    items = encode_all(prompts, encoder, prompts_only=True).items
    mine = items[state.process_index :: state.num_processes]
    o = config.online
    params = SamplingParams(
        max_new_tokens=o.max_new_tokens,
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k,
        n=o.samples_per_prompt,
        seed=config.train.seed + state.process_index,
    )
    samples = HFSampler(model, tokenizer, batch_size=config.eval.batch_size, bf16=bf16).generate(
        [it.prompt_ids for it in mine], params
    )
    del model
    reward = load_reward(o, state.device, bf16)
    texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for group in samples for s in group]
    flat = [it for it, group in zip(mine, samples) for _ in group]
    flat_prompts = [it.prompt for it in flat]
    scores = reward(flat_prompts, texts, [it.fields for it in flat]) if texts else []
    n = o.samples_per_prompt
    groups = [
        [Scored(p, t, s) for p, t, s in zip(flat_prompts[i : i + n], texts[i : i + n], scores[i : i + n])]
        for i in range(0, len(texts), n)
    ]
    return gather_object(groups) if state.num_processes > 1 else groups


def keep(groups: list[list[Scored]], mode: str, threshold: float) -> list[Scored]:
    if mode == "best":
        return [max(group, key=lambda s: s.score) for group in groups if group]
    return [s for group in groups for s in group if s.score > threshold]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


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
            write_jsonl(
                samples_file,
                [
                    {"prompt": s.prompt, "completion": s.completion, "score": s.score}
                    for group in groups
                    for s in group
                ],
            )
            write_jsonl(
                kept_file, [{"prompt": s.prompt, "completion": s.completion, "score": s.score} for s in kept]
            )
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

        data = dataclasses.replace(
            config.data,
            train=str(kept_file),
            train_split="train",
            format="completions",
            eval=config.data.eval or config.data.train,
            limit=0,
        )
        sft_train = dataclasses.replace(
            config.train,
            output_dir=str(run.path / "sft"),
            resume=run.resuming and (run.path / "sft").exists(),
            overwrite=False,
        )
        make_trainer(dataclasses.replace(config, data=data, train=sft_train)).train()
    return run.path

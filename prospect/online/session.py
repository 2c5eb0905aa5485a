"""What the outer online loops share: a policy loaded for sampling on this process's share of the prompts
(`SamplingSession`), and the config of the ordinary training run nested in a loop (`nested_run`)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from prospect.config import Config
from prospect.data.pipeline import encode_prompts, read_prompts
from prospect.data.splits import evaluates, evaluation_subset, same_evaluation
from prospect.data.tokenize import Encoder
from prospect.engine.rundir import MARKER
from prospect.evaluation.ai_judges import chat_prompt_ids
from prospect.models.loading import load_model
from prospect.models.precision import use_bf16
from prospect.models.sampling import HFSampler, Sample, SamplingParams, rollout_params
from prospect.online.labellers import Group
from prospect.progress import Progress
from prospect.rewards import load_reward

log = logging.getLogger(__name__)

Row = TypeVar("Row")


class SamplingSession:
    """One policy, loaded for sampling, and this process's share of a window of the training prompts.

    Window `w` holds the `online.prompts` prompts from `w * online.prompts` on, wrapping around the end
    (every prompt when online.prompts is 0): online rounds move one window per round, best-of-N takes the
    first. `seed` is the process's sampling seed, before the process index is added to it."""

    def __init__(
        self, config: Config, model_source: str, window: int, seed: int, label: str = "sampling"
    ) -> None:
        self.config, self.label = config, label  # label: what the progress of `sample` is called
        self.state = PartialState()
        self.model, self.tokenizer = load_model(dataclasses.replace(config.model, name=model_source))
        self.model.to(self.state.device)
        self.bf16 = use_bf16(config.train.precision, self.state.device)
        prompts = read_prompts(config.data, config.train.seed, evaluates(config.eval))
        per_window = config.online.prompts or len(prompts)
        start = (window * per_window) % len(prompts)
        chosen = (prompts + prompts)[start : start + min(per_window, len(prompts))]
        encoder = Encoder(self.tokenizer, config.data.max_length, config.data.max_prompt_length)
        self.items = encode_prompts(chosen, encoder)[self.state.process_index :: self.state.num_processes]
        self.sampler = HFSampler(
            self.model,
            self.tokenizer,
            batch_size=config.online.batch_size,
            bf16=self.bf16,
            decoder=config.online.sampler,
        )
        self.seed = seed + self.state.process_index

    @property
    def device(self) -> torch.device:
        return self.state.device

    def progress(self, desc: str, total: int) -> Progress:
        return Progress(desc, total, "samples", show=self.state.is_main_process)

    def sample(self) -> list[Group]:
        """`online.samples_per_prompt` completions of each of this process's prompts, not yet scored."""
        params = rollout_params(self.config.online, self.seed)
        with self.progress(self.label, len(self.items) * params.n) as progress:
            out = self.sampler.generate([it.prompt_ids for it in self.items], params, progress)
        # A sample that stops at once is empty text, which no training row may hold: it is left out.
        groups = [
            Group(it.prompt, [c for c in completions if c.strip()], [], it.fields)
            for it, completions in zip(self.items, self.decode(out))
        ]
        empty = len(self.items) * params.n - sum(len(g.completions) for g in groups)
        if empty and self.state.is_main_process:
            log.warning(f"{self.label}: {empty} empty samples (a stop token first) left out")
        return groups

    def chat(self, conversations: list[list[dict]], max_new_tokens: int, what: str = "replies") -> list[str]:
        """One reply by the policy to each conversation, through its chat template."""
        o = self.config.online
        # Its own seed, so replies never repeat the random stream the round's samples were drawn with.
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=o.temperature, top_p=o.top_p, seed=self.seed + 7
        )
        with self.progress(what, len(conversations)) as progress:
            out = self.sampler.generate(chat_prompt_ids(self.tokenizer, conversations), params, progress)
        return [replies[0] for replies in self.decode(out)]

    def decode(self, samples: list[list[Sample]]) -> list[list[str]]:
        # One list of ids decodes to one string (transformers types the batched case too).
        return [
            [cast(str, self.tokenizer.decode(s.token_ids, skip_special_tokens=True)) for s in group]
            for group in samples
        ]

    def release(self) -> None:
        """Free the policy (before a reward model loads); scoring and gathering still work."""
        del self.model, self.sampler

    def score(self, groups: list[Group]) -> None:
        """Fill each group's scores with the reward model's or function's (online.reward_*)."""
        reward = load_reward(self.config.online, self.device, self.bf16)
        flat = [(g, c) for g in groups for c in g.completions]
        values = (
            reward([g.prompt for g, _ in flat], [c for _, c in flat], [g.fields for g, _ in flat])
            if flat
            else []
        )
        offset = 0
        for group in groups:
            group.scores = values[offset : offset + len(group.completions)]
            offset += len(group.completions)

    def gather(self, rows: list[Row]) -> list[Row]:
        """Every process's rows, in process order, on every process."""
        return gather_object(rows) if self.state.num_processes > 1 else rows

    def own_share(self, rows: list[Row]) -> list[Row]:
        """This process's rows of what `gather` returned: one row for each of the window's prompts."""
        n, i = self.state.num_processes, self.state.process_index
        sizes = [len(range(j, len(rows), n)) for j in range(n)]  # prompts are dealt out round-robin
        return rows[sum(sizes[:i]) : sum(sizes[: i + 1])]


def nested_run(
    config: Config, data_file: Path, output_dir: Path, data_format: str = "auto", **train_overrides: Any
) -> Config:
    """The config of the ordinary training run nested in an online run: it trains on `data_file`, evaluates on
    the outer run's held-out data (or its prompts), writes to `output_dir`, and resumes there if a run was
    started (its marker exists) unless `train_overrides` say otherwise."""
    held_out, held_out_split = same_evaluation(config.data)
    data = dataclasses.replace(
        config.data,
        train=str(data_file),
        subset=None,
        format=data_format,
        eval=held_out,
        eval_split=held_out_split,
        eval_subset=evaluation_subset(config.data),
        limit=0,
    )
    train_values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "resume": (output_dir / MARKER).is_file(),
        "overwrite": False,
        **train_overrides,
    }
    return dataclasses.replace(config, data=data, train=dataclasses.replace(config.train, **train_values))

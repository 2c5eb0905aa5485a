"""The sampling layer every online method uses: batched generation with left padding and a KV cache,
temperature / top-p / top-k, several samples per prompt, stopping at EOS or the chat template's
end-of-turn token, seeded. prospect's lean decoding loop by default (models/decoding.py), transformers'
`generate` on request; vLLM behind the same interface where it is installed (GPU users).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from prospect.config import OnlineConfig
from prospect.errors import UserError
from prospect.models.decoding import Mixture, decode, left_padded
from prospect.progress import Progress


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    n: int = 1  # samples per prompt
    seed: int = 0
    stop_token_ids: list[int] = field(default_factory=list)  # besides EOS and the end-of-turn token


def rollout_params(online: OnlineConfig, seed: int) -> SamplingParams:
    """The sampling settings of the `online` section (rollouts, best-of-N, online rounds)."""
    return SamplingParams(
        max_new_tokens=online.max_new_tokens,
        temperature=online.temperature,
        top_p=online.top_p,
        top_k=online.top_k,
        n=online.samples_per_prompt,
        seed=seed,
    )


@dataclass
class Sample:
    token_ids: list[int]  # the completion, ending with its stop token when it stopped by itself
    finished: bool  # stopped at a stop token (rather than at max_new_tokens)


def stop_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS and the token that ends an assistant turn in the tokenizer's chat template (<|im_end|>,
    <|eot_id|>, <end_of_turn>, ...), found by rendering a one-message conversation."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        marker = "prospect-end-of-turn-probe"
        with contextlib.suppress(Exception):
            # With tokenize=False the template returns the rendered text (transformers types every return kind).
            text = cast(
                str,
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                    tokenize=False,
                ),
            )
            after = tokenizer(text[text.rindex(marker) + len(marker) :], add_special_tokens=False)[
                "input_ids"
            ]
            special = set(
                tokenizer.all_special_ids
            ) | {  # and the vocabulary's special tokens (Gemma's turns)
                i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special
            }
            ids += [t for t in after[:2] if t in special][:1]
    return list(dict.fromkeys(ids))


class TokenTicker(StoppingCriteria):
    """Reports each generated token to a Progress as its share of the batch's samples; never stops one."""

    def __init__(self, progress: Progress, samples: int, max_new_tokens: int):
        self.progress, self.samples = progress, samples
        self.per_token, self.reported = samples / max_new_tokens, 0.0

    def tick(self) -> None:
        share = min(self.per_token, self.samples - self.reported)
        self.progress.update(share)
        self.reported += share

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.tick()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def finish(self) -> None:
        """The batch is done (its samples may all have stopped early): report the rest of it."""
        self.progress.update(self.samples - self.reported)


DECODERS = ("prospect", "hf")  # online.sampler's choices that run in-process


class HFSampler:
    """Batched sampling with left padding on a transformers model, by one of two decoders: transformers'
    `generate`, or prospect's lean loop (models/decoding.py: each prompt prefilled once for its n samples,
    stopped rows leave the batch). Sampling runs on a forked RNG so it never shifts the training run's
    random stream."""

    def __init__(
        self,
        model: nn.Module,  # a causal LM (transformers', or PEFT's around one): it has `generate`
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 32,  # sequences decoded at once
        bf16: bool = False,
        decoder: str = "prospect",
    ):
        if decoder not in DECODERS:
            raise UserError(f"online.sampler: expected one of {', '.join(DECODERS)}, got {decoder!r}")
        self.model, self.tokenizer, self.batch_size, self.bf16 = model, tokenizer, batch_size, bf16
        self.decoder = decoder

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        progress: Progress | None = None,
        mixture: Mixture | None = None,
    ) -> list[list[Sample]]:
        """`params.n` samples for each prompt, in prompt order; `progress` counts samples, token by token. With
        a `mixture`, from the geometric mixture of the model and a reference (prospect's decoder only)."""
        if mixture is not None and self.decoder != "prospect":
            raise UserError(f"online.sampler={self.decoder}: mixture sampling (Nash-MD) needs 'prospect'")
        stops = list(dict.fromkeys(stop_tokens(self.tokenizer) + params.stop_token_ids))
        device = next(self.model.parameters()).device
        # The lean loop decodes a prompt's n samples together from one prefill; generate takes the copies.
        lean = self.decoder == "prospect"
        units = prompts if lean else [p for p in prompts for _ in range(params.n)]
        per_batch = max(1, self.batch_size // params.n) if lean else self.batch_size
        samples: list[Sample] = []
        was_training = self.model.training
        self.model.eval()
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        )
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
            torch.manual_seed(params.seed)
            for start in range(0, len(units), per_batch):
                chunk = units[start : start + per_batch]
                sequences = len(chunk) * (params.n if lean else 1)
                ticker = TokenTicker(progress, sequences, params.max_new_tokens) if progress else None
                if lean:
                    on_step = (lambda rows, t=ticker: t.tick()) if ticker else None
                    done = decode(
                        self.model, chunk, params.n, params.max_new_tokens, stops, self.tokenizer.pad_token_id,
                        params.temperature, params.top_k, params.top_p, on_step, mixture,
                    )  # fmt: skip
                    samples += [Sample(*d) for d in done]
                else:
                    samples += self.transformers_generate(chunk, params, stops, ticker)
                if ticker:
                    ticker.finish()
        self.model.train(was_training)
        return [samples[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def transformers_generate(
        self, chunk: list[list[int]], params: SamplingParams, stops: list[int], ticker: TokenTicker | None
    ) -> list[Sample]:
        device = next(self.model.parameters()).device
        input_ids, attention = left_padded(chunk, self.tokenizer.pad_token_id)
        sampling = params.temperature > 0
        # transformers' GenerationMixin: invisible to nn.Module's types (`__getattr__`).
        output = self.model.generate(  # type: ignore[operator]
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=params.max_new_tokens,
            do_sample=sampling,
            temperature=params.temperature if sampling else None,
            top_p=params.top_p if sampling else None,
            top_k=params.top_k if sampling else None,
            eos_token_id=stops,
            pad_token_id=self.tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([ticker] if ticker else []),
        )
        samples = []
        for row in output[:, input_ids.shape[1] :].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            samples.append(Sample(row[: end + 1], True) if end is not None else Sample(row, False))
        return samples


class VLLMSampler:
    """The same interface on vLLM, for GPU users who have it installed. It loads the model from a directory
    (a run's checkpoint), so online loops create one per round after saving the policy."""

    def __init__(self, model_dir: str, tokenizer: PreTrainedTokenizerBase, **engine_args):
        try:
            from vllm import LLM
        except ImportError:
            raise UserError(
                "sampling backend 'vllm' needs vLLM installed (pip install vllm, on a GPU machine)"
            ) from None
        self.tokenizer = tokenizer
        self.llm = LLM(model=model_dir, **engine_args)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, progress: Progress | None = None
    ) -> list[list[Sample]]:
        from vllm import SamplingParams as VllmParams
        from vllm.inputs import TokensPrompt

        stops = list(dict.fromkeys(stop_tokens(self.tokenizer) + params.stop_token_ids))
        vllm_params = VllmParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            stop_token_ids=stops,
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], vllm_params, use_tqdm=False
        )
        if progress:
            progress.update(len(prompts) * params.n)
        return [
            [Sample(list(c.token_ids), c.finish_reason == "stop") for c in out.outputs] for out in outputs
        ]

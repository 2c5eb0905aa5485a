"""Tokens/s of prospect's sampling layer (HFSampler) on the embedded SmolLM2-135M-Instruct.

    python benchmarks/sampling.py [--prompts 64] [--max-new-tokens 48]

Generated tokens (stop tokens included, padding after a stop excluded) per second of wall time, for several
batch sizes, in bf16 autocast and fp32, sampling at temperature 1 from held-out VADER prompts.
"""

from __future__ import annotations

import argparse
import time

import torch

from prospect.config import DataConfig, ModelConfig
from prospect.data.pipeline import encode_all, read_training
from prospect.data.tokenize import Encoder
from prospect.models.loading import load_model
from prospect.models.sampling import HFSampler, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    args = parser.parse_args()
    model, tokenizer = load_model(ModelConfig(name="smollm2"))
    examples = read_training(DataConfig(train="vader-movies", train_split="test"), "prompts", 0)[
        : args.prompts
    ]
    prompts = [
        it.prompt_ids for it in encode_all(examples, Encoder(tokenizer, 256, 128), prompts_only=True).items
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(prompts)} prompts, "
        f"max_new_tokens {args.max_new_tokens}"
    )
    print(f"{'precision':>9} {'batch':>5} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for bf16 in (True, False):
        for batch_size in map(int, args.batch_sizes.split(",")):
            sampler = HFSampler(model, tokenizer, batch_size=batch_size, bf16=bf16)
            count = prompts[: max(batch_size, min(len(prompts), 4 * batch_size))]
            sampler.generate(count[:batch_size], SamplingParams(max_new_tokens=4))  # warm-up
            started = time.perf_counter()
            out = sampler.generate(count, SamplingParams(max_new_tokens=args.max_new_tokens, seed=1))
            seconds = time.perf_counter() - started
            tokens = sum(len(s.token_ids) for group in out for s in group)
            print(
                f"{'bf16' if bf16 else 'fp32':>9} {batch_size:>5} {tokens:>7} {seconds:>8.1f} {tokens / seconds:>9.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

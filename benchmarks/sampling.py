"""Generated tokens/s of prospect's sampling layer on the embedded SmolLM2-135M-Instruct: transformers'
`generate` ('hf') against prospect's lean decoding loop (shared prompt prefixes, stopped rows leave the batch).

    python benchmarks/sampling.py [--prompts 32] [--max-new-tokens 48] [--batch-sizes 8,32] [--samples 1,4,8]

Generated tokens (stop tokens included, padding after a stop excluded) per second of wall time, sampling at
temperature 1 from held-out VADER prompts, in bf16 autocast (fp32 with --fp32). Each configuration runs
both decoders back to back with the same prompts, so a busy machine slows both alike; the 1-minute load
average is printed with each row.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from prospect.config import DataConfig, ModelConfig
from prospect.data.pipeline import encode_all, read_training
from prospect.data.tokenize import Encoder
from prospect.models.loading import load_model
from prospect.models.sampling import DECODERS, HFSampler, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts per configuration")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", default="8,32", help="sequences decoded at once")
    parser.add_argument("--samples", default="1,4,8", help="samples per prompt")
    parser.add_argument("--decoders", default=",".join(DECODERS))
    parser.add_argument("--fp32", action="store_true")
    args = parser.parse_args()
    model, tokenizer = load_model(ModelConfig(name="smollm2"))
    examples = read_training(DataConfig(train="vader-movies", train_split="test"), "prompts", 0)
    encoded = encode_all(examples[: args.prompts], Encoder(tokenizer, 256, 128), prompts_only=True)
    prompts = [item.prompt_ids for item in encoded.items]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(prompts)} prompts of "
        f"{sum(map(len, prompts)) / len(prompts):.0f} tokens on average, max_new_tokens {args.max_new_tokens}, "
        f"temperature 1, {'fp32' if args.fp32 else 'bf16 autocast'}"
    )
    print(f"{'decoder':>9} {'batch':>5} {'n':>3} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'load':>5}")
    for batch_size in map(int, args.batch_sizes.split(",")):
        for n in map(int, args.samples.split(",")):
            rates = {}
            for decoder in args.decoders.split(","):
                sampler = HFSampler(model, tokenizer, batch_size, bf16=not args.fp32, decoder=decoder)
                sampler.generate(prompts[:2], SamplingParams(max_new_tokens=4, n=n))  # warm-up
                load = os.getloadavg()[0]
                started = time.perf_counter()
                out = sampler.generate(
                    prompts, SamplingParams(max_new_tokens=args.max_new_tokens, n=n, seed=1)
                )
                seconds = time.perf_counter() - started
                tokens = sum(len(s.token_ids) for group in out for s in group)
                rates[decoder] = tokens / seconds
                print(
                    f"{decoder:>9} {batch_size:>5} {n:>3} {tokens:>7} {seconds:>8.1f} {tokens / seconds:>9.0f} "
                    f"{load:>5.2f}",
                    flush=True,
                )
            if len(rates) == 2:
                first, second = rates.values()
                print(f"{'':>9} {'':>5} {'':>3} ratio x{second / first:.2f}", flush=True)


if __name__ == "__main__":
    main()

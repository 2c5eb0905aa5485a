"""How prospect's training pass scales: with the tokens in a batch, and with the vocabulary size.

    python benchmarks/scaling.py tokens    # SmolLM2-135M: step time against real tokens, padded and packed
    python benchmarks/scaling.py vocab     # a small Llama: peak memory of one step against vocabulary size

`tokens`: batches of 8 sequences that all pad to the same 512-token width but hold from 1,024 to 4,096 real
tokens (all 4,096 real in the last). One policy forward and backward each (bf16 autocast, fp32 log-probs), timed over repeats. Padded
batches cost the same whatever they hold; packed rows cost in proportion to the tokens.

`vocab`: one forward and backward of 8 x 512 tokens through a 4-layer, 256-wide Llama whose vocabulary grows
from 32k to 256k. Each run is its own process; reported is the peak RSS of the step above the RSS just before
it (weights, gradients and Adam state already allocated), for prospect's chunked head and for plain full
logits (`model(...).logits.log_softmax(-1)`), which need [8, 512, vocab] fp32 tensors.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from prospect.data.batching import pad
from prospect.data.packing import pack
from prospect.models.scoring import TokenScorer

WIDTH, ROWS = 512, 8


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def lengths_for(total: int) -> list[int]:
    """8 lengths summing to about `total`, the first always WIDTH so every padded batch is 8 x WIDTH; the
    others alternate short and long (1 : 3), as feedback data does."""
    if total >= ROWS * WIDTH:
        return [WIDTH] * ROWS
    shares = [1, 3, 1, 3, 1, 3, 1]
    rest = [min(WIDTH, (total - WIDTH) * k // sum(shares)) for k in shares]
    return [WIDTH, *rest]


def batch(lengths: list[int], packed: bool, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n // 4,), generator=g).tolist() for n in lengths]
    completions = [torch.randint(3, vocab, (n - n // 4,), generator=g).tolist() for n in lengths]
    return (pack if packed else pad)(prompts, completions, pad_id=0)


def step(scorer: TokenScorer, seqs) -> None:
    logps = scorer(seqs.input_ids, seqs.attention_mask, seqs.completion_mask, seqs.position_ids)
    seqs.per_sequence(logps).sum().backward()


def tokens_scaling(repeats: int) -> None:
    from prospect.config import ModelConfig
    from prospect.models.loading import load_model

    model, _ = load_model(ModelConfig(name="smollm2"))
    scorer = TokenScorer(model, bf16=True)
    vocab = model.config.vocab_size
    print(f"SmolLM2-135M, {torch.get_num_threads()} threads, 8 sequences per batch, padded width {WIDTH}")
    print(f"{'real tokens':>11} {'layout':>7} {'rows x width':>12} {'s/step':>7} {'s per 1k tokens':>15}")
    step(scorer, batch(lengths_for(2048), True, vocab))  # warm-up
    for total in (1024, 1536, 2048, 2560, 4096):
        for packed in (False, True):
            seqs = batch(lengths_for(total), packed, vocab)
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            for _ in range(repeats):
                step(scorer, seqs)
            seconds = (time.perf_counter() - started) / repeats
            rows, width = seqs.input_ids.shape
            print(
                f"{seqs.tokens:>11} {'packed' if packed else 'padded':>7} {f'{rows} x {width}':>12} "
                f"{seconds:>7.2f} {1000 * seconds / seqs.tokens:>15.2f}"
            )


def vocab_worker(vocab: int, method: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=WIDTH,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    seqs = batch([WIDTH] * ROWS, False, vocab)
    for p in model.parameters():  # allocate gradients and Adam state before measuring
        p.grad = torch.zeros_like(p)
    optimizer.step()
    before = rss_mb()
    if method == "prospect":
        step(TokenScorer(model, bf16=True), seqs)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask).logits
        logps = logits[:, :-1].float().log_softmax(-1).gather(-1, seqs.input_ids[:, 1:, None])
        (logps.squeeze(-1) * seqs.completion_mask[:, 1:]).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    return {"step_mb": peak - before, "weights_mb": weights}


def vocab_scaling() -> None:
    print(
        f"4-layer Llama, hidden 256, one step of {ROWS} x {WIDTH} tokens; peak RSS of the step above the RSS before it"
    )
    print(f"{'vocab':>7} {'weights MB':>10} {'prospect MB':>11} {'full logits MB':>14}")
    for vocab in (32_768, 65_536, 131_072, 262_144):
        results = {}
        for method in ("prospect", "full"):
            done = subprocess.run(
                [sys.executable, __file__, "vocab-worker", "--vocab", str(vocab), "--method", method],
                capture_output=True,
                text=True,
                check=True,
            )
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{vocab:>7} {results['prospect']['weights_mb']:>10.0f} {results['prospect']['step_mb']:>11.0f} "
            f"{results['full']['step_mb']:>14.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["tokens", "vocab", "vocab-worker"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.what == "tokens":
        tokens_scaling(args.repeats)
    elif args.what == "vocab":
        vocab_scaling()
    else:
        print(json.dumps(vocab_worker(args.vocab, args.method)))


if __name__ == "__main__":
    main()

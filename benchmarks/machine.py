"""What this machine can do, measured robustly for the benchmarks' "% of peak": the bf16 and fp32 matmul peak
(warm-up, several sizes, best of several trials, refused when far below the CPU's known capability), the
throughput of the model's own matmul shapes (a small roofline), and waiting for a quiet machine."""

from __future__ import annotations

import ctypes.util
import functools
import os
import sys
import time
from pathlib import Path

import torch

# Best bf16 matmul GFLOP/s per thread measured on this project's hosts, by the CPU's bf16 instructions: the
# host changes between sessions (2,064 on two cores on a host with 7x bf16/fp32, as AMX gives; 440 on an AMD EPYC
# with AVX512-BF16 and no AMX, 2026-11-30).
KNOWN_BF16_PEAK = {"amx": 1032.0, "avx512_bf16": 220.0}


@functools.cache
def cpu_kind() -> tuple[str, str]:
    """(the CPU's model name, its fastest bf16 instructions: amx, avx512_bf16 or none)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?"
    )
    flags = set(
        next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    )
    return model, "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, trials: int = 5) -> float:
    """The best of `trials` timings of [m, k] @ [k, n], after a warm-up: the clock of a shared CPU varies."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    reps = max(1, int(2e10 / (2 * m * k * n)))  # about 20 GFLOP per trial
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - started) / 1e9)
    return best


def matmul_peak(dtype: torch.dtype) -> float:
    """The best square matmul over several sizes. A bf16 peak far below the machine's known one means the
    cores were busy or throttled: measured again, up to three times, then flagged."""
    peak = 0.0
    for _ in range(3):
        peak = max(matmul_gflops(n, n, n, dtype) for n in (1024, 2048, 4096))
        known = KNOWN_BF16_PEAK.get(cpu_kind()[1], 0.0) * torch.get_num_threads()
        if dtype != torch.bfloat16 or peak > 0.6 * known:
            return peak
        print(f"bf16 peak {peak:.0f} GFLOP/s, far below {known:.0f}: measuring again", file=sys.stderr)
        time.sleep(10)
    return peak


def model_shapes(tokens: int, model: str) -> list[tuple[int, int, int]]:
    """The [m, k] @ [k, n] products of one training step of SmolLM2 at `tokens` rows: each projection's
    forward, its input gradient and its weight gradient, and the output projection at every row."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model)
    d, head_dim = c.hidden_size, c.hidden_size // c.num_attention_heads
    projections = [
        (d, c.num_attention_heads * head_dim),  # q
        (d, c.num_key_value_heads * head_dim),  # k
        (d, c.num_key_value_heads * head_dim),  # v
        (c.num_attention_heads * head_dim, d),  # o
        (d, c.intermediate_size),  # gate
        (d, c.intermediate_size),  # up
        (c.intermediate_size, d),  # down
    ]
    shapes = []
    for k, n in [*projections, (d, c.vocab_size)]:
        shapes += [(tokens, k, n), (tokens, n, k), (k, tokens, n)]
    return shapes


def shape_roofline(tokens: int, model: str) -> float:
    """What this CPU delivers on the model's own bf16 matmul shapes: their FLOPs over their best times.
    A 576-wide model cannot reach the square-matmul peak; this is the ceiling a step can approach."""
    shapes = model_shapes(tokens, model)
    seconds = sum(
        2 * m * k * n / (matmul_gflops(m, k, n, torch.bfloat16, trials=3) * 1e9) for m, k, n in shapes
    )
    return sum(2 * m * k * n for m, k, n in shapes) / seconds / 1e9


def wait_until_quiet(limit: float, timeout: float = 600.0) -> float:
    """Wait for the 1-minute load average to fall below `limit` (other work on 2 cores slows both libraries
    unevenly); returns the load at the start, which is printed with each row."""
    started = time.time()
    while os.getloadavg()[0] >= limit and time.time() - started < timeout:
        time.sleep(15)
    return os.getloadavg()[0]


# Memory allocators a run may preload (option `jemalloc` or `tcmalloc` of either library): glibc's malloc
# returns large freed blocks to the system, so every step maps and zero-fills them again.
ALLOCATORS = {"jemalloc": "jemalloc", "tcmalloc": "tcmalloc_minimal"}


def allocator_env(options: set[str]) -> dict[str, str]:
    """LD_PRELOAD for the allocator among `options` ({} for glibc's); an allocator not installed is an error."""
    chosen = sorted(options & ALLOCATORS.keys())
    if not chosen:
        return {}
    if len(chosen) > 1:
        raise SystemExit(f"one allocator at a time, got {' and '.join(chosen)}")
    library = ctypes.util.find_library(ALLOCATORS[chosen[0]])
    if library is None:
        raise SystemExit(
            f"{chosen[0]} is not installed (Debian: apt-get install libjemalloc2 libtcmalloc-minimal4)"
        )
    return {"LD_PRELOAD": library}

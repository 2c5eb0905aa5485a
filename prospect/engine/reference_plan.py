"""The reference log-probs a run will ask for, known before it starts, and the cache that answers them.

The batch order is a pure function of the seed and the step (`step_indices`), so every microbatch of the
rest of the run, on every process, can be listed up front. `precompute` runs the reference once on all of
them and hands back a lookup the loop uses instead of the reference model. In fp32, and in padded bf16,
values are keyed by sequence content (shared across runs and losses); packed rows in bf16 round a sequence
by where it sits, so there the cache is filled with the very microbatches each process will train on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from prospect.data.batching import Batch, Sequences, microbatch_slice, sequence_key, step_indices
from prospect.data.shapes import DataShape, sequences_of
from prospect.data.tokenize import Encoded, Encoder
from prospect.errors import UserError
from prospect.losses.base import ReferencePoint
from prospect.models.attention import attention_kernel
from prospect.models.reference import ReferenceCache, ReferenceFn, tokenizer_fingerprint, weights_fingerprint
from prospect.progress import Progress


@dataclass
class BatchOrder:
    """Which training items each process's microbatches hold at each step."""

    num_items: int
    seed: int
    batch_size: int
    grad_accum: int
    world: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    def total_steps(self, max_steps: int, epochs: float, source: str) -> int:
        """`max_steps`, else `epochs` passes over the items; an error when they do not fill one global batch."""
        per_epoch = self.num_items // self.global_batch
        if per_epoch == 0:
            raise UserError(
                f"{source}: {self.num_items} training items, fewer than one global batch "
                f"(batch_size {self.batch_size} x grad_accum {self.grad_accum} x {self.world} processes)"
            )
        return max_steps if max_steps > 0 else max(1, math.ceil(epochs * per_epoch))

    def microbatches(self, step: int, rank: int) -> list[list[int]]:
        indices = step_indices(self.num_items, self.global_batch, self.seed, step)
        return [
            microbatch_slice(indices, micro, rank, self.world, self.batch_size)
            for micro in range(self.grad_accum)
        ]

    def planned(self, start: int, stop: int) -> Iterator[tuple[int, list[int]]]:
        """(process rank, item indices) of every microbatch of steps [start, stop), in training order."""
        for step in range(start, stop):
            indices = step_indices(self.num_items, self.global_batch, self.seed, step)
            for micro in range(self.grad_accum):
                for rank in range(self.world):
                    yield rank, microbatch_slice(indices, micro, rank, self.world, self.batch_size)


class ReferencePlan:
    def __init__(
        self,
        order: BatchOrder,
        items: list,
        shape: DataShape,
        reference_point: ReferencePoint | None,
        encoder: Encoder,
        make_batch: Callable[[list[int]], Batch],
    ):
        self.order, self.items, self.shape = order, items, shape
        self.reference_point, self.encoder, self.make_batch = reference_point, encoder, make_batch

    def sequences(self, start: int, stop: int) -> Iterator[tuple[bytes, list[int], list[int]]]:
        """(key, prompt, completion) of every sequence the reference will see in steps [start, stop) on every
        process, in batch order, reference-point sequences included (so KTO's mismatched pairs are exactly
        the ones trained on)."""
        for _, indices in self.order.planned(start, stop):
            items = [self.items[i] for i in indices]
            prompts, completions = sequences_of(items, self.shape)
            if self.reference_point is not None:
                extra: list[Encoded] = self.reference_point.sequences(items, self.encoder.fit)
                prompts = prompts + [e.prompt_ids for e in extra]
                completions = completions + [e.completion_ids for e in extra]
            for prompt, completion in zip(prompts, completions):
                yield sequence_key(prompt, completion), prompt, completion

    def batches(self, start: int, stop: int, rank: int) -> Iterator[Sequences]:
        """The sequences of each microbatch process `rank` will train on, laid out as in training."""
        for owner, indices in self.order.planned(start, stop):
            if owner == rank:
                batch = self.make_batch(indices)
                yield from (s for s in (batch.sequences, batch.point_sequences) if s is not None)

    def precompute(
        self,
        cache: ReferenceCache,
        reference: ReferenceFn,
        accelerator: Accelerator,
        start: int,
        stop: int,
        pad_id: int,
    ) -> ReferenceCache:
        """Fill `cache` with every reference log-prob steps [start, stop) need, shared out among processes;
        the main process saves what is new."""
        show = accelerator.is_main_process
        rank, world = accelerator.process_index, accelerator.num_processes
        before = dict(cache.table)
        if cache.by_layout:  # each process runs its own microbatches, exactly as it will train on them
            per_microbatch = 2 if self.reference_point is not None else 1  # with the reference-point batch
            count = (stop - start) * self.order.grad_accum * per_microbatch
            bar = Progress("reference log-probs", count, "batches", show=show)
            cache.fill_batches(self.batches(start, stop, rank), reference, progress=bar.update)
        else:  # every sequence once, length-sorted
            mine = cache.missing(self.sequences(start, stop))[rank::world]
            bar = Progress("reference log-probs", len(mine), "sequences", show=show)
            cache.fill(mine, reference, pad_id, accelerator.device, progress=bar.update)
        bar.close()
        new = [(k, v) for k, v in cache.table.items() if k not in before]
        if world > 1:
            new = gather_object(new)
        cache.table.update(new)
        if accelerator.is_main_process:
            print(f"reference cache {cache.path.name}: {len(before)} known, {len(new)} computed", flush=True)
            if new:
                cache.save()
        accelerator.wait_for_everyone()
        return cache


def reference_fingerprint(
    model: nn.Module, tokenizer, max_length: int, max_prompt_length: int, bf16: bool, packing: str | None
) -> str:
    """What the reference log-probs depend on: weights, tokenizer, truncation, precision, attention, and
    for layout-keyed caches the packing mode (see ReferenceCache)."""
    return "-".join(
        [
            weights_fingerprint(model)[:16],
            tokenizer_fingerprint(tokenizer)[:8],
            f"len{max_length}p{max_prompt_length}",
            "bf16" if bf16 else "fp32",
            attention_kernel(model),
            *([packing] if packing else []),
        ]
    )

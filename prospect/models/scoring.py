"""Per-token log-probs of completion tokens: the one quantity every offline loss is built from.

The transformer trunk may run under bf16 autocast; the output projection and log-softmax always run in
fp32, only at completion positions and in chunks, so full [batch, length, vocab] logits never exist. Their
backward (a gradient, not a log-ratio) runs in the trunk's precision.
Policy and reference go through this same code, so their log-ratio is not rounding noise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from prospect.data.batching import Sequences
from prospect.data.layout import SegmentLayout
from prospect.models.attention import model_inputs, unwrapped

LOGITS_PER_CHUNK = 2**25  # fp32 logits held at once by the chunked head (128 MB), whatever the vocabulary
# Config attributes of models whose logits are not a plain linear projection of the last hidden state.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass
class TokenOutputs:
    logps: torch.Tensor  # [rows, T-1] log-prob of each next token, 0 off completions
    entropy: torch.Tensor | None  # [rows, T-1] entropy of each next-token distribution, 0 off completions
    hidden: torch.Tensor | None  # [rows, T, H] the trunk's last hidden states


class TokenScorer(nn.Module):
    """Wraps a causal LM (optionally a PEFT model). `forward` returns [N, T-1] fp32 log-probs of each
    next token, zero where the token is not a completion token. Being an nn.Module, it is what
    accelerate wraps for DDP/FSDP, so every forward goes through the wrapper."""

    def __init__(self, model: nn.Module, bf16: bool = False, chunk: int = 0):
        super().__init__()
        self.model = model
        self.bf16 = bf16
        self.chunk = chunk

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        completion_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        layout: SegmentLayout | None = None,
    ) -> torch.Tensor:
        """Packed rows pass `position_ids` (restarting per sequence) and no attention mask."""
        return self.compute(input_ids, attention_mask, completion_mask, position_ids, layout).logps

    def compute(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        completion_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        layout: SegmentLayout | None = None,
        entropy: bool = False,
        hidden: bool = False,
    ) -> TokenOutputs:
        """Log-probs, and on request the entropy of each next-token distribution at completion positions and
        the trunk's hidden states (for a value head sharing the trunk). Call it from inside a wrapped
        module's forward."""
        targets = input_ids[:, 1:]
        target_mask = completion_mask[:, 1:]
        trunk, head = split_head(self.model)
        inputs, context = model_inputs(self.model, input_ids, attention_mask, position_ids, layout)
        states: torch.Tensor | None
        if trunk is None or head is None:  # the model's own logits
            with self.autocast(), context:
                output = self.model(**inputs, output_hidden_states=hidden)
                states = output.hidden_states[-1] if hidden else None
            with torch.autocast(input_ids.device.type, enabled=False):
                logps = output.logits[:, :-1][target_mask].float().log_softmax(-1)
                values = logps.gather(-1, targets[target_mask].unsqueeze(-1)).squeeze(-1)
                if entropy:
                    values = torch.stack([values, -(logps.exp() * logps).sum(-1)], -1)
        else:  # the trunk, then the output projection chunk by chunk in fp32
            with self.autocast(), context:
                states = trunk(**inputs).last_hidden_state
            with torch.autocast(input_ids.device.type, enabled=False):
                values = linear_logprobs(
                    states[:, :-1][target_mask],
                    head,
                    targets[target_mask],
                    self.chunk,
                    entropy,
                    torch.bfloat16 if self.bf16 else torch.float32,
                )

        def scatter(v: torch.Tensor) -> torch.Tensor:
            zeros = torch.zeros(targets.shape, dtype=torch.float32, device=input_ids.device)
            return zeros.masked_scatter(target_mask, v)

        if entropy:
            return TokenOutputs(scatter(values[:, 0]), scatter(values[:, 1]), states)
        return TokenOutputs(scatter(values), None, states)

    def autocast(self) -> contextlib.AbstractContextManager:
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def sequence_logps(self, seqs: Sequences) -> torch.Tensor:
        """Summed completion log-prob per sequence, [N]."""
        return seqs.per_sequence(self.token_logps(seqs))

    def token_logps(self, seqs: Sequences) -> torch.Tensor:
        input_ids, attention_mask, position_ids, layout = seqs.model_inputs()
        return self(input_ids, attention_mask, seqs.completion_mask, position_ids, layout)


def split_head(model: nn.Module) -> tuple[nn.Module | None, nn.Linear | None]:
    """(trunk, output projection) when logits are a plain linear map of the trunk's output, else (None, None)."""
    base = unwrapped(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    if not isinstance(head, nn.Linear) or any(
        getattr(config, a, None) not in (None, 1, 1.0) for a in LOGIT_TRANSFORMS
    ):
        return None, None
    trunk = base.get_decoder() if hasattr(base, "get_decoder") else None
    if trunk is None or trunk is base:
        return None, None
    return trunk, head


def linear_logprobs(
    hidden: torch.Tensor,
    head: nn.Linear,
    targets: torch.Tensor,
    chunk: int,
    entropy: bool = False,
    backward_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """log softmax(hidden @ W^T + b)[target] in fp32, `chunk` rows at a time (0: LOGITS_PER_CHUNK logits)
    ([M], or [M, 2] with the entropy). With gradients, each chunk's logits are recomputed in backward
    instead of being stored, in `backward_dtype` (bf16 under mixed precision: the gradient needs bf16
    accuracy, the log-probs fp32)."""
    chunk = chunk if chunk > 0 else max(16, LOGITS_PER_CHUNK // head.out_features)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    if needs_grad and not entropy:
        return TargetLogprobs.apply(hidden, head.weight, head.bias, targets, chunk, backward_dtype)
    pieces = []
    for start in range(0, hidden.shape[0], chunk):
        args = (
            hidden[start : start + chunk],
            head.weight,
            head.bias,
            targets[start : start + chunk],
            entropy,
        )
        pieces.append(
            checkpoint(chunk_logprobs, *args, use_reentrant=False) if needs_grad else chunk_logprobs(*args)
        )
    if not pieces:
        return hidden.new_zeros((0, 2) if entropy else 0, dtype=torch.float32)
    return torch.cat(pieces)


def chunk_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    entropy: bool = False,
) -> torch.Tensor:
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    normaliser = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
    if not entropy:
        return logps
    probs = torch.softmax(logits, dim=-1)
    return torch.stack([logps, normaliser - (probs * logits).sum(-1)], -1)


class TargetLogprobs(torch.autograd.Function):
    """`chunk_logprobs` over all rows, chunk by chunk, with a hand-written backward: d logp / d logits =
    onehot(target) - softmax, formed in place on each chunk's recomputed logits, then two matmuls in
    `backward_dtype`, the weight gradient summed over chunks in one buffer. Nothing of size vocab is kept
    between forward and backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, backward_dtype):
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.backward_dtype = chunk, backward_dtype
        pieces = [
            chunk_logprobs(hidden[i : i + chunk], weight, bias, targets[i : i + chunk])
            for i in range(0, hidden.shape[0], chunk)
        ]
        return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets = ctx.saved_tensors
        dtype, chunk = ctx.backward_dtype, ctx.chunk
        weight_low = weight.detach().to(dtype)
        bias_low = None if bias is None else bias.detach().to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        for i in range(0, hidden.shape[0], chunk):
            low, g = hidden[i : i + chunk].to(dtype), grad[i : i + chunk].unsqueeze(-1)
            logits = F.linear(low, weight_low, bias_low).float()
            scores = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True)).exp_()  # softmax, in place
            scores.mul_(-g).scatter_add_(-1, targets[i : i + chunk].unsqueeze(-1), g)  # g (onehot - softmax)
            if grad_bias is not None:
                grad_bias += scores.sum(0)
            scores = scores.to(dtype)
            if grad_hidden is not None:
                grad_hidden[i : i + chunk] = scores @ weight_low
            if grad_weight is not None:
                grad_weight += scores.t() @ low
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None

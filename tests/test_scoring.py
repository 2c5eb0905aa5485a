"""Log-probs: the chunked fp32 head equals plain logits; bf16 policy and reference share one path."""

from __future__ import annotations

import copy

import pytest
import torch

from prospect.data.batching import pad
from prospect.models.scoring import TokenScorer, linear_logprobs, split_head
from tests.helpers import build_model


def reference_token_logps(model, seqs) -> torch.Tensor:
    """Independent formula: full logits, log-softmax, pick the next token, keep completion positions."""
    logits = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask).logits.float()
    logps = logits[:, :-1].log_softmax(-1).gather(-1, seqs.input_ids[:, 1:, None]).squeeze(-1)
    return logps * seqs.completion_mask[:, 1:]


def example_lists(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 9, 3)]
    completions = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 2, 11)]
    return prompts, completions


def example_sequences(vocab: int, seed: int = 0):
    return pad(*example_lists(vocab, seed), pad_id=0)


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_chunked_head_equals_full_logits(chunk):
    model = build_model(64)
    seqs = example_sequences(64)
    scorer = TokenScorer(model, chunk=chunk)
    got = scorer(seqs.input_ids, seqs.attention_mask, seqs.completion_mask)
    assert split_head(model)[1] is model.lm_head  # the fast path is the one under test
    torch.testing.assert_close(got, reference_token_logps(model, seqs), rtol=1e-5, atol=1e-5)
    assert (got[~seqs.completion_mask[:, 1:]] == 0).all()


def test_chunked_head_gradients_equal_full_logits():
    model_a, model_b = build_model(64), build_model(64)
    seqs = example_sequences(64)
    TokenScorer(model_a, chunk=3).sequence_logps(seqs).sum().backward()
    reference_token_logps(model_b, seqs).sum().backward()
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_head_backward_in_bf16_is_a_bf16_accurate_gradient():
    """Mixed precision: the head's log-probs stay fp32-exact, its backward runs in bf16 like the trunk's."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 32, generator=g, requires_grad=True)
    head = torch.nn.Linear(32, 500, bias=True)
    targets = torch.randint(0, 500, (40,), generator=g)
    weights = torch.randn(40, generator=g)  # per-token upstream gradients, as a loss gives them

    def grads(dtype):
        hidden.grad, head.weight.grad, head.bias.grad = None, None, None
        values = linear_logprobs(hidden, head, targets, chunk=16, backward_dtype=dtype)
        (values * weights).sum().backward()
        return values.detach(), [t.grad.clone() for t in (hidden, head.weight, head.bias)]

    exact_values = (torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)).detach()
    hidden.grad = None
    (torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1) * weights).sum().backward()
    exact = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        values, got = grads(dtype)
        torch.testing.assert_close(values, exact_values, rtol=1e-6, atol=1e-6)  # forward: fp32 either way
        for a, b in zip(got, exact):
            assert (a - b).norm() <= tolerance * b.norm()
    _, low = grads(torch.bfloat16)
    assert any(not torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(low, exact))  # really bf16


def test_models_with_logit_transforms_use_full_logits():
    model = build_model(64)
    model.config.final_logit_softcapping = 30.0
    assert split_head(model) == (None, None)
    seqs = example_sequences(64)
    got = TokenScorer(model).sequence_logps(seqs)
    torch.testing.assert_close(got, reference_token_logps(model, seqs).sum(-1))


def perturbed_pair(seed: int = 0):
    """A reference and a policy a few small SGD-like steps away from it."""
    reference = build_model(256, seed=seed)
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 2e-3)
    return policy, reference


def log_ratio(policy, reference, seqs, policy_bf16: bool, reference_bf16: bool) -> torch.Tensor:
    with torch.no_grad():
        return TokenScorer(policy, bf16=policy_bf16).sequence_logps(seqs) - TokenScorer(
            reference, bf16=reference_bf16
        ).sequence_logps(seqs)


def test_bf16_log_ratio_is_exact_when_both_sides_share_the_path():
    """policy == reference through the same bf16 path: the implied reward is exactly 0. Mixing paths
    (bf16 policy, fp32 reference) turns it into rounding noise before any training."""
    model = build_model(256)
    seqs = example_sequences(256)
    assert torch.equal(log_ratio(model, copy.deepcopy(model), seqs, True, True), torch.zeros(3))
    assert log_ratio(model, copy.deepcopy(model), seqs, True, False).abs().max() > 1e-4


def test_bf16_log_ratio_tracks_fp32_after_the_policy_moves():
    policy, reference = perturbed_pair()
    seqs = example_sequences(256, seed=4)
    exact = log_ratio(policy, reference, seqs, False, False)
    matched = log_ratio(policy, reference, seqs, True, True)
    assert exact.abs().max() > 0.01
    torch.testing.assert_close(matched, exact, atol=0.1 * exact.abs().max().item(), rtol=0)


def test_bf16_padded_log_probs_do_not_depend_on_the_batch():
    """The reference cache scores sequences in other batches than training does; with right padding each
    sequence's bf16 log-prob is the same, up to fp32 summation order, whatever shares its batch."""
    scorer = TokenScorer(build_model(256), bf16=True)
    prompts, completions = example_lists(256)
    with torch.no_grad():
        together = scorer.sequence_logps(pad(prompts, completions, pad_id=0))
        alone = [scorer.sequence_logps(pad([p], [c], pad_id=0)) for p, c in zip(prompts, completions)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-4)

"""Segment attention and shared prompts change the cost, never the log-probs or their gradients."""

from __future__ import annotations

import pytest
import torch

from prospect.data.batching import pad
from prospect.data.layout import SegmentLayout, Span
from prospect.data.packing import pack
from prospect.models import attention
from prospect.models.scoring import TokenScorer
from tests.helpers import build_model


def pairs(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Three prompts, each with two completions (chosen, rejected), plus one single: lengths 3 to 24."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompts = [draw(n) for n in (5, 9, 1)]
    prompts = prompts + prompts + [draw(4)]
    completions = [draw(n) for n in (7, 2, 11, 15, 4, 6, 3)]
    return prompts, completions


def logps_and_grads(model, seqs, weights: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logps = TokenScorer(model).sequence_logps(seqs)
    (logps * weights).sum().backward()
    return logps.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(("kernel", "checkpointing"), [("eager", False), ("eager", True), ("sdpa", False)])
def test_segments_and_shared_prompts_equal_eager_padded(kernel, checkpointing, monkeypatch):
    """Packed rows and shared prompts, under either segment kernel, give the padded batch's log-probs and
    gradients."""
    monkeypatch.setattr(attention, "SEGMENT_KERNEL", kernel)
    model = build_model(64)
    prompts, completions = pairs(64)
    weights = torch.linspace(-1, 1, len(prompts))
    model.config._attn_implementation = "eager"
    want, want_grads = logps_and_grads(model, pad(prompts, completions, 0), weights)
    model.config._attn_implementation = attention.NAME
    if checkpointing:  # the layout must survive the recomputation in backward
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
    shared = pack(prompts, completions, 0, width=200, share_prompts=True)  # one row: every prompt shared
    assert shared.layout.shares_prompts and shared.tokens == sum(map(len, prompts + completions))
    # three prompts computed once, their last tokens twice: 82 - 15 + 3 tokens
    assert int((shared.sequence_index >= 0).sum()) == 70
    for seqs in (pad(prompts, completions, 0), pack(prompts, completions, 0), shared):
        got, grads = logps_and_grads(model, seqs, weights)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_shared_prompt_layout_by_hand():
    seqs = pack([[1, 2, 3], [4, 5], [1, 2, 3]], [[7, 8], [9], [10, 11, 12]], pad_id=0, share_prompts=True)
    # row 0: prompt, completion 0, then a branch: the prompt's last token (3) at its position (2) + completion 2
    assert seqs.input_ids.tolist() == [[1, 2, 3, 7, 8, 3, 10, 11, 12], [4, 5, 9, 0, 0, 0, 0, 0, 0]]
    assert seqs.position_ids.tolist()[0] == [0, 1, 2, 3, 4, 2, 3, 4, 5]
    assert seqs.sequence_index.tolist()[0] == [0, 0, 0, 0, 0, 2, 2, 2, 2]
    assert seqs.completion_mask.long().tolist()[0] == [0, 0, 0, 1, 1, 0, 1, 1, 1]
    assert seqs.layout.rows[0] == (Span(0, 5, 0, 0), Span(5, 4, 0, 2))  # the branch sees prompt[:2]
    assert seqs.layout.rows[1] == (Span(0, 3, 0, 0), Span(3, 6))  # the pad tail attends only to itself
    assert seqs.tokens == 14


def test_layout_mask_lets_a_branch_see_the_prompt_but_not_its_sibling():
    layout = SegmentLayout(((Span(0, 4), Span(4, 3, 0, 2)),))  # prompt [0, 3) + 1 completion token; branch
    allowed = (layout.additive_mask(7, torch.device("cpu"))[0, 0] == 0).long().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # the copy of the prompt's last token: prompt[:2] and itself
        [1, 1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 1, 1, 1],
    ]


def test_padded_layout_puts_the_tail_apart():
    assert SegmentLayout.padded([3, 5], 5).rows == ((Span(0, 3), Span(3, 2)), (Span(0, 5),))


def test_shared_prompts_need_segment_attention():
    model = build_model(64)
    model.config._attn_implementation = "eager"
    prompts, completions = pairs(64)
    with pytest.raises(ValueError, match=r"shared prompts need model\.attn_implementation=prospect_segments"):
        TokenScorer(model).sequence_logps(pack(prompts, completions, 0, share_prompts=True))


def test_without_a_layout_it_is_eager_attention_with_a_mask():
    """Generation and callers without a layout get transformers' masks (left padding here)."""
    model = build_model(64)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    model.config._attn_implementation = "eager"
    want = model(input_ids=ids, attention_mask=mask).logits
    model.config._attn_implementation = attention.NAME
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want)


def test_reward_scores_with_shared_prompts_equal_padded():
    from transformers import LlamaForSequenceClassification

    from prospect.models.scalar_head import ScalarScorer

    base = build_model(64)
    base.config.num_labels = 1
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(base.config)
    model.config._attn_implementation = attention.NAME
    scorer = ScalarScorer(model, model.score)
    prompts, completions = pairs(64)
    want = scorer.sequence_scores(pad(prompts, completions, 0), pad_id=0)
    got = scorer.sequence_scores(pack(prompts, completions, 0, share_prompts=True), pad_id=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.std() > 0  # seven different sequences, seven different scores


def test_sharing_is_kept_only_where_it_is_cheaper():
    # two pairs whose groups (3 + 6 + 1 + 5 = 15 tokens) are wider than their longest sequence (9)
    prompts = [[1, 2, 3], [4, 5, 6], [1, 2, 3], [4, 5, 6]]
    completions = [[7] * 6, [8] * 6, [9] * 5, [10] * 5]
    cheap = pack(prompts, completions, 0, share_prompts=True)  # attention free: whole groups, 2 x 15
    assert cheap.input_ids.shape == (2, 15) and cheap.layout.shares_prompts
    # attention dear: 4 rows x 9 (36 slots, squares 324) beat 2 x 15 (30 slots, squares 450)
    dear = pack(prompts, completions, 0, share_prompts=True, attention_cost=0.1)
    assert dear.input_ids.shape == (4, 9) and not dear.layout.shares_prompts
    assert cost(dear, 0.1) < cost(cheap, 0.1) and cost(cheap, 0.0) < cost(dear, 0.0)


def cost(seqs, attention_cost: float) -> float:
    rows, width = seqs.input_ids.shape
    return rows * width * (1 + attention_cost * width)


def test_attention_cost_of_a_tiny_llama():
    model = build_model(
        64
    )  # hidden 32, 2 layers of 4 * 32 * 32 / 2 (attention, 2 kv heads) + 3 * 32 * 64 + 64
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert attention.attention_cost(model) == pytest.approx(3 * 4 * 32 / (2 * (per_layer + 32 / 2)))

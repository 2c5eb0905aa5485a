"""The lean decoding loop against transformers' generate: same greedy tokens, shared prefixes, rows that
leave the batch when they stop, and samples drawn from the model's own distribution."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prospect.models.decoding import decode, left_padded, sample_rows

from .test_sampling import prompts


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    """The tiny model with its matrices scaled up: at initialisation its greedy output repeats one token
    whatever the prompt; scaled, it depends on the prompt and varies along the completion."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(12)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def generate_greedy(model, tokenizer, ps: list[list[int]], new: int, stops: list[int]) -> list[list[int]]:
    """transformers' generate, one prompt at a time, cut after the first stop token."""
    out = []
    for p in ps:
        ids = torch.tensor([p])
        row = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
            eos_token_id=stops or None, pad_token_id=tokenizer.pad_token_id,
        )[0, len(p) :].tolist()  # fmt: skip
        end = next((i for i, t in enumerate(row) if t in stops), None)
        out.append(row[: end + 1] if end is not None else row)
    return out


def test_greedy_equals_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ps = prompts(tokenizer)
    expected = generate_greedy(model, tokenizer, ps, 10, [])
    got = decode(model, ps, 1, 10, [], tokenizer.pad_token_id, temperature=0)
    assert [tokens for tokens, _ in got] == expected
    assert not any(finished for _, finished in got)


def test_stopped_rows_leave_the_batch_without_changing_the_others(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ps = prompts(tokenizer)
    free = generate_greedy(model, tokenizer, ps, 10, [])
    # The first prompt stops at its first token not seen before; the others go on unless they meet it.
    at = next(i for i in range(1, 10) if free[0][i] not in free[0][:i])
    expected = generate_greedy(model, tokenizer, ps, 10, [free[0][at]])
    steps: list[int] = []
    got = decode(model, ps, 1, 10, [free[0][at]], tokenizer.pad_token_id, temperature=0, on_step=steps.append)
    assert [tokens for tokens, _ in got] == expected
    assert got[0] == (free[0][: at + 1], True)
    assert steps[: at + 1] == [3] * (at + 1) and steps[at + 1] < 3  # the stopped row ran no further step


def test_samples_of_one_prompt_share_its_prefix_and_match_greedy_at_top_k_1(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ps = prompts(tokenizer)
    greedy = decode(model, ps, 1, 6, [], tokenizer.pad_token_id, temperature=0)
    shared = decode(model, ps, 4, 6, [], tokenizer.pad_token_id, temperature=1.0, top_k=1)
    assert [tokens for tokens, _ in shared] == [tokens for tokens, _ in greedy for _ in range(4)]


def test_first_token_follows_the_model_distribution(model_and_tokenizer):
    """E[q(X)] = sum q^2 when X ~ q, the tempered softmax: the mean probability of the drawn tokens tells a
    right sampler from one that ignores the temperature (or samples uniformly)."""
    model, tokenizer = model_and_tokenizer
    p = prompts(tokenizer)[0]
    with torch.no_grad():
        logits = model(torch.tensor([p])).logits[0, -1].float()
    tempered, plain = (logits / 0.2).softmax(-1), logits.softmax(-1)
    torch.manual_seed(0)
    draws = 4000
    got = decode(model, [p], draws, 1, [], tokenizer.pad_token_id, temperature=0.2)
    drawn = tempered[torch.tensor([tokens[0] for tokens, _ in got])]
    error = drawn.std().item() / draws**0.5
    expected = (tempered**2).sum().item()
    assert abs(drawn.mean().item() - expected) < 4 * error
    for wrong in ((plain * tempered).sum().item(), 1 / len(logits)):  # temperature 1, uniform
        assert abs(wrong - expected) > 12 * error
    probs = plain
    top2 = set(probs.topk(2).indices.tolist())
    cut = decode(model, [p], 200, 1, [], tokenizer.pad_token_id, temperature=1.0, top_k=2)
    assert {tokens[0] for tokens, _ in cut} <= top2


def test_inverse_transform_draws_follow_each_rows_probabilities():
    """Counts of 20,000 draws per row against the probabilities: within 5 standard errors of a binomial count,
    entries of probability 0 never drawn (also at the ends of the vocabulary), each row its own."""
    probs = torch.tensor(
        [[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9], [0, 0, 1.0, 0, 0, 0]]
    )
    torch.manual_seed(0)
    n = 20_000
    draws = torch.stack([sample_rows(probs) for _ in range(n)])  # [n, rows]
    for row in range(3):
        got = torch.bincount(draws[:, row], minlength=6).float()
        expected = n * probs[row]
        spread = (n * probs[row] * (1 - probs[row])).sqrt()
        assert torch.all((got - expected).abs() <= 5 * spread + 1e-6), (row, got, expected)
        assert torch.all(got[probs[row] == 0] == 0)


def test_left_padding_aligns_prompts_right():
    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]

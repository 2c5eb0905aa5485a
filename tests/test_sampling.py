"""The sampling layer: batching with left padding, n samples per prompt, seeds, stop tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prospect.models.sampling import HFSampler, SamplingParams, stop_tokens


@pytest.fixture(scope="module", params=["prospect", "hf"])
def sampler(tiny_model_dir, request):
    """Each test runs on both decoders: prospect's lean loop and transformers' generate."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return HFSampler(model, tokenizer, batch_size=3, decoder=request.param)


def prompts(tokenizer):
    texts = ["Review the cartoon.", "Review the old western, please.", "Hi"]
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
        )
        for t in texts
    ]
    return [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]


def test_end_of_turn_token_is_found(sampler):
    tokenizer = sampler.tokenizer
    assert stop_tokens(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_batched_greedy_equals_one_at_a_time(sampler):
    ps = prompts(sampler.tokenizer)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    batched = sampler.generate(ps, params)
    single = [sampler.generate([p], params)[0] for p in ps]
    assert [b[0].token_ids for b in batched] == [s[0].token_ids for s in single]
    top1 = sampler.generate(ps, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1))
    assert [b[0].token_ids for b in top1] == [b[0].token_ids for b in batched]


def test_n_samples_per_prompt_are_seeded(sampler):
    ps = prompts(sampler.tokenizer)
    params = SamplingParams(max_new_tokens=6, n=4, seed=3)
    first, again = sampler.generate(ps, params), sampler.generate(ps, params)
    assert [len(s) for s in first] == [4, 4, 4]
    assert [[x.token_ids for x in s] for s in first] == [[x.token_ids for x in s] for s in again]
    other = sampler.generate(ps, SamplingParams(max_new_tokens=6, n=4, seed=4))
    assert [[x.token_ids for x in s] for s in other] != [[x.token_ids for x in s] for s in first]
    assert len({tuple(x.token_ids) for x in first[0]}) > 1  # the 4 samples differ


def test_stops_at_end_of_turn_and_reports_it(sampler):
    end = stop_tokens(sampler.tokenizer)[0]
    with torch.no_grad():  # make the end-of-turn token overwhelmingly likely
        sampler.model.lm_head.bias = torch.nn.Parameter(torch.zeros(sampler.model.config.vocab_size))
        sampler.model.lm_head.bias[end] = 100.0
    try:
        out = sampler.generate(prompts(sampler.tokenizer), SamplingParams(max_new_tokens=8))
    finally:
        sampler.model.lm_head.bias = None
    assert all(s[0].token_ids == [end] and s[0].finished for s in out)
    unfinished = sampler.generate(
        prompts(sampler.tokenizer), SamplingParams(max_new_tokens=2, stop_token_ids=[])
    )
    assert all(len(s[0].token_ids) <= 2 for s in unfinished)

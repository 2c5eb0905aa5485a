"""The reference model: on-disk cache (reuse, invalidation, equality with the live model), TR-DPO refresh,
and padding-free batches that change nothing but speed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from prospect.data.batching import pad, sequence_key, step_indices
from prospect.data.packing import pack
from prospect.data.shapes import make_batch
from prospect.engine.trainer import Trainer
from prospect.errors import UserError
from prospect.recipe import load_config
from tests.helpers import paired_rows, tiny_overrides, unpaired_rows, varied_paired_rows, write_jsonl


def sequence_logps(trainer: Trainer, seqs) -> torch.Tensor:
    return seqs.per_sequence(trainer.policy_token_logps(seqs))


def make(tiny_model_dir, data, out, **extra) -> Trainer:
    return Trainer(load_config(None, tiny_overrides(tiny_model_dir, data, out, **extra)))


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", paired_rows(24))


@pytest.fixture
def varied_pairs_file(tmp_path):
    return write_jsonl(tmp_path / "varied_pairs.jsonl", varied_paired_rows(24))


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSPECT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "reference"


@pytest.mark.parametrize(("loss", "data"), [("kto", "kto_file"), ("dpo", "pairs_file")])
def test_second_run_reuses_the_cache(loss, data, tiny_model_dir, cache_home, tmp_path, request):
    data = request.getfixturevalue(data)
    options = {"loss.name": loss, "train.reference_cache": True, "train.max_steps": 5}
    first = make(tiny_model_dir, data, tmp_path / "a", **options)
    first.train()
    assert first.reference_forwards > 0
    files = list(cache_home.glob("*.safetensors"))
    assert len(files) == 1
    second = make(tiny_model_dir, data, tmp_path / "b", **options)
    second.train()
    assert second.reference_forwards == 0  # every reference log-prob, KTO's KL pairs included, came from disk
    assert first.initial_model is None and first.live_reference is None  # no held-out KL: the copy is freed
    straight, cached = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("a", "b"))
    assert all(torch.equal(straight[k], cached[k]) for k in straight)
    third = make(tiny_model_dir, data, tmp_path / "c", **options, **{"data.max_length": 40})
    third.train()
    assert third.reference_forwards > 0  # a new truncation length is a new fingerprint
    assert len(list(cache_home.glob("*.safetensors"))) == 2


def test_cached_values_equal_the_live_reference(tiny_model_dir, kto_file, cache_home, tmp_path):
    trainer = make(tiny_model_dir, kto_file, tmp_path / "run", **{"train.reference_cache": True})
    trainer.precompute_reference()
    for step in range(trainer.total_steps):
        indices = step_indices(len(trainer.data.items), trainer.global_batch, trainer.cfg.train.seed, step)
        batch = trainer.make_batch(indices)
        for seqs in (batch.sequences, batch.point_sequences):
            torch.testing.assert_close(
                trainer.reference(seqs), trainer.live_reference(seqs), rtol=0, atol=1e-5
            )


def test_cache_follows_content_not_position(tiny_model_dir, kto_file, cache_home, tmp_path):
    """Another seed reorders the data and the batches; the cache answers by content, so only sequences it
    has never seen (new mismatched KL pairs) are computed."""
    options = {"train.reference_cache": True, "train.max_steps": 12}  # one epoch: every target once
    first = make(tiny_model_dir, kto_file, tmp_path / "a", **options)
    first.train()
    known = set(first.cache.table)
    other = make(tiny_model_dir, kto_file, tmp_path / "b", **options, **{"train.seed": 7})
    planned = {key for key, _, _ in other.plan.sequences(0, other.total_steps)}
    targets = {sequence_key(it.prompt_ids, it.completion_ids) for it in other.data.items}
    assert targets <= known
    other.precompute_reference()
    assert other.cache.computed == len(planned - known) > 0


@pytest.mark.parametrize(("loss", "data"), [("kto", "kto_file"), ("dpo", "varied_pairs_file")])
def test_packed_bf16_cache_equals_the_live_reference_bit_for_bit(
    loss, data, tiny_model_dir, cache_home, tmp_path, request
):
    """In bf16 a packed sequence's log-prob depends on where it sits in its row, so the cache is filled
    with the very microbatches training will see (two of them per step here) and keyed by them."""
    options = {
        "loss.name": loss,
        "train.padding_free": True,
        "train.precision": "bf16",
        "train.reference_cache": True,
        "train.batch_size": 4,
        "train.grad_accum": 2,
        "train.max_steps": 3,
    }
    data = request.getfixturevalue(data)
    trainer = make(tiny_model_dir, data, tmp_path / "run", **options)
    trainer.precompute_reference()
    assert trainer.cache.by_layout and trainer.cache.computed > 0
    checked, shared, packed = 0, False, False
    for seqs in trainer.plan.batches(0, trainer.total_steps, rank=0):
        assert torch.equal(trainer.reference(seqs), trainer.live_reference(seqs))
        checked += seqs.num_sequences
        shared |= seqs.layout.shares_prompts
        packed |= seqs.input_ids.shape[0] < seqs.num_sequences
    assert checked == trainer.cache.computed == len(trainer.cache.table)
    assert packed and (shared or loss != "dpo")  # rows really hold several sequences; DPO shares prompts
    # the same sequences in another batch are another key: the cache never answers for a layout it did not run
    _, indices = next(trainer.order.planned(0, trainer.total_steps))
    with pytest.raises(RuntimeError, match="reference cache miss"):
        trainer.reference(trainer.make_batch(indices[::-1]).sequences)
    # a second run of the recipe reads everything from disk and trains exactly as the live reference does
    trainer.train()
    again = make(tiny_model_dir, data, tmp_path / "again", **options)
    again.train()
    assert again.reference_forwards == 0
    live = make(tiny_model_dir, data, tmp_path / "live", **{**options, "train.reference_cache": False})
    live.train()
    for run in ("again", "live"):
        a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("run", run))
        assert all(torch.equal(a[k], b[k]) for k in a), run


def test_cache_needs_a_reference_loss(tiny_model_dir, pairs_file, tmp_path):
    with pytest.raises(UserError, match="loss 'simpo' uses no reference model"):
        make(
            tiny_model_dir,
            pairs_file,
            tmp_path / "run",
            **{"loss.name": "simpo", "train.reference_cache": True},
        )


def test_refresh_copies_the_policy_into_the_reference(tiny_model_dir, pairs_file, tmp_path):
    trainer = make(
        tiny_model_dir,
        pairs_file,
        tmp_path / "run",
        **{"loss.name": "dpo", "train.reference_refresh_every": 2, "train.max_steps": 4},
    )
    trainer.train()
    policy = dict(trainer.accelerator.unwrap_model(trainer.policy).model.named_parameters())
    for name, param in trainer.initial_model.named_parameters():
        assert torch.equal(param, policy[name]), name


def test_soft_refresh_moves_part_way(tiny_model_dir, pairs_file, tmp_path):
    trainer = make(
        tiny_model_dir,
        pairs_file,
        tmp_path / "run",
        **{
            "loss.name": "dpo",
            "train.reference_refresh_every": 1,
            "train.reference_refresh_alpha": 0.25,
            "train.max_steps": 1,
        },
    )
    initial = {n: p.clone() for n, p in trainer.initial_model.named_parameters()}
    trainer.train()
    policy = dict(trainer.accelerator.unwrap_model(trainer.policy).model.named_parameters())
    for name, param in trainer.initial_model.named_parameters():
        torch.testing.assert_close(param, 0.75 * initial[name] + 0.25 * policy[name].detach())


def test_refresh_survives_resume(tiny_model_dir, pairs_file, tmp_path):
    options = {
        "loss.name": "dpo",
        "train.reference_refresh_every": 2,
        "train.max_steps": 5,
        "train.save_every": 3,
    }
    make(tiny_model_dir, pairs_file, tmp_path / "straight", **options).train()

    class Stop(Exception):
        pass

    def stop(trainer, result):
        if result.step == 4:
            raise Stop

    broken = Trainer(
        load_config(None, tiny_overrides(tiny_model_dir, pairs_file, tmp_path / "broken", **options)),
        callbacks=[stop],
    )
    with pytest.raises(Stop):
        broken.train()
    make(tiny_model_dir, pairs_file, tmp_path / "broken", **options, **{"train.resume": True}).train()
    a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("straight", "broken"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_padding_free_changes_nothing_but_speed(loss, tiny_model_dir, tmp_path):
    # one completion in three six times as long, so short sequences share a packed row
    rows = unpaired_rows() if loss == "kto" else paired_rows(24)
    for i, row in enumerate(rows):
        for key in ("completion", "chosen", "rejected"):
            if key in row:
                row[key] = (row[key] + " ") * (6 if (i + len(key)) % 3 == 0 else 1)
    data = write_jsonl(tmp_path / "varied.jsonl", rows)
    padded = make(tiny_model_dir, data, tmp_path / "pad", **{"loss.name": loss})
    packed = make(tiny_model_dir, data, tmp_path / "pack", **{"loss.name": loss, "train.padding_free": True})
    if loss == "dpo":  # chosen and rejected share their prompt's forward
        assert packed.make_batch(list(range(8))).sequences.layout.shares_prompts
    for trainer in (padded, packed):
        trainer.metrics, _ = trainer.accumulate_gradients()
    assert packed.metrics["loss"] == pytest.approx(padded.metrics["loss"], abs=1e-6)
    for a, b in zip(padded.policy.parameters(), packed.policy.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    items = padded.data.items[:8]
    pad_id = padded.tokenizer.pad_token_id
    shape = padded.spec.data
    padded_rows = make_batch(items, shape, pad_id, pad).sequences
    packed_rows = make_batch(items, shape, pad_id, pack).sequences
    assert packed_rows.tokens == padded_rows.tokens
    assert packed_rows.input_ids.shape[1] <= padded_rows.input_ids.shape[1]
    assert packed_rows.input_ids.numel() < padded_rows.input_ids.numel()  # less compute on padding
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_logps(padded, packed_rows), sequence_logps(padded, padded_rows), rtol=1e-5, atol=1e-5
        )


def test_pack_fills_rows_first_fit_decreasing():
    prompts = [[1] * 2, [2], [3], [4] * 2]
    completions = [[11] * 3, [12] * 2, [13], [14] * 2]  # lengths 5, 3, 2, 4
    seqs = pack(prompts, completions, pad_id=0)
    # width 5: [seq 0], [seq 3 + 1 pad], [seq 1, seq 2]
    assert seqs.input_ids.tolist() == [[1, 1, 11, 11, 11], [4, 4, 14, 14, 0], [2, 12, 12, 3, 13]]
    assert seqs.sequence_index.tolist() == [[0] * 5, [3, 3, 3, 3, -1], [1, 1, 1, 2, 2]]
    assert seqs.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert seqs.completion_mask.long().tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 0], [0, 1, 1, 0, 1]]
    assert seqs.attention_mask is None and seqs.tokens == 14 and seqs.num_sequences == 4
    wide = pack(prompts, completions, pad_id=0, width=16)  # everything in one row
    assert wide.input_ids.shape == (1, 14)


def test_reference_linears_stored_in_bf16_give_identical_logps():
    from prospect.models.reference import FrozenReference, frozen_copy, store_linears_in_bf16
    from tests.helpers import build_model
    from tests.test_scoring import example_sequences

    model = build_model(64)
    seqs = example_sequences(64)
    want = FrozenReference(model, bf16=True, chunk=0)(seqs)
    reference = frozen_copy(model)
    assert store_linears_in_bf16(reference)
    assert reference.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert reference.lm_head.weight.dtype == torch.float32  # the fp32 head and embeddings are kept
    assert torch.equal(FrozenReference(reference, bf16=True, chunk=0)(seqs), want)
    assert not torch.equal(FrozenReference(model, bf16=False, chunk=0)(seqs), want)  # bf16 really ran


def test_a_model_that_upcasts_a_weight_keeps_its_linears_in_fp32():
    from prospect.models.reference import store_linears_in_bf16
    from tests.helpers import build_model

    model = build_model(64)
    layer = model.model.layers[0].mlp.down_proj

    def upcast(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return torch.nn.functional.linear(x.float(), layer.weight.float())

    layer.forward = upcast
    assert not store_linears_in_bf16(model)
    assert (
        layer.weight.dtype == torch.float32
        and model.model.layers[1].mlp.up_proj.weight.dtype == torch.float32
    )

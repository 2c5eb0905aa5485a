"""Diffusion-DPO on diffusers denoisers: the microbatch loss against the authors' formula, a tiny class-conditional
UNet that learns to prefer the chosen images, outputs that load back in diffusers, a text-conditional latent
UNet (tiny CLIP text encoder and VAE), resume after SIGKILL, two processes against one, and bad image rows."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from prospect.cli import main
from prospect.config import ModelConfig
from prospect.data.images import Geometry, read_image_items
from prospect.engine.factory import make_trainer
from prospect.errors import UserError
from prospect.losses import get_loss
from prospect.losses.base import LossInputs
from prospect.models.denoiser import (
    Conditioner,
    Denoiser,
    denoising_errors,
    load_denoiser,
    new_class_conditional_unet,
    noise_for,
    sample,
)
from prospect.recipe import load_config
from tests.helpers import build_tokenizer, tiny_overrides, write_jsonl
from tests.test_kill_and_scale import accelerate_launch, cli

GEOMETRY = Geometry(8, 1)


def tiny_unet(path: Path, seed: int = 0) -> Path:
    """A class-conditional UNet2DModel for 8x8 grey images of two classes, with a 100-step DDPM schedule."""
    torch.manual_seed(seed)
    return new_class_conditional_unet(path, 8, (8, 16), 2, timesteps=100, schedule="linear")


def bar(vertical: bool, offset: int) -> np.ndarray:
    """An 8x8 image in [0, 1]: a bright bar, across or down, at `offset`."""
    image = np.full((8, 8), 0.1, dtype=np.float32)
    if vertical:
        image[:, offset : offset + 2] = 0.9
    else:
        image[offset : offset + 2, :] = 0.9
    return image


def image_pairs(folder: Path, n: int = 16) -> Path:
    """Pairs whose chosen image is a horizontal bar and rejected a vertical one; half as .npy arrays, half as
    PNG files, a class number as the prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        offset = i % 6
        chosen, rejected = bar(False, offset), bar(True, offset)
        if i % 2:
            np.save(folder / f"c{i}.npy", chosen)
            np.save(folder / f"r{i}.npy", rejected)
            names = (f"c{i}.npy", f"r{i}.npy")
        else:
            for name, image in ((f"c{i}.png", chosen), (f"r{i}.png", rejected)):
                Image.fromarray((image * 255).round().astype(np.uint8), mode="L").save(folder / name)
            names = (f"c{i}.png", f"r{i}.png")
        rows.append({"prompt": str(i % 2), "chosen_image": names[0], "rejected_image": names[1]})
    return write_jsonl(folder / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    return tiny_unet(tmp_path_factory.mktemp("unet"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return image_pairs(tmp_path_factory.mktemp("pairs"))


def overrides(model: Path, data: Path, out: Path, **extra: object) -> list[str]:
    """tiny_overrides with Diffusion-DPO at beta 1000 unless `extra` names another loss."""
    values: dict[str, object] = {"loss.name": "diffusion_dpo", "loss.beta": 1000.0, **extra}
    if values["loss.name"] != "diffusion_dpo":
        del values["loss.beta"]
    return tiny_overrides(model, data, out, **values)


def train(model: Path, data: Path, out: Path, **extra: object) -> Path:
    return make_trainer(load_config(None, overrides(model, data, out, **extra))).train()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_microbatch_loss_is_the_papers_formula(unet_dir, pairs):
    """prospect's errors and loss against the authors' code written out (train.py of
    SalesforceAIResearch/DiffusionDPO): shared noise and timestep, squared error averaged over pixels,
    inside_term = -0.5 * beta * (model_diff - ref_diff), a policy perturbed away from the reference."""
    parts = load_denoiser(ModelConfig(name=str(unet_dir)))
    reference = UNet2DModel.from_pretrained(unet_dir)
    with torch.no_grad():
        for p in parts.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    items = read_image_items(str(pairs), "train", None, True, GEOMETRY)[:4]
    images = torch.cat([torch.stack([load_pixels(it.images[k]) for it in items]) for k in (0, 1)])
    assert images.shape == (8, 1, 8, 8)
    noise, timesteps = noise_for([11, 12, 13, 14], (1, 8, 8), 100)
    noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    labels = torch.tensor([int(it.prompt) for it in items] * 2)
    beta = 700.0

    scheduler = DDPMScheduler.from_pretrained(unet_dir)
    noisy = scheduler.add_noise(images, noise, timesteps)
    with torch.no_grad():
        model_losses = (parts.unet(noisy, timesteps, labels).sample - noise).pow(2).mean(dim=[1, 2, 3])
        ref_losses = (reference(noisy, timesteps, labels).sample - noise).pow(2).mean(dim=[1, 2, 3])
    model_w, model_l = model_losses.chunk(2)
    ref_w, ref_l = ref_losses.chunk(2)
    inside_term = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    expected = -F.logsigmoid(inside_term)

    condition = {"class_labels": labels}
    with torch.no_grad():
        errors = denoising_errors(
            Denoiser(parts.unet, False), parts.scheduler, images, noise, timesteps, condition
        )
        reference_errors = denoising_errors(
            Denoiser(reference, False), parts.scheduler, images, noise, timesteps, condition
        )
    spec = get_loss("diffusion_dpo")
    out = spec.compute(
        LossInputs(policy_errors=errors, reference_errors=reference_errors),
        spec.make_params({"beta": beta}, "test"),
    )
    assert torch.allclose(out.losses, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out.losses, torch.full_like(expected, math.log(2)), atol=1e-3)  # it moved
    accuracy, count = out.means["rewards/accuracy"]
    assert float(accuracy / count) == pytest.approx(float((inside_term > 0).float().mean()))


def load_pixels(source) -> torch.Tensor:
    from prospect.data.images import pixels

    return pixels(source, GEOMETRY)


def pair_gap(model_dir: Path, reference_dir: Path, pairs: Path) -> tuple[float, float]:
    """(mean d_chosen - d_rejected, share of pairs with d_chosen < d_rejected) of a model against a reference
    on the training pairs, each pair at 8 fixed draws of noise and timestep."""
    parts, reference = (
        load_denoiser(ModelConfig(name=str(model_dir))),
        load_denoiser(ModelConfig(name=str(reference_dir))),
    )
    items = read_image_items(str(pairs), "train", None, True, GEOMETRY)
    images = torch.cat([torch.stack([load_pixels(it.images[k]) for it in items]) for k in (0, 1)])
    condition = Conditioner(parts)([it.prompt for it in items] * 2, torch.device("cpu"))
    gaps, wins = [], []
    for draw in range(8):
        noise, timesteps = noise_for([1000 * draw + i for i in range(len(items))], (1, 8, 8), 100)
        noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
        with torch.no_grad():
            e = denoising_errors(
                Denoiser(parts.unet, False), parts.scheduler, images, noise, timesteps, condition
            )
            r = denoising_errors(
                Denoiser(reference.unet, False), parts.scheduler, images, noise, timesteps, condition
            )
        d_c, d_r = (e - r).chunk(2)
        gaps.append((d_c - d_r).mean())
        wins.append((d_c < d_r).float().mean())
    return float(torch.stack(gaps).mean()), float(torch.stack(wins).mean())


def test_a_tiny_unet_learns_to_prefer_the_chosen_images(unet_dir, pairs, tmp_path):
    """30 steps of Diffusion-DPO: the loss starts at ln 2 (policy = reference), falls, and the policy denoises
    the chosen images better than the rejected ones relative to the reference; the final model reloads in
    diffusers, with its scheduler, and samples."""
    final = train(unet_dir, pairs, tmp_path / "run", **{"train.max_steps": 30})
    lines = metrics(tmp_path / "run")
    assert [m["step"] for m in lines] == list(range(1, 31))
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert np.mean([m["loss"] for m in lines[-5:]]) < math.log(2) - 0.1
    assert np.mean([m["rewards/accuracy"] for m in lines[-5:]]) > 0.7
    assert "images_per_s" in lines[-1] and "gap" in lines[-1]
    gap, preferred = pair_gap(final, unet_dir, pairs)
    assert gap < 0 and preferred > 0.75

    unet = UNet2DModel.from_pretrained(final)  # diffusers' own loader, safetensors only
    assert (final / "diffusion_pytorch_model.safetensors").is_file()
    assert DDPMScheduler.from_pretrained(final).config.num_train_timesteps == 100
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step-000030" / "model.safetensors"))
    assert all(torch.equal(trained[f"unet.{k}"], v) for k, v in unet.state_dict().items())
    initial = UNet2DModel.from_pretrained(unet_dir).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in unet.state_dict().items())
    parts = load_denoiser(ModelConfig(name=str(final)))
    images = sample(
        parts, Denoiser(parts.unet, False), {"class_labels": torch.tensor([0, 1])}, [1, 2], steps=5
    )
    assert images.shape == (2, 1, 8, 8) and images.abs().max() <= 1


def test_sft_on_winners_trains_on_the_chosen_images_only(unet_dir, pairs, tmp_path):
    """diffusion_sft on the pair file: one image per pair, its plain denoising error; no reference."""
    train(unet_dir, pairs, tmp_path / "run", **{"loss.name": "diffusion_sft", "train.max_steps": 2})
    first = metrics(tmp_path / "run")[0]
    assert set(first) >= {"loss", "error", "images_per_s"} and "gap" not in first
    assert first["loss"] == pytest.approx(first["error"])


def tiny_text_pipeline(path: Path) -> Path:
    """Stable Diffusion's layout in miniature: a UNet2DConditionModel on a VAE's 4x4x4 latents of 8x8 RGB
    images, a CLIP text encoder and a BPE tokenizer, and a DDPM scheduler; a README the output must keep."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 12
    tokenizer.save_pretrained(path / "tokenizer")
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=12, **text))
    encoder.save_pretrained(path / "text_encoder")
    encode, decode = ("DownEncoderBlock2D",) * 2, ("UpDecoderBlock2D",) * 2
    vae = {"block_out_channels": (8, 8), "latent_channels": 4, "norm_num_groups": 4, "sample_size": 8}
    AutoencoderKL(down_block_types=encode, up_block_types=decode, **vae).save_pretrained(path / "vae")
    blocks = {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "block_out_channels": (8, 16)}
    blocks |= {"up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "layers_per_block": 1}
    attention = {"cross_attention_dim": 16, "attention_head_dim": 4, "norm_num_groups": 4}
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, **blocks, **attention)
    unet.save_pretrained(path / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(path / "scheduler")
    (path / "README.md").write_text("a tiny pipeline\n")
    return path


def test_a_text_conditioned_latent_unet_trains_and_saves_its_pipeline(tmp_path):
    model = tiny_text_pipeline(tmp_path / "pipeline")
    rows = []
    for i in range(8):
        for side, value in (("chosen", 230), ("rejected", 20)):
            Image.new("RGB", (12 + i, 10), (value, 255 - value, 128)).save(tmp_path / f"{side}{i}.png")
        rows.append(
            {
                "prompt": f"Review the {'space movie' if i % 2 else 'thriller'}.",
                "chosen_image": f"chosen{i}.png",
                "rejected_image": f"rejected{i}.png",
            }
        )
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    final = train(model, data, tmp_path / "run", **{"train.max_steps": 2})
    assert metrics(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    unet = UNet2DConditionModel.from_pretrained(final / "unet")
    before = UNet2DConditionModel.from_pretrained(model / "unet").state_dict()
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert {p.name for p in final.iterdir()} >= {"unet", "scheduler", "text_encoder", "tokenizer", "vae"}
    assert load_file(str(final / "vae" / "diffusion_pytorch_model.safetensors")).keys()
    parts = load_denoiser(ModelConfig(name=str(final)))
    condition = Conditioner(parts)(["Review the thriller."], torch.device("cpu"))
    assert sample(parts, Denoiser(parts.unet, False), condition, [3], steps=3).shape == (1, 3, 8, 8)


KILLED = {"train.max_steps": 5, "train.save_every": 1, "train.keep_last": 2}


@pytest.fixture(scope="module")
def straight(unet_dir, pairs, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of the uninterrupted run every killed run must reproduce."""
    run = tmp_path_factory.mktemp("straight") / "run"
    done = cli(overrides(unet_dir, pairs, run, **KILLED))
    assert done.returncode == 0, done.stderr
    return load_file(str(run / "final" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("fault", ["step:3", "checkpoint-write:2"])
def test_sigkill_resumes_bit_identically(fault, straight, unet_dir, pairs, tmp_path):
    options = KILLED
    run = tmp_path / "run"
    killed = cli(overrides(unet_dir, pairs, run, **options), env={"PROSPECT_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL
    resumed = cli(overrides(unet_dir, pairs, run, **options, **{"train.resume": True}))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    resumed_weights = load_file(str(run / "final" / "diffusion_pytorch_model.safetensors"))
    assert resumed_weights.keys() == straight.keys()
    assert all(torch.equal(resumed_weights[k], v) for k, v in straight.items())
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5]


def test_two_processes_match_one(unet_dir, pairs, tmp_path):
    """Global batch 4: 2 processes x 2 pairs, against 1 process x 2 pairs x 2 accumulation steps."""
    options = {"train.batch_size": 2, "train.max_steps": 3}
    one = cli(overrides(unet_dir, pairs, tmp_path / "one", **options, **{"train.grad_accum": 2}))
    assert one.returncode == 0, one.stderr
    two = cli(
        overrides(unet_dir, pairs, tmp_path / "two", **options), launcher=accelerate_launch("cpu_2proc.yaml")
    )
    assert two.returncode == 0, two.stderr
    assert "2 x 1 accum x 2 proc MULTI_CPU" in two.stdout
    for m1, m2 in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
        assert m1["gap"] == pytest.approx(m2["gap"], abs=1e-7)
    name = "diffusion_pytorch_model.safetensors"
    a, b = (load_file(str(tmp_path / r / "final" / name)) for r in ("one", "two"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.parametrize(
    "row, error",
    [
        (
            {"prompt": "1", "chosen_image": "c0.png"},
            "{data}:2: no field 'rejected_image'; expected images in 'chosen_image' and 'rejected_image'",
        ),
        (
            {"prompt": "1", "chosen_image": "c0.png", "rejected_image": "gone.png"},
            "{data}:2: field 'rejected_image': no such file {dir}/gone.png",
        ),
        (
            {"prompt": "1", "chosen_image": "c0.png", "rejected_image": "pairs.jsonl"},
            "{data}:2: field 'rejected_image': {dir}/pairs.jsonl is not a readable image",
        ),
        (
            {"prompt": "1", "chosen_image": "c0.png", "rejected_image": [[0.5] * 4] * 4},
            "{data}:2: field 'rejected_image': expected a 8x8 image with 1 channel(s) (the model's), got shape [4, 4]",
        ),
        (
            {"prompt": "1", "chosen_image": "c0.png", "rejected_image": [[2.0] * 8] * 8},
            "{data}:2: field 'rejected_image': expected pixel values as floats in [0, 1], got values from 2.0 to 2.0",
        ),
        (
            {"prompt": "1", "chosen_image": "c0.png", "rejected_image": 7},
            "{data}:2: field 'rejected_image': expected an image: a path to an image or .npy file, or an array, got 7",
        ),
        (
            {"prompt": "7", "chosen_image": "c0.png", "rejected_image": "r0.png"},
            "{data}:2: field 'prompt': expected a class number from 0 to 1 (the model is class-conditional), got '7'",
        ),
    ],
    ids=[
        "missing field",
        "missing file",
        "not an image",
        "wrong size",
        "out of range",
        "not an image value",
        "unknown class",
    ],
)
def test_a_bad_image_row_is_one_line_naming_it(row, error, unet_dir, pairs, tmp_path, capsys):
    folder = pairs.parent
    data = folder / f"bad-{tmp_path.name}.jsonl"
    write_jsonl(data, [json.loads(pairs.read_text().splitlines()[0]), row])
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *overrides(unet_dir, data, tmp_path / "run")])
    err = capsys.readouterr().err
    data.unlink()
    assert exit_info.value.code == 2
    expected = "error: " + error.format(data=data, dir=folder)
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_image_files_and_arrays_read_to_the_same_pixels(pairs, tmp_path):
    """A PNG and an .npy of the same image read to the same [-1, 1] pixels (up to the PNG's 8 bits); single
    images come from 'image', or a pair's 'chosen_image'."""
    items = read_image_items(str(pairs), "train", None, True, GEOMETRY)
    png, npy = load_pixels(items[0].images[0]), load_pixels(items[1].images[0])  # rows 0 and 1: offsets 0, 1
    assert png.shape == npy.shape == (1, 8, 8)
    assert torch.allclose(png, torch.from_numpy(bar(False, 0))[None] * 2 - 1, atol=1 / 255)
    assert torch.allclose(npy, torch.from_numpy(bar(False, 1))[None] * 2 - 1)
    singles = read_image_items(str(pairs), "train", None, False, GEOMETRY)
    assert [len(it.images) for it in singles] == [1] * 16 and singles[1].images[0] is not None
    assert torch.equal(load_pixels(singles[1].images[0]), npy)
    data = write_jsonl(tmp_path / "single.jsonl", [{"prompt": "0", "picture": str(pairs.parent / "c0.png")}])
    with pytest.raises(UserError, match=r"single.jsonl:1: no field 'image'; expected an image in 'image'"):
        read_image_items(str(data), "train", None, False, GEOMETRY)

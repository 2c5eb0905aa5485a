"""Denoisers from diffusers: a UNet with its noise scheduler, for Diffusion-DPO and supervised fine-tuning.

`model.name` is a local diffusers directory, in one of two layouts:
- a UNet folder (`UNet2DModel.save_pretrained`) with the scheduler's `scheduler_config.json` beside it: an
  unconditional UNet2DModel, or a class-conditional one (`num_class_embeds`) whose prompts are class numbers;
- a pipeline folder (Stable Diffusion's): `unet/` and `scheduler/`, with `text_encoder/` and `tokenizer/` for
  a UNet2DConditionModel (prompts are texts) and `vae/` for a latent model.

Any UNet with diffusers' call `unet(x_t, t, class_labels=... | encoder_hidden_states=...).sample` works.
Training noises images with the scheduler's own schedule (`add_noise`); sampling uses DDIM on the same schedule.
The trained model is saved in the layout it came in, so it loads back with `from_pretrained`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prospect.config import ModelConfig
from prospect.data.images import Geometry
from prospect.errors import UserError
from prospect.models.reference import frozen

UNETS = ("UNet2DModel", "UNet2DConditionModel")
PREDICTIONS = ("epsilon", "v_prediction")
FOLDER_HELP = (
    "expected a local diffusers directory: a UNet folder with its scheduler_config.json, or a pipeline "
    "folder with unet/ and scheduler/ (download one with `hf download REPO --local-dir DIR`)"
)


@dataclass
class DenoiserParts:
    unet: Any  # diffusers ModelMixin
    scheduler: Any  # a DDPMScheduler on the model's noise schedule
    root: Path
    pipeline: bool  # the pipeline layout (unet/, scheduler/, ...) rather than one UNet folder
    text_encoder: Any = None
    tokenizer: Any = None
    vae: Any = None


def locate(name: str) -> tuple[Path, bool]:
    """(the model directory, whether it is in the pipeline layout)."""
    root = Path(name).expanduser()
    if (root / "unet" / "config.json").is_file():
        return root, True
    if (root / "config.json").is_file():
        return root, False
    raise UserError(f"model.name={name}: {FOLDER_HELP}")


def unet_config(root: Path, pipeline: bool) -> dict[str, Any]:
    config = json.loads(((root / "unet") if pipeline else root).joinpath("config.json").read_text())
    if config.get("_class_name") not in UNETS:
        raise UserError(
            f"{root}: a {config.get('_class_name')}; expected a denoiser of class {' or '.join(UNETS)}"
        )
    return config


def geometry_of(name: str) -> Geometry:
    """The pixel images the model takes, read from its config files alone (nothing is loaded)."""
    root, pipeline = locate(name)
    config = unet_config(root, pipeline)
    size = config["sample_size"]
    size = size if isinstance(size, int) else size[0]
    vae_config = root / "vae" / "config.json"
    if pipeline and vae_config.is_file():
        vae = json.loads(vae_config.read_text())
        return Geometry(size * 2 ** (len(vae["block_out_channels"]) - 1), vae["in_channels"])
    return Geometry(size, config["in_channels"])


def load_denoiser(cfg: ModelConfig) -> DenoiserParts:
    """The UNet in fp32, its scheduler as a DDPMScheduler, and in the pipeline layout its frozen text encoder,
    tokenizer and VAE."""
    try:
        import diffusers
        from diffusers import AutoencoderKL, DDPMScheduler
    except ImportError:
        raise UserError('denoisers need diffusers: pip install -e ".[diffusion]"') from None
    root, pipeline = locate(cfg.name)
    config = unet_config(root, pipeline)
    if config.get("addition_embed_type"):
        raise UserError(
            f"{root}: added conditions ({config['addition_embed_type']}, as SDXL's) are not supported"
        )
    safe = None if cfg.allow_pickle else True
    unet_class = getattr(diffusers, config["_class_name"])
    unet = unet_class.from_pretrained(root / "unet" if pipeline else root, use_safetensors=safe).float()
    scheduler_dir = root / "scheduler" if pipeline else root
    if not (scheduler_dir / "scheduler_config.json").is_file():
        raise UserError(f"{scheduler_dir}: no scheduler_config.json; {FOLDER_HELP}")
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(scheduler_dir))
    if scheduler.config.prediction_type not in PREDICTIONS:
        raise UserError(
            f"{scheduler_dir}: prediction_type {scheduler.config.prediction_type}; expected {' or '.join(PREDICTIONS)}"
        )
    parts = DenoiserParts(unet, scheduler, root, pipeline)
    if pipeline and (root / "text_encoder").is_dir():
        from transformers import AutoModel, AutoTokenizer

        parts.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        parts.text_encoder = frozen(AutoModel.from_pretrained(root / "text_encoder", use_safetensors=safe))
    if pipeline and (root / "vae").is_dir():
        parts.vae = frozen(AutoencoderKL.from_pretrained(root / "vae", use_safetensors=safe))
    if config["_class_name"] == "UNet2DConditionModel" and parts.text_encoder is None:
        raise UserError(f"{root}: a UNet2DConditionModel needs text_encoder/ and tokenizer/ beside unet/")
    return parts


class Conditioner:
    """A prompt as the UNet's condition: a class number (a UNet2DModel with class embeddings), a text
    encoder's hidden states (a UNet2DConditionModel), or nothing (an unconditional UNet2DModel)."""

    def __init__(self, parts: DenoiserParts):
        self.text_encoder, self.tokenizer = parts.text_encoder, parts.tokenizer
        self.classes: int | None = None
        if self.text_encoder is None and getattr(parts.unet, "class_embedding", None) is not None:
            self.classes = parts.unet.config.num_class_embeds
            if self.classes is None:
                raise UserError(
                    f"{parts.root}: class_embed_type {parts.unet.config.class_embed_type}; expected class "
                    "embeddings by number (num_class_embeds)"
                )

    def check(self, prompt: str, location: str) -> None:
        if self.classes is not None and not (prompt.isdigit() and int(prompt) < self.classes):
            raise UserError(
                f"{location}: field 'prompt': expected a class number from 0 to {self.classes - 1} (the model "
                f"is class-conditional), got {prompt!r}"
            )

    def __call__(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        if self.classes is not None:
            return {"class_labels": torch.tensor([int(p) for p in prompts], device=device)}
        if self.text_encoder is None:
            return {}
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        with torch.no_grad():
            return {"encoder_hidden_states": self.text_encoder(ids)[0]}


class Denoiser(nn.Module):
    """eps_model(x_t, t, c) (or v): the UNet's prediction in fp32, computed under bf16 autocast when asked."""

    def __init__(self, unet: nn.Module, bf16: bool):
        super().__init__()
        self.unet, self.bf16 = unet, bf16

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        with torch.autocast(noisy.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.unet(noisy, timesteps, **condition).sample.float()


def to_model_space(parts: DenoiserParts, images: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] as the UNet sees them: themselves, or a VAE's latents (their mean, scaled)."""
    if parts.vae is None:
        return images
    with torch.no_grad():
        return parts.vae.encode(images).latent_dist.mode() * parts.vae.config.scaling_factor


def noise_for(seeds: list[int], shape: tuple[int, ...], timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise [n, *shape], timesteps [n]): each row drawn from its own seed, uniform over the schedule, so a
    row's noise does not depend on which process draws it or on what was drawn before."""
    noise, steps = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        steps.append(torch.randint(0, timesteps, (1,), generator=generator))
        noise.append(torch.randn(shape, generator=generator))
    return torch.stack(noise), torch.cat(steps)


def denoising_errors(
    model: nn.Module,
    scheduler: Any,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    condition: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Each row's mean over its values of (target - model(x_t, t, c))^2, x_t noised with `noise` at
    `timesteps`; the target is the noise (epsilon prediction) or the velocity (v-prediction)."""
    noisy = scheduler.add_noise(clean, noise, timesteps)
    epsilon = scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else scheduler.get_velocity(clean, noise, timesteps)
    prediction = model(noisy, timesteps, condition)
    return (prediction - target.float()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def sample(
    parts: DenoiserParts,
    model: nn.Module,
    condition: dict[str, torch.Tensor],
    seeds: list[int],
    steps: int = 25,
) -> torch.Tensor:
    """Images in [-1, 1], [n, C, H, W], by DDIM (eta 0) on the model's schedule, each from its seed's noise."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(parts.scheduler.config)
    ddim.set_timesteps(steps)
    config = parts.unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    shape = (config.in_channels, size, size)
    device = next(model.parameters()).device
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(
        device
    )
    x = x * ddim.init_noise_sigma
    for t in ddim.timesteps:
        x = ddim.step(model(x, t.expand(len(seeds)).to(device), condition), t, x).prev_sample
    if parts.vae is not None:
        x = parts.vae.decode(x / parts.vae.config.scaling_factor).sample
    return x.clamp(-1, 1)


def new_class_conditional_unet(
    directory: Path, resolution: int, channels: tuple[int, int], classes: int, timesteps: int, schedule: str
) -> Path:
    """A randomly initialised (from torch's seed) class-conditional UNet2DModel of grey images, two blocks of
    `channels`, saved with a DDPM scheduler of `timesteps` steps and beta `schedule` as a UNet folder."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet: Any = UNet2DModel(  # diffusers' lazy modules hide save_pretrained from mypy
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=classes,
    )
    unet.save_pretrained(directory)
    scheduler: Any = DDPMScheduler(num_train_timesteps=timesteps, beta_schedule=schedule)
    scheduler.save_pretrained(directory)
    return directory


def save_denoiser(parts: DenoiserParts, unet: Any, directory: Path) -> None:
    """The trained UNet (safetensors) in the layout the model came in, with everything else it came with
    copied unchanged: a UNet folder with scheduler_config.json, or the whole pipeline with a new unet/."""
    directory.mkdir(parents=True, exist_ok=True)
    if parts.pipeline:
        for entry in parts.root.iterdir():
            if entry.name == "unet":
                continue
            if entry.is_dir():
                shutil.copytree(entry, directory / entry.name)
            else:
                shutil.copy2(entry, directory / entry.name)
    else:
        shutil.copy2(parts.root / "scheduler_config.json", directory / "scheduler_config.json")
    unet.save_pretrained(directory / "unet" if parts.pipeline else directory, safe_serialization=True)

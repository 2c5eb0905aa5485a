"""Image preference data for denoisers: pairs `{prompt, chosen_image, rejected_image}`, or single images
`{prompt, image}` (the SFT baseline takes a pair's chosen image).

Rows come from any source `data/sources.py` reads (a JSONL, JSON, Parquet or CSV file, a `datasets`
directory, a hub dataset). An image is a path to an image file (PNG, JPEG, ... as Pillow reads them) or a
.npy array, relative to the data file's folder; a `datasets` Image feature; or an array (nested lists). Arrays
are [H, W] or channels-last [H, W, C]: integers are pixel values 0-255, floats are in [0, 1] (diffusers'
`output_type="np"`), and they must have the model's resolution; image files are resized and centre-cropped to
it. Every image is checked as its row is read, each bad one with a one-line error naming the row and field;
pixels are decoded again per microbatch, so a large image set never sits in memory.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from prospect.data.row import Row
from prospect.data.sources import read_rows
from prospect.errors import UserError, field_error, first_line

ImageSource = Path | Image.Image | np.ndarray
PAIR_FIELDS = ("chosen_image", "rejected_image")


@dataclass
class ImageItem:
    location: str
    prompt: str
    images: tuple[ImageSource, ...]  # (chosen, rejected) of a pair, or one image


@dataclass(frozen=True)
class Geometry:
    """What the model takes: images of `resolution` x `resolution` pixels with `channels` channels."""

    resolution: int
    channels: int


def read_image_items(
    spec: str, split: str, subset: str | None, pairs: bool, geometry: Geometry, limit: int = 0
) -> list[ImageItem]:
    """The rows of `spec` as image pairs (`pairs`) or single images, each image checked."""
    rows = read_rows(spec, split, subset)
    rows = rows[:limit] if limit else rows
    folder = Path(spec).parent if Path(spec).is_file() else Path.cwd()
    return [image_item(row, pairs, folder, geometry) for row in rows]


def image_item(row: Row, pairs: bool, folder: Path, geometry: Geometry) -> ImageItem:
    values = row.values
    if pairs:
        names: tuple[str, ...] = PAIR_FIELDS
    else:
        names = ("image",) if "image" in values or "chosen_image" not in values else ("chosen_image",)
    for name in names:
        if values.get(name) is None:
            wanted = "images in 'chosen_image' and 'rejected_image'" if pairs else "an image in 'image'"
            raise UserError(f"{row.location}: no field '{name}'; expected {wanted}")
    prompt = values.get("prompt", "")
    if not isinstance(prompt, (str, int)) or isinstance(prompt, bool):
        raise field_error(row.location, "prompt", "a text or a class number", prompt)
    images = tuple(image_source(values[n], row.location, n, folder, geometry) for n in names)
    return ImageItem(row.location, str(prompt), images)


def image_source(value: Any, location: str, name: str, folder: Path, geometry: Geometry) -> ImageSource:
    """`value` checked as an image of this geometry: a file path (kept, decoded per batch), a decoded image
    or an array (kept in memory)."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes):  # a `datasets` Image, undecoded
        verify(io.BytesIO(value["bytes"]), location, name, "the image bytes")
        value = Image.open(io.BytesIO(value["bytes"]))
        value.load()
    if isinstance(value, str):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise UserError(f"{location}: field '{name}': no such file {path}")
        if path.suffix.lower() == ".npy":
            return checked_array(
                read_npy(path, location, name), f"{location}: field '{name}' ({path})", geometry
            )
        verify(path, location, name, str(path))
        return path
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (list, np.ndarray)):
        return checked_array(array_of(value, location, name), f"{location}: field '{name}'", geometry)
    raise field_error(location, name, "an image: a path to an image or .npy file, or an array", value)


def verify(file: Path | io.BytesIO, location: str, name: str, what: str) -> None:
    """An image file's header and data read and checked, without decoding it."""
    try:
        with Image.open(file) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(
            f"{location}: field '{name}': {what} is not a readable image ({first_line(exc)})"
        ) from None


def read_npy(path: Path, location: str, name: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(
            f"{location}: field '{name}': {path} is not a readable .npy array ({first_line(exc)})"
        ) from None


def array_of(value: Any, location: str, name: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except ValueError:  # ragged nested lists
        raise field_error(location, name, "an array of equal rows", value) from None


def checked_array(array: np.ndarray, where: str, geometry: Geometry) -> np.ndarray:
    """An [H, W] or [H, W, C] array of pixel values 0-255 (integers) or in [0, 1] (floats), of the model's
    resolution and channels."""
    r, c = geometry.resolution, geometry.channels
    if array.dtype.kind not in "iuf":
        raise UserError(f"{where}: expected numbers (pixel values), got an array of {array.dtype}")
    if array.ndim not in (2, 3):
        raise UserError(
            f"{where}: expected an [H, W] or [H, W, C] image array, got shape {list(array.shape)}"
        )
    channels = 1 if array.ndim == 2 else array.shape[2]
    if array.shape[:2] != (r, r) or channels != c:
        raise UserError(
            f"{where}: expected a {r}x{r} image with {c} channel(s) (the model's), got shape {list(array.shape)}"
        )
    high = 255 if array.dtype.kind in "iu" else 1
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > high:
        scale = "integers 0-255" if high == 255 else "floats in [0, 1]"
        raise UserError(
            f"{where}: expected pixel values as {scale}, got values from {array.min()} to {array.max()}"
        )
    return array


def pixels(source: ImageSource, geometry: Geometry) -> torch.Tensor:
    """One image as a [C, H, W] float tensor in [-1, 1], the range denoisers are trained on."""
    if isinstance(source, np.ndarray):
        values = source.astype(np.float32) / (255.0 if source.dtype.kind in "iu" else 1.0)
    else:
        with Image.open(source) if isinstance(source, Path) else nullcontext(source) as image:
            converted = image.convert("L" if geometry.channels == 1 else "RGB")
        values = np.asarray(fitted(converted, geometry.resolution), dtype=np.float32) / 255.0
    if values.ndim == 2:
        values = values[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1))) * 2 - 1


def fitted(image: Image.Image, size: int) -> Image.Image:
    """Resized so its shorter side is `size`, then centre-cropped to a square (as diffusers' training scripts do)."""
    if image.size == (size, size):
        return image
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def pixel_batch(items: list[ImageItem], geometry: Geometry) -> torch.Tensor:
    """[rows, C, H, W]: every item's first image, then every item's second (pairs: chosen rows first)."""
    count = len(items[0].images)
    return torch.stack([pixels(item.images[k], geometry) for k in range(count) for item in items])

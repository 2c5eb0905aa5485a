"""Evaluating a class-conditional denoiser of handwritten digits (scikit-learn's 8x8 digits), and the AI
feedback that aligns it.

The 1,797 digits are split, by a seeded shuffle, into disjoint parts: the images the denoiser is pretrained on;
the labeller's training set (a logistic regression, whose probability of the requested digit decides which of
two samples is preferred); the judge's (an RBF support-vector classifier, another model family, never used
for labels); and held-out digits the samples are compared with.

- prompt alignment: the share of samples the judge classifies as the requested digit, with its standard
  error;
- fidelity and diversity: per class, the Frechet distance between the samples and the held-out digits of that
  class in a PCA feature space fit on the judge's images (mean and covariance, so a collapse onto a few
  prototypes raises it), and the samples' spread (the root of their covariance's trace over the real digits').
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

from prospect.config import ModelConfig
from prospect.models.denoiser import Conditioner, Denoiser, load_denoiser, sample

PARTS = ("pretrain", "labeller", "judge", "held_out")
MAX_PIXEL = 16.0  # the digits' pixel values run from 0 to 16


@dataclass
class DigitSplits:
    images: dict[str, np.ndarray]  # part -> [n, 8, 8], values 0-16
    labels: dict[str, np.ndarray]


def split_digits(sizes: dict[str, int], seed: int) -> DigitSplits:
    """Disjoint parts of the digits, in the order of PARTS; the last takes what is left when its size is 0."""
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    start = 0
    for part in PARTS:
        stop = start + sizes[part] if sizes.get(part) else len(order)
        images[part], labels[part] = digits.images[order[start:stop]], digits.target[order[start:stop]]
        start = stop
    return DigitSplits(images, labels)


def flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1)


def fit_labeller(splits: DigitSplits) -> LogisticRegression:
    return LogisticRegression(max_iter=2000).fit(flat(splits.images["labeller"]), splits.labels["labeller"])


def fit_judge(splits: DigitSplits) -> SVC:
    return SVC(kernel="rbf", gamma="scale", C=10.0).fit(flat(splits.images["judge"]), splits.labels["judge"])


def fit_features(splits: DigitSplits, components: int = 16) -> PCA:
    return PCA(components, random_state=0).fit(flat(splits.images["judge"]))


def labeller_probabilities(
    labeller: Any, first: np.ndarray, second: np.ndarray, digits: np.ndarray
) -> np.ndarray:
    """[n, 2]: the labeller's probability of each pair's requested digit for its first and second sample; the
    sample with the higher one is preferred (AI feedback)."""
    columns = {label: i for i, label in enumerate(labeller.classes_)}
    rows = np.arange(len(digits))
    wanted = np.array([columns[d] for d in digits])
    return np.stack(
        [labeller.predict_proba(flat(images))[rows, wanted] for images in (first, second)], axis=1
    )


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fit to two sets of feature vectors."""
    mean = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(mean @ mean + np.trace(cov_a + cov_b - 2 * root))


@dataclass
class DigitsResult:
    samples: int
    alignment: float  # share of samples the judge reads as the requested digit
    alignment_stderr: float
    frechet: float  # mean over classes
    spread: float  # mean over classes: sqrt(trace cov(samples) / trace cov(real))
    per_class_alignment: list[float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_digits(
    images: np.ndarray, digits: np.ndarray, judge: Any, features: PCA, splits: DigitSplits
) -> DigitsResult:
    """Samples [n, 8, 8] (values 0-16) for the requested `digits`, judged and compared with held-out digits."""
    right = judge.predict(flat(images)) == digits
    share = float(right.mean())
    real, real_labels = features.transform(flat(splits.images["held_out"])), splits.labels["held_out"]
    mine = features.transform(flat(images))
    distances, spreads, per_class = [], [], []
    for digit in range(10):
        ours, theirs = mine[digits == digit], real[real_labels == digit]
        distances.append(frechet(ours, theirs))
        spreads.append(
            math.sqrt(np.trace(np.cov(ours, rowvar=False)) / np.trace(np.cov(theirs, rowvar=False)))
        )
        per_class.append(float(right[digits == digit].mean()))
    return DigitsResult(
        samples=len(images),
        alignment=share,
        alignment_stderr=math.sqrt(share * (1 - share) / len(images)),
        frechet=float(np.mean(distances)),
        spread=float(np.mean(spreads)),
        per_class_alignment=per_class,
    )


def generate(
    model_dir: Path, digits: list[int], seeds: list[int], steps: int, batch_size: int = 256
) -> np.ndarray:
    """Samples of a class-conditional denoiser, one per (digit, seed), by DDIM: [n, H, W], values 0-16."""
    parts = load_denoiser(ModelConfig(name=str(model_dir)))
    model = Denoiser(parts.unet, bf16=False).eval()
    conditioner = Conditioner(parts)
    out = []
    for start in range(0, len(digits), batch_size):
        prompts = [str(d) for d in digits[start : start + batch_size]]
        condition = conditioner(prompts, torch.device("cpu"))
        images = sample(parts, model, condition, seeds[start : start + batch_size], steps)
        out.append(((images[:, 0] + 1) / 2 * MAX_PIXEL).numpy())
    return np.concatenate(out)


def save_grid(panels: dict[str, np.ndarray], path: Path, columns: int) -> Path:
    """One panel per model: row d holds `columns` samples of digit d (each panel's images digit-major)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for axis, (title, images) in zip(np.atleast_1d(axes), panels.items()):
        size = images.shape[-1]
        rows = images[: 10 * columns].reshape(10, columns, size, size)
        axis.imshow(
            rows.transpose(0, 2, 1, 3).reshape(10 * size, columns * size), cmap="gray_r", vmin=0, vmax=16
        )
        axis.set_title(title, fontsize=10)
        axis.set_yticks([size * (d + 0.5) for d in range(10)], [str(d) for d in range(10)], fontsize=7)
        axis.set_xticks([])
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path

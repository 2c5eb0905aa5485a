"""The digits experiment of docs/diffusion.md: Diffusion-DPO against SFT on the preferred images, from nothing.

1. scikit-learn's 1,797 8x8 digits are split into disjoint parts (prospect.evaluation.digits): pretraining
   images, the labeller's, the judge's and held-out digits.
2. A small class-conditional UNet2DModel (the digit is the prompt) is initialised at random and pretrained
   briefly with the plain denoising loss (recipes/diffusion_pretrain_digits.yaml), so it is imperfect.
3. AI feedback: for each digit, pairs of the model's own samples; a logistic regression (the labeller) prefers
   the sample it finds more clearly the requested digit (runs/digits-diffusion/pairs.jsonl, PNG files).
4. Diffusion-DPO (recipes/diffusion_dpo_digits.yaml) and SFT on the preferred samples
   (recipes/diffusion_sft_digits.yaml), at the same steps and batch, each at three settings (DPO's beta, SFT's
   learning rate); each method's setting is the one whose samples on validation seeds the labeller (the
   training signal) reads as the requested digit most often. The judge chooses nothing.
5. Each model's samples on held-out seeds, judged by an RBF support-vector classifier trained on a disjoint split
   (never used for labels): prompt alignment with its standard error, the per-class Frechet distance to
   held-out digits in a PCA feature space, the samples' spread, and a grid of samples.

Run from the repository root (one CPU thread, about 20 minutes):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/digits_diffusion.py --figure docs/images/diffusion_digits.png
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from prospect.engine.factory import make_trainer
from prospect.evaluation.digits import (
    MAX_PIXEL,
    DigitsResult,
    evaluate_digits,
    fit_features,
    fit_judge,
    fit_labeller,
    flat,
    generate,
    labeller_probabilities,
    save_grid,
    split_digits,
)
from prospect.io import write_text_atomic
from prospect.models.denoiser import new_class_conditional_unet
from prospect.recipe import load_config
from prospect.report.markup import esc, figure, num, table, text
from prospect.report.page import html_document

SIZES = {"pretrain": 800, "labeller": 300, "judge": 400, "held_out": 0}  # held_out: the other 297
# The pairs' samples, the evaluation's and the validation's (choosing each method's setting) never share noise.
PAIR_SEEDS, EVAL_SEEDS, VALIDATION_SEEDS = 1_000_000, 2_000_000, 3_000_000
# Each method's setting is chosen from a grid of the same size, by the labeller (the training signal) on
# validation seeds: the judge never chooses anything.
GRIDS = {
    "dpo": ("diffusion_dpo_digits", "loss.beta", (500.0, 1000.0, 2000.0)),
    "sft": ("diffusion_sft_digits", "train.learning_rate", (3e-5, 1e-4, 3e-4)),
}


def write_png(image: np.ndarray, path: Path) -> str:
    """A digit (values 0-16) as an 8-bit grey PNG; returns its path relative to the data folder."""
    pixels = np.clip(np.round(image / MAX_PIXEL * 255), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path)
    return str(path.relative_to(path.parent.parent))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train(recipe: str, out: Path, stage: str, **options: object) -> Path:
    """Run a shipped recipe with its paths under `out`; returns the final model's directory."""
    overrides = [f"train.output_dir={out / stage}", "train.overwrite=true"]
    overrides += [f"{key.replace('__', '.')}={value}" for key, value in options.items()]
    return make_trainer(load_config(recipe, overrides)).train()


def sample_pairs(model: Path, out: Path, per_digit: int, steps: int, labeller: object, judge: object) -> dict:
    """Two samples per prompt, `per_digit` prompts per digit; the labeller's preferred one is chosen."""
    digits = np.repeat(np.arange(10), per_digit)
    seeds = [PAIR_SEEDS + 2 * i for i in range(len(digits))]
    first = generate(model, digits.tolist(), seeds, steps)
    second = generate(model, digits.tolist(), [s + 1 for s in seeds], steps)
    probabilities = labeller_probabilities(labeller, first, second, digits)
    folder = out / "images"
    rows, right = [], np.zeros(2)
    for i, digit in enumerate(digits):
        order = (first[i], second[i]) if probabilities[i, 0] >= probabilities[i, 1] else (second[i], first[i])
        right += judge.predict(np.stack(order).reshape(2, -1)) == digit
        rows.append(
            {
                "prompt": str(digit),
                "chosen_image": write_png(order[0], folder / f"pair-{i:05d}-chosen.png"),
                "rejected_image": write_png(order[1], folder / f"pair-{i:05d}-rejected.png"),
                "labeller": sorted(probabilities[i].round(4).tolist(), reverse=True),
            }
        )
    write_jsonl(out / "pairs.jsonl", rows)
    return {
        "pairs": len(rows),
        "chosen_judged_right": right[0] / len(rows),
        "rejected_judged_right": right[1] / len(rows),
    }


def tuned(name: str, base: Path, out: Path, labeller: Any, per_digit: int, steps: int) -> tuple[Path, dict]:
    """The method trained at each value of its grid; the model whose validation samples the labeller reads
    as the requested digit most often, and every value's share."""
    recipe, option, values = GRIDS[name]
    digits = np.repeat(np.arange(10), per_digit)
    seeds = [VALIDATION_SEEDS + i for i in range(len(digits))]
    shares, models = {}, {}
    for value in values:
        stage = f"{name}-{option.rsplit('.', 1)[1]}-{value:g}"
        models[value] = train(
            recipe,
            out,
            stage,
            model__name=base,
            data__train=out / "pairs.jsonl",
            **{option.replace(".", "__"): value},
        )
        images = generate(models[value], digits.tolist(), seeds, steps)
        shares[value] = float((labeller.predict(flat(images)) == digits).mean())
    best = max(values, key=lambda v: shares[v])
    return models[best], {
        "option": option,
        "labeller_share": {f"{v:g}": shares[v] for v in values},
        "chosen": best,
    }


def row(name: str, result: DigitsResult) -> str:
    return (
        f"| {name} | {result.alignment:.3f} ± {result.alignment_stderr:.3f} | {result.frechet:.2f} | "
        f"{result.spread:.2f} |"
    )


def write_html(path: Path, results: dict[str, DigitsResult], checks: dict, grid: Path) -> Path:
    """The experiment's self-contained page: the table, the settings chosen, the grid of samples."""
    rows = [
        [
            text(name),
            num(r.alignment, f"{name}.alignment"),
            num(r.alignment_stderr),
            num(r.frechet),
            num(r.spread),
        ]
        for name, r in results.items()
    ]
    chosen = "; ".join(
        f"{name}: {v['option']} = {v['chosen']:g} (labeller's share on validation seeds: "
        + ", ".join(f"{k}: {share:.3f}" for k, share in v["labeller_share"].items())
        + ")"
        for name, v in ((n, checks[f"{n}_validation"]) for n in GRIDS)
    )
    uri = "data:image/png;base64," + base64.b64encode(grid.read_bytes()).decode("ascii")
    body = [
        "<h1>Diffusion-DPO on handwritten digits</h1>",
        "<p>Held-out seeds; prompt alignment is the share of samples an independent classifier (the judge, "
        "never used for labels or choices) reads as the requested digit.</p>",
        table(["model", "prompt alignment", "s.e.", "Frechet distance (PCA)", "spread"], rows, key="digits"),
        f"<p>Settings chosen: {esc(chosen)}.</p>",
        figure(
            uri,
            "samples before and after",
            "rows: digits 0-9; columns: the same held-out seeds in every panel",
        ),
    ]
    write_text_atomic(path, html_document("prospect: Diffusion-DPO on digits", body))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/digits-diffusion", help="where every file goes")
    parser.add_argument("--seed", type=int, default=0, help="the digits' split and the initial weights")
    parser.add_argument("--pairs-per-digit", type=int, default=100)
    parser.add_argument("--eval-per-digit", type=int, default=100, help="held-out seeds per digit")
    parser.add_argument(
        "--validation-per-digit", type=int, default=50, help="validation seeds per digit, to choose settings"
    )
    parser.add_argument("--sampling-steps", type=int, default=25, help="DDIM steps of every sample")
    parser.add_argument("--figure", type=Path, help="also copy the grid of samples here")
    args = parser.parse_args()
    started, out = time.perf_counter(), Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = split_digits(SIZES, args.seed)
    labeller, judge, features = fit_labeller(splits), fit_judge(splits), fit_features(splits)
    held_out = (
        splits.images["held_out"].reshape(len(splits.labels["held_out"]), -1),
        splits.labels["held_out"],
    )
    checks = {
        "labeller_accuracy": float(labeller.score(*held_out)),
        "judge_accuracy": float(judge.score(*held_out)),
    }
    pretrain = [
        {"prompt": str(label), "image": write_png(image, out / "images" / f"real-{i:04d}.png")}
        for i, (image, label) in enumerate(zip(splits.images["pretrain"], splits.labels["pretrain"]))
    ]
    write_jsonl(out / "pretrain.jsonl", pretrain)
    torch.manual_seed(args.seed)
    new_class_conditional_unet(out / "init", 8, (32, 64), 10, timesteps=1000, schedule="squaredcos_cap_v2")
    base = train(
        "diffusion_pretrain_digits",
        out,
        "pretrain",
        model__name=out / "init",
        data__train=out / "pretrain.jsonl",
    )
    checks |= sample_pairs(base, out, args.pairs_per_digit, args.sampling_steps, labeller, judge)
    aligned = {}
    for name in GRIDS:
        aligned[name], checks[f"{name}_validation"] = tuned(
            name, base, out, labeller, args.validation_per_digit, args.sampling_steps
        )
    digits = np.repeat(np.arange(10), args.eval_per_digit)
    seeds = [EVAL_SEEDS + i for i in range(len(digits))]
    samples, results = {}, {}
    for name, model in {"base": base, **aligned}.items():
        samples[name] = generate(model, digits.tolist(), seeds, args.sampling_steps)
        results[name] = evaluate_digits(samples[name], digits, judge, features, splits)
    columns = 8
    shown = {  # digit-major: the first `columns` held-out seeds of each digit
        f"{name} ({results[name].alignment:.0%} aligned)": images.reshape(10, -1, 8, 8)[:, :columns].reshape(
            -1, 8, 8
        )
        for name, images in samples.items()
    }
    grid = save_grid(shown, out / "samples.png", columns)
    page = write_html(out / "report.html", results, checks, grid)
    if args.figure:
        save_grid(shown, args.figure, columns)
    minutes = (time.perf_counter() - started) / 60
    report = {"checks": checks, "results": {k: v.as_dict() for k, v in results.items()}, "minutes": minutes}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print("| model | prompt alignment ± s.e. | Frechet distance (PCA) | spread |")
    print("|---|---:|---:|---:|")
    for name, result in results.items():
        print(row(name, result))
    print(f"checks: {json.dumps(checks)}")
    print(f"grid: {grid}; report: {page}; results: {out / 'results.json'}; {minutes:.1f} minutes")


if __name__ == "__main__":
    main()

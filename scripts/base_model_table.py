"""The base-model table of docs/results.md (section 6): for each `prospect eval` file, each checkpoint's KL to
the base model, its score and win rate against the base by every judge, and the share of completions that do
what the VADER prompts ask (begin with the quoted words), printed as Markdown; the win rates drawn as bars.

    python scripts/base_model_table.py docs/images/base-models.png runs/eval-base-smollm2.json runs/eval-base-gemma.json
"""

from __future__ import annotations

import base64
import json
import math
import re
import sys
from pathlib import Path

from prospect.report import plots

LABELS = {"smollm2": "SmolLM2", "gemma3-270m": "Gemma-3 base"}
OPENING = re.compile(r'begins with "(.+?)"')
NAMES = {  # run directory -> method, for the table and the figure
    "base-smollm2-sft": "SFT",
    "base-gemma-sft": "SFT",
    "raters-dpo": "DPO",
    "base-gemma-dpo": "DPO",
    "raters-kto-plain": "KTO",
    "base-gemma-kto": "KTO",
    "base-smollm2-sft-kto": "SFT then KTO",
    "base-gemma-sft-kto": "SFT then KTO",
}


def begins_as_asked(samples: list[dict], key: str) -> tuple[float, float]:
    """Share (± s.e.) of completions that begin with the words the prompt quotes."""
    hits = []
    for sample in samples:
        found = OPENING.search(sample["prompt"])
        if found:
            text = sample[key].strip().lstrip("\"'\u201c").lower()
            hits.append(text.startswith(found.group(1).strip().lower()))
    share = sum(hits) / len(hits)
    return share, math.sqrt(share * (1 - share) / len(hits))


def short(judge: str) -> str:
    return "reward model" if judge.startswith("reward:") else judge


def main(out: str, files: list[str]) -> None:
    groups: list[str] = []
    bars: dict[str, list[tuple[float, float, float] | None]] = {}
    print("| model | method | KL to the base, nats | VADER score | win rate, VADER [95% CI] | reward-model score "
          "| win rate, reward model [95% CI] | begins as asked | tokens |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for file in files:
        report = json.loads(Path(file).read_text())
        model, judges = report["baseline"]["path"], list(report["judges"])
        first = report["checkpoints"][0]
        share, se = begins_as_asked(first["samples"], "baseline")
        scores = " | ".join(
            f"{first['baseline_judge'][j]['mean']:.3f} ± {first['baseline_judge'][j]['stderr']:.3f} | –"
            for j in judges
        )
        print(
            f"| {model} | base | 0 | {scores} | {share:.2f} ± {se:.2f} | {first['length']['baseline_mean']:.1f} |"
        )
        for checkpoint in report["checkpoints"]:
            method = NAMES.get(Path(checkpoint["name"]).name, checkpoint["name"])
            drawn = Path(checkpoint["name"]).name in NAMES
            cells = []
            for j in judges:
                score, win = checkpoint["judge"][j], checkpoint["win_rate"][j]
                cells.append(f"{score['mean']:.3f} ± {score['stderr']:.3f}")
                cells.append(f"{win['rate']:.3f} [{win['low']:.3f}, {win['high']:.3f}]")
                if drawn:
                    bars.setdefault(short(j), []).append((win["rate"], win["low"], win["high"]))
            share, se = begins_as_asked(checkpoint["samples"], "completion")
            kl = checkpoint["kl"]
            print(
                f"| {model} | {method} | {kl['mean']:.2f} ± {kl['stderr']:.2f} | {' | '.join(cells)} | "
                f"{share:.2f} ± {se:.2f} | {checkpoint['length']['mean']:.1f} |"
            )
            if drawn:
                groups.append(f"{LABELS.get(model, model)} {method}")
    uri = plots.bars_figure(
        "Win rate against the base model, VADER held-out prompts", "win rate (ties half)", groups, bars,
        reference=(0.5, "even with the base"),
    )  # fmt: skip
    Path(out).write_bytes(base64.b64decode(uri.split(",", 1)[1]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

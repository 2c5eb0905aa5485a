"""The frontier figures of docs/results.md: judged score against KL for the given run directories, written as a
PNG, with each checkpoint and the score interpolated at the KLs all runs reach printed.

    python scripts/frontier_figure.py docs/images/frontier-kto-dpo.png runs/frontier-dpo runs/frontier-kto-pairs ...
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

from prospect.report import plots
from prospect.report.page import method_labels, run_frontiers
from prospect.report.runs import common_kl_levels, frontier_points, load_run, score_at_kl

NAMES = {  # the runs of docs/results.md, named for the figure's legend
    "frontier-dpo": "DPO on 1,633 rating-gap pairs, 8 pairs a step",
    "frontier-kto-pairs": "KTO on the same pairs as labels, 16 examples a step",
    "demo-20261130c": "KTO on thresholded ratings, 8 a step (the demo)",
    "frontier-kto-one": "KTO, one side of each pair (one y per x)",
    "frontier-kto-imbalance": "KTO, 90% of desirable examples dropped, lambda_D 10.0",
    "nash-md-lr5e-5": "Nash-MD on the pairwise preference model, 60 rollouts of 8",
}


def main(out: str, run_dirs: list[str], title: str = "Judged score against KL on VADER") -> None:
    runs = [load_run(Path(d)) for d in run_dirs]
    labels = method_labels(runs)
    labels = {r.path: NAMES.get(r.name, labels[r.path]) for r in runs}
    for judge, lines in run_frontiers(runs, labels).items():
        uri = plots.frontier_figure(title, f"held-out judge score ({judge}), mean", lines)
        Path(out).write_bytes(base64.b64decode(uri.split(",", 1)[1]))
    points = [frontier_points(r) for r in runs]
    for run, found in zip(runs, points):
        shown = [
            (p.label, round(p.score, 3), round(p.score_se, 3), round(p.kl, 2), round(p.kl_se, 2))
            for p in found
        ]
        print(run.name, shown)
    levels = common_kl_levels(points)
    for run, found in zip(runs, points):
        at = [(kl, score_at_kl(found, kl)) for kl in levels]
        print(
            run.name,
            [(round(kl, 2), None if s is None else (round(s[0], 3), round(s[1], 3))) for kl, s in at],
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

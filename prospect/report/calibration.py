"""The report's section for `prospect preferences` files: each preference source's reliability curve (how
often the first completion was preferred, against the probability the source gave it) and a table of
accuracy, expected calibration error and Brier score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prospect.errors import UserError
from prospect.evaluation.preferences import KIND
from prospect.io import read_json
from prospect.report.markup import esc, figure, num, table, text
from prospect.report.plots import data_uri, new_figure, set_labels, style


def load_preferences(path: Path) -> dict[str, Any]:
    value = read_json(path)
    if not isinstance(value, dict) or value.get("kind") != KIND or not isinstance(value.get("sources"), dict):
        raise UserError(f'{path}: not a `prospect preferences` file (expected "kind": "{KIND}")')
    return value


def reliability_figure(name: str, sources: dict[str, Any]) -> str:
    fig = new_figure(5.0, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#888888", linestyle=":", linewidth=1, label="perfectly calibrated")
    for i, (source, q) in enumerate(sources.items()):
        bins = q.get("bins") or []
        if not bins:
            continue
        s = style(i)
        sizes = [12 + 60 * b["count"] / max(q["comparisons"], 1) for b in bins]
        xs, ys = [b["mean_probability"] for b in bins], [b["frequency"] for b in bins]
        ax.plot(xs, ys, color=s.colour, linestyle=s.line, linewidth=1.4)
        ax.scatter(xs, ys, s=sizes, color=s.colour, marker=s.marker, label=f"{source} (ECE {q['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    set_labels(
        fig,
        ax,
        f"reliability on {name}",
        "P(first preferred) the source gave (bin mean)",
        "share where people preferred the first",
    )
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=1, frameon=False)
    return data_uri(fig)


def preferences_section(files: list[tuple[Path, dict[str, Any]]]) -> str:
    parts = ["<h2>Preference sources on held-out comparisons (prospect preferences)</h2>"]
    for path, report in files:
        rows = []
        for source, q in report["sources"].items():
            key = f"{path.name}:{source}"
            rows.append(
                [
                    text(source),
                    num(q["accuracy"], f"{key}:accuracy"),
                    num(q["accuracy_stderr"], f"{key}:accuracy_stderr"),
                    num(q["ece"], f"{key}:ece"),
                    num(q["brier"], f"{key}:brier"),
                    num(q["comparisons"], f"{key}:comparisons"),
                ]
            )
        data = report.get("data", {})
        parts.append(
            f"<p>{esc(path.name)}: {report['pairs']} held-out pairs of {esc(data.get('source'))} "
            f"(split {esc(data.get('split'))}), each shown in a random order (seed {report.get('seed')}).</p>"
        )
        parts.append(figure(reliability_figure(path.name, report["sources"]), f"reliability on {path.name}",
                            "Marker area: the bin's share of the pairs. Ties count half an accurate answer."))  # fmt: skip
        parts.append(table(["source", "accuracy", "± s.e.", "ECE", "Brier", "pairs"], rows))
    return "\n".join(parts)

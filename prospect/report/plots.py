"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state) and returned as PNG
data URIs to embed in the page. Series differ in line style, marker and hatching as well as colour, so a
grey-scale print keeps them apart; every axis says what it measures and in which unit. Intervals are
±1.96 standard errors (a normal 95% interval) unless the data gives its own bounds (win rates)."""

from __future__ import annotations

import base64
import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prospect.report.runs import Curve, Point

Z95 = 1.96
# Okabe-Ito colours, with a line style, a marker and a hatch each: distinct in colour and in grey.
COLOURS = ("#000000", "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
LINES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
HATCHES = ("", "///", "...", "xxx", "\\\\\\", "---", "+++")
STEP_AXIS = "optimizer step"
KL_AXIS = "KL(policy ‖ reference) on held-out samples (nats)"


@dataclass(frozen=True)
class Style:
    colour: str
    line: str | tuple
    marker: str
    hatch: str


def style(i: int) -> Style:
    n = len(COLOURS)
    return Style(COLOURS[i % n], LINES[i % n], MARKERS[i % n], HATCHES[i % n])


def new_figure(width: float = 6.0, height: float = 3.4) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def set_labels(fig: Figure, ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    """Title and axis labels, wrapped to the figure (a long judge name is a long label)."""
    width, height = fig.get_size_inches()
    ax.set_title(textwrap.fill(title, int(width * 10)))
    ax.set_xlabel(textwrap.fill(xlabel, int(width * 12)))
    ax.set_ylabel(textwrap.fill(ylabel, int(height * 12)))


def data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the `window` - 1 before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(points: int) -> int:
    """Steps averaged in a curve of `points` steps: none below 30, about a twentieth above."""
    return 1 if points < 30 else max(3, points // 20)


def curves_figure(title: str, unit: str, series: dict[str, Curve], smooth: bool = True) -> str:
    """One panel of training curves against steps. Long noisy curves are drawn thin per step with a thick
    moving average over them (`smooth`)."""
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (label, curve) in enumerate(series.items()):
        s, window = style(i), smoothing_window(len(curve.steps)) if smooth else 1
        every = max(1, len(curve.steps) // 10)
        if window > 1:
            ax.plot(curve.steps, curve.values, color=s.colour, linewidth=0.6, alpha=0.35)
            values, label = moving_average(curve.values, window), f"{label} ({window}-step mean)"
        else:
            values = curve.values
        ax.plot(
            curve.steps,
            values,
            color=s.colour,
            linestyle=s.line,
            marker=s.marker,
            markevery=every,
            markersize=4,
            linewidth=1.6,
            label=label,
        )
    set_labels(fig, ax, title, STEP_AXIS, unit)
    ax.grid(alpha=0.3)
    if len(series) > 1 or (smooth and any(smoothing_window(len(c.steps)) > 1 for c in series.values())):
        ax.legend(fontsize="small")
    return data_uri(fig)


def bars_figure(
    title: str,
    ylabel: str,
    groups: list[str],
    series: dict[str, list[tuple[float, float, float] | None]],
    reference: tuple[float, str] | None = None,
) -> str:
    """Grouped bars with intervals: series -> one (value, low, high) per group, or None for no bar."""
    fig = new_figure(max(4.0, 1.2 + 0.9 * len(groups) * max(1, len(series))), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for i, (label, bars) in enumerate(series.items()):
        s = style(i)
        for g, bar in enumerate(bars):
            if bar is None:
                continue
            value, low, high = bar
            x = g + (i - (len(series) - 1) / 2) * width
            ax.bar(
                x,
                value,
                width * 0.9,
                color="white" if i else "#bbbbbb",
                edgecolor=s.colour,
                hatch=s.hatch,
                label=label if g == next(j for j, b in enumerate(bars) if b is not None) else None,
            )
            ax.errorbar(
                x, value, yerr=[[value - low], [high - value]], color="black", capsize=4, linewidth=1.2
            )
    if reference is not None:
        ax.axhline(reference[0], color="black", linestyle=":", linewidth=1, label=reference[1])
    rotated = len(groups) > 3
    ax.set_xticks(
        range(len(groups)), groups, rotation=20 if rotated else 0, ha="right" if rotated else "center"
    )
    set_labels(fig, ax, title, "", ylabel)
    ax.grid(axis="y", alpha=0.3)
    below = -0.32 if rotated else -0.18  # under the tick labels, which rotated ones push down
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, below), ncols=3)
    return data_uri(fig)


def frontier_figure(
    title: str, ylabel: str, lines: dict[str, list[list[Point]]], baseline: tuple[float, str] | None = None
) -> str:
    """Judged score against KL to the reference: the reward/KL frontier of the DPO paper (Figure 2). Each
    method has its own style; each of its runs is a line through its checkpoints in order, each point with
    ±1.96 s.e. in both directions."""
    entries = len(lines) + (baseline is not None)
    fig = new_figure(6.4, 4.2 + 0.22 * entries)  # the legend goes below the axes: labels can be long
    ax = fig.add_subplot()
    few = sum(len(p) for runs in lines.values() for p in runs) <= 12
    for i, (label, runs) in enumerate(lines.items()):
        s = style(i)
        for n, points in enumerate(runs):
            ax.errorbar(
                [p.kl for p in points],
                [p.score for p in points],
                xerr=[Z95 * p.kl_se for p in points],
                yerr=[Z95 * p.score_se for p in points],
                color=s.colour,
                linestyle=s.line,
                marker=s.marker,
                markersize=6,
                capsize=3,
                linewidth=1.4,
                label=None if n else label,
            )
            for p in points if few else ():
                ax.annotate(
                    p.label, (p.kl, p.score), xytext=(5, 5), textcoords="offset points", fontsize="x-small"
                )
    if baseline is not None:
        ax.axhline(baseline[0], color="black", linestyle=":", linewidth=1, label=baseline[1])
    set_labels(fig, ax, title, KL_AXIS, ylabel)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize="small")
    return data_uri(fig)

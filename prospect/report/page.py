"""`prospect report RUN [RUN ...] [--eval EVAL.json ...] -o report.html`: one self-contained HTML file (figures
embedded as PNG data, no script, no network) that any browser opens.

For each run: its training curves, its held-out judge before and after with intervals, the same prompts
answered before and after. Across runs and `prospect eval` files: the judged score against KL to the
reference, one point per checkpoint and one line per method (the DPO paper's reward/KL frontier), win
rates against the baseline with their intervals, and comparison tables."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from prospect import __version__
from prospect.errors import UserError
from prospect.io import write_text_atomic
from prospect.report import plots
from prospect.report.calibration import load_preferences, preferences_section
from prospect.report.eval_file import Checkpoint, EvalFile, load_eval
from prospect.report.markup import details, esc, figure, num, samples_table, table, text
from prospect.report.runs import (
    Point,
    Run,
    common_kl_levels,
    frontier_points,
    is_number,
    load_run,
    read_config,
    score_at_kl,
)
from prospect.report.sections import run_section

# Options that differ between runs of one method without making it another method.
SAME_METHOD = (
    "eval.",
    *(f"train.{k}" for k in ("output_dir", "seed", "max_steps", "epochs", "overwrite", "resume", "threads")),
    *(f"train.{k}" for k in ("log_every", "save_every", "keep_last", "report_to", "push_to_hub")),
)
SHOWN_DIFFERENCES = 3
ESTIMATE = {"mean", "stderr"}
RUN_NOTE = (
    "One point per checkpoint: before training (KL 0), each evaluation during training (eval.every), and "
    "after training. One style per method, one line per run through its checkpoints in order. Error bars: "
    "±1.96 standard errors in both directions."
)
EVAL_NOTE = (
    "One point per checkpoint evaluated, one line per method (the loss in the checkpoint's run directory) "
    "in order of KL; the dotted line is the baseline's score. Error bars: ±1.96 standard errors."
)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1280px; padding: 0 1em; color: #111; }
h1, h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
.wide { overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: .25em .5em; vertical-align: top; text-align: left; }
th { background: #f2f2f2; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; max-width: 28em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: .5em; }
figure { margin: .5em 0; } figure img { max-width: 100%; height: auto; }
figcaption, .note, .facts { color: #444; font-size: .9em; }
code { background: #f4f4f4; white-space: pre-wrap; }
pre { margin: 0; white-space: pre-wrap; }
"""


def method_labels(runs: list[Run]) -> dict[Path, str]:
    """A label per run: its loss, and the options that set it apart from other runs of the same loss (seeds,
    lengths and evaluation settings aside), so that two seeds of a method share a line and two variants of
    it do not."""
    by_loss: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_loss[run.method].append(run)
    labels = {}
    for method, group in by_loss.items():
        keys = sorted({k for r in group for k in r.config})
        differing = [
            k
            for k in keys
            if not k.startswith(SAME_METHOD) and len({repr(r.config.get(k)) for r in group}) > 1
        ]
        for run in group:
            shown = [f"{k}={run.config.get(k)}" for k in differing[:SHOWN_DIFFERENCES]]
            more = ", ..." if len(differing) > SHOWN_DIFFERENCES else ""
            labels[run.path] = f"{method} ({', '.join(shown)}{more})" if shown else method
    return labels


def frontier_html(
    lines_by_judge: dict[str, dict[str, list[list[Point]]]],
    title: str,
    note: str,
    baselines: dict[str, tuple[float, str]] | None = None,
) -> str:
    """One frontier figure per judge (scores of different judges share no axis)."""
    out = []
    for judge, lines in lines_by_judge.items():
        if sum(len(p) for runs in lines.values() for p in runs) < 2:
            continue
        uri = plots.frontier_figure(
            f"{title}: judged score against KL",
            f"held-out judge score ({judge}), mean",
            lines,
            (baselines or {}).get(judge),
        )
        out.append(figure(uri, f"{title}: {judge} score against KL to the reference", note))
    return "\n".join(out)


Lines = dict[str, dict[str, list[list[Point]]]]  # judge -> method -> its runs' checkpoints


def run_frontiers(runs: list[Run], labels: dict[Path, str]) -> Lines:
    out: Lines = defaultdict(lambda: defaultdict(list))
    for run in runs:
        points = frontier_points(run)
        if points:
            out[run.judge][labels[run.path]].append(points)
    return out


def runs_table(runs: list[Run], labels: dict[Path, str]) -> str:
    rows = []
    for run in runs:
        b, a = run.before or {}, run.after or {}
        change, se = run.judge_change() or (None, None)
        rows.append(
            [
                f'<td><a href="#run-{esc(run.name)}">{esc(run.name)}</a></td>',
                text(labels[run.path]),
                text(run.judge),
                text(run.last_step, "num"),
                *(
                    num(r.get(k), f"{run.name}/{w}/{k}")
                    for w, r in (("before", b), ("after", a))
                    for k in ("judge_mean", "judge_stderr")
                ),
                num(change, signed=True),
                num(se),
                num(a.get("kl_mean"), f"{run.name}/after/kl_mean"),
                num(a.get("kl_stderr"), f"{run.name}/after/kl_stderr"),
                num(a.get("length_mean"), f"{run.name}/after/length_mean"),
            ]
        )
    headers = [
        "run",
        "method",
        "judge",
        "steps",
        "score before",
        "s.e.",
        "score after",
        "s.e.",
        "change",
        "s.e.",
        "KL after (nats)",
        "s.e.",
        "length after (tokens)",
    ]
    return table(headers, rows, key="runs")


def points_table(runs: list[Run]) -> str:
    rows = [
        [
            text(run.name),
            text(p.label),
            text(p.step, "num"),
            *(
                num(v, f"{run.name}/{p.label}/{k}")
                for k, v in (
                    ("judge_mean", p.score),
                    ("judge_stderr", p.score_se),
                    ("kl_mean", p.kl),
                    ("kl_stderr", p.kl_se),
                )
            ),
        ]
        for run in runs
        for p in frontier_points(run)
    ]
    headers = ["run", "checkpoint", "step", "judge score", "s.e.", "KL (nats)", "s.e."]
    return details("every checkpoint's numbers", table(headers, rows, key="points"))


def equal_kl_table(runs: list[Run], labels: dict[Path, str]) -> str:
    """Each run's judged score at KLs every run reaches, interpolated between its checkpoints: methods
    compared at equal KL rather than at their own end points."""
    points = [frontier_points(run) for run in runs]
    levels = common_kl_levels(points)
    if not levels:
        return ""
    rows = []
    for run, run_points in zip(runs, points, strict=True):
        cells = [text(run.name), text(labels[run.path])]
        for kl in levels:
            found = score_at_kl(run_points, kl)
            cells += [
                num(found[0] if found else None, f"{run.name}/at_kl/{kl}"),
                num(found[1] if found else None),
            ]
        rows.append(cells)
    headers = ["run", "method", *(h for kl in levels for h in (f"score at KL {kl:g}", "s.e."))]
    note = (
        '<p class="note">Judged score at equal KL to the reference, linearly interpolated between the two '
        "checkpoints whose KLs bracket it; the standard error combines theirs.</p>"
    )
    return note + table(headers, rows, key="equal-kl")


def runs_comparison(runs: list[Run]) -> str:
    labels = method_labels(runs)
    parts = [
        "<h2>Runs compared</h2>",
        frontier_html(run_frontiers(runs, labels), "held-out evaluations", RUN_NOTE),
        runs_table(runs, labels),
        equal_kl_table(runs, labels),
        points_table(runs),
    ]
    return "\n".join(p for p in parts if p)


def checkpoint_labels(files: list[EvalFile]) -> dict[int, str]:
    """A checkpoint's name, with its file's when two files name checkpoints alike."""
    names = [c.name for f in files for c in f.checkpoints]
    return {
        id(c): c.name if names.count(c.name) == 1 else f"{f.path.stem}: {c.name}"
        for f in files
        for c in f.checkpoints
    }


def checkpoint_method(checkpoint: Checkpoint) -> str:
    """The loss of the run a checkpoint comes from (a run, its final/ or best/, or one of its checkpoints/)."""
    path = Path(checkpoint.path)
    for directory in (path, path.parent, path.parent.parent):
        method = read_config(directory).get("loss.name") if directory.is_dir() else None
        if method:
            return str(method)
    return "checkpoints"


Checkpoints = list[tuple[EvalFile, Checkpoint]]


def eval_frontiers(checkpoints: Checkpoints, labels: dict[int, str]) -> str:
    """Per judge: each checkpoint's score against its KL, one line per method, the baseline's score dotted."""
    points: dict[str, dict[str, list[Point]]] = defaultdict(lambda: defaultdict(list))
    baselines = {}
    for f, c in checkpoints:
        for judge, score in c.judge.items():
            kl = c.kl or {}
            if score.keys() >= ESTIMATE and kl.keys() >= ESTIMATE:  # a number left undefined is absent
                point = Point(labels[id(c)], 0, score["mean"], score["stderr"], kl["mean"], kl["stderr"])
                points[judge][checkpoint_method(c)].append(point)
            base = c.baseline_judge.get(judge, {}).get("mean")
            if is_number(base) and judge not in baselines:
                baselines[judge] = (base, f"baseline: {f.baseline}")
    lines = {j: {m: [sorted(p, key=lambda p: p.kl)] for m, p in by.items()} for j, by in points.items()}
    return frontier_html(lines, "prospect eval", EVAL_NOTE, baselines)


def bar(rate: dict[str, float]) -> tuple[float, float, float] | None:
    """(rate, low, high), or None for a rate left undefined."""
    return (rate["rate"], rate["low"], rate["high"]) if {"rate", "low", "high"} <= rate.keys() else None


def win_rate_figure(judge: str, checkpoints: Checkpoints, labels: dict[int, str]) -> str:
    """Each checkpoint's win rate against the baseline by `judge`, and its length-controlled one."""
    judged = [c for _, c in checkpoints if bar(c.win_rate.get(judge, {}))]
    if not judged:
        return ""
    series = {
        "win rate": [bar(c.win_rate[judge]) for c in judged],
        "length-controlled win rate": [bar(c.lc_win_rate.get(judge, {})) for c in judged],
    }
    uri = plots.bars_figure(
        f"win rate against the baseline, judge {judge}",
        "win rate (ties count half)",
        [labels[id(c)] for c in judged],
        series,
        (0.5, "no preference (0.5)"),
    )
    return figure(uri, f"win rates judged by {judge}", "Error bars: the 95% intervals in the eval file.")


def agreement_table(files: list[EvalFile]) -> str:
    rows = [
        [text(pair), *(num(n.get(k), f"agreement/{pair}/{k}") for k in ("verdict_agreement", "spearman"))]
        for f in files
        for pair, n in f.agreement.items()
    ]
    return (
        table(["judges", "verdict agreement", "Spearman correlation"], rows, key="agreement") if rows else ""
    )


def eval_comparison(files: list[EvalFile]) -> str:
    labels = checkpoint_labels(files)
    checkpoints = [(f, c) for f in files for c in f.checkpoints]
    judges = dict.fromkeys(j for f in files for j in f.judges + [j for c in f.checkpoints for j in c.judge])
    sources = "; ".join(
        f"{esc(f.path)}: {f.count} prompts from {esc(f.source)}, against {esc(f.baseline)}" for f in files
    )
    parts = [
        "<h2>Checkpoints evaluated (prospect eval)</h2>",
        f'<p class="facts">{sources}</p>',
        eval_frontiers(checkpoints, labels),
        *(win_rate_figure(judge, checkpoints, labels) for judge in judges),
        judged_table(checkpoints, labels),
        checkpoint_table(checkpoints, labels),
        agreement_table(files),
    ]
    for f, c in checkpoints:
        judge, name = next(iter(c.judge), f.judges[0] if f.judges else ""), labels[id(c)]
        if c.samples:
            body = samples_table(c.pairs(judge), f.baseline, name, key=f"eval-samples-{name}")
            parts.append(details(f"samples of {name} against {f.baseline} (scores: {judge})", body))
    return "\n".join(p for p in parts if p)


def judged_table(checkpoints: Checkpoints, labels: dict[int, str]) -> str:
    rows = []
    for _, c in checkpoints:
        name = labels[id(c)]
        for judge in dict.fromkeys([*c.judge, *c.win_rate]):
            score, base = c.judge.get(judge, {}), c.baseline_judge.get(judge, {})
            win, lc = c.win_rate.get(judge, {}), c.lc_win_rate.get(judge, {})
            key = f"{name}/{judge}"
            counts = "–".join(str(int(win[k])) for k in ("wins", "ties", "losses") if k in win)
            rows.append(
                [
                    text(name),
                    text(judge),
                    num(score.get("mean"), f"{key}/judge/mean"),
                    num(score.get("stderr"), f"{key}/judge/stderr"),
                    num(base.get("mean"), f"{key}/baseline_judge/mean"),
                    num(base.get("stderr"), f"{key}/baseline_judge/stderr"),
                    *(num(win.get(k), f"{key}/win_rate/{k}") for k in ("rate", "low", "high")),
                    text(counts or "–", "num"),
                    *(num(lc.get(k), f"{key}/lc_win_rate/{k}") for k in ("rate", "low", "high")),
                ]
            )
    headers = [
        "checkpoint",
        "judge",
        "score",
        "s.e.",
        "baseline score",
        "s.e.",
        "win rate",
        "95% low",
        "95% high",
        "wins–ties–losses",
        "LC win rate",
        "95% low",
        "95% high",
    ]
    return table(headers, rows, key="judged")


CHECKPOINT_FIELDS = (
    ("kl", "mean", "KL (nats)"),
    ("kl", "stderr", "s.e."),
    ("length", "mean", "length (tokens)"),
    ("length", "baseline_mean", "baseline length"),
    ("accuracy", "mean", "accuracy"),
    ("accuracy", "stderr", "s.e."),
)


def checkpoint_table(checkpoints: Checkpoints, labels: dict[int, str]) -> str:
    rows = []
    for _, c in checkpoints:
        name, parts = labels[id(c)], {"kl": c.kl, "length": c.length, "accuracy": c.accuracy}
        numbers = (num((parts[p] or {}).get(k), f"{name}/{p}/{k}") for p, k, _ in CHECKPOINT_FIELDS)
        rows.append([text(name), text(c.path), *numbers])
    return table(["checkpoint", "path", *(h for _, _, h in CHECKPOINT_FIELDS)], rows, key="checkpoints")


def render(runs: list[Run], files: list[EvalFile], preferences: list[tuple[Path, dict]] | None = None) -> str:
    names = [r.name for r in runs] + [f.path.name for f in files] + [p.name for p, _ in preferences or []]
    title = "prospect report: " + ", ".join(names)
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="facts">Written by prospect {__version__} on {time.strftime("%Y-%m-%d %H:%M")}.</p>',
    ]
    if len(runs) > 1:
        body.append(runs_comparison(runs))
    if files:
        body.append(eval_comparison(files))
    if preferences:
        body.append(preferences_section(preferences))
    for run in runs:
        frontier = ""
        if len(runs) == 1:
            frontier = frontier_html(run_frontiers([run], {run.path: run.method}), run.name, RUN_NOTE)
            frontier += points_table([run]) if frontier else ""
        body.append(run_section(run, frontier, open_samples=len(runs) == 1))
    return html_document(title, body)


def html_document(title: str, body: list[str]) -> str:
    """A self-contained page: the report's style, `body`'s parts in order."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(
    run_dirs: list[Path], eval_files: list[Path], out: Path, preference_files: list[Path] | None = None
) -> Path:
    """The report of `run_dirs`, `prospect eval` and `prospect preferences` files, written to `out` (.html)."""
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"{out}: the report is an HTML file; name it ....html")
    if not run_dirs and not eval_files and not preference_files:
        raise UserError("prospect report: give one or more run directories, --eval or --preferences files")
    runs = [load_run(p) for p in run_dirs]
    names = [r.name for r in runs]
    for run in runs:
        run.name = run.name if names.count(run.name) == 1 else str(run.path)
    for run in runs:
        if len(runs) > 1 and run.after is None:
            raise UserError(
                f"{run.path}: no held-out evaluation after training (report.json); compare runs trained "
                "to the end with eval.num_prompts > 0"
            )
        if not run.curves and run.before is None:
            raise UserError(f"{run.path}: nothing to report yet (no metrics.jsonl, no held-out evaluation)")
    files = [load_eval(p) for p in eval_files]
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory for the report")
    preferences = [(p, load_preferences(p)) for p in preference_files or []]
    write_text_atomic(out, render(runs, files, preferences))
    return out


def write_run_report(run_dir: Path) -> Path:
    """The report of one run, into the run directory (at the end of `prospect train` and the demo)."""
    return write_report([run_dir], [], run_dir / "report.html")

"""One run's part of the report: its training curves, its held-out evaluation before and after training, and
the same prompts answered before and after, side by side."""

from __future__ import annotations

from typing import Any

from prospect.report import plots
from prospect.report.markup import details, esc, figure, num, samples_table, table, text
from prospect.report.runs import Curve, Run, is_number

# (title, y axis with its unit, metrics or metric prefixes ending in "/"), in the order shown.
PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss", "loss (dimensionless)", ("loss", "eval_loss")),
    (
        "implied rewards",
        "β · log π(y|x)/π_ref(y|x) (nats)",
        ("rewards/desirable", "rewards/undesirable", "rewards/chosen", "rewards/rejected", "rewards/margin"),
    ),
    ("KL estimate", "log π/π_ref (nats)", ("kl", "kl_estimate_raw", "reference_point")),
    ("scores", "score (the reward's units)", ("score", "target")),
    ("gradient norm", "L2 norm of the gradient before clipping", ("grad_norm",)),
    ("throughput", "tokens / s", ("tokens_per_s",)),
    ("learning rate", "learning rate (per update)", ("lr",)),
    ("log-probabilities", "summed log π(y|x) (nats)", ("logps/",)),
    ("examples per step", "examples", ("count/",)),
)
UNSMOOTHED = ("learning rate",)  # a schedule, not a noisy measurement
NAMES = {
    "grad_norm": "gradient norm",
    "tokens_per_s": "tokens / s",
    "lr": "learning rate",
    "score": "score (mean per step)",
    "target": "target (mean per step)",
    "loss": "training loss",
    "eval_loss": "held-out loss",
    "kl": "KL",
    "kl_estimate_raw": "raw estimate (mismatched pairs)",
    "reference_point": "reference point z0 (clamped at 0)",
    "rewards/accuracy": "fraction of pairs with r(chosen) > r(rejected)",
}
# The evaluation's numbers, as rows of the before/after table.
MEASURES = {
    "judge_mean": "held-out judge score, mean",
    "judge_stderr": "held-out judge score, standard error",
    "positive_fraction": "fraction judged positive (> 0.05)",
    "kl_mean": "KL(policy ‖ reference), nats, mean",
    "kl_stderr": "KL, standard error",
    "length_mean": "completion length, tokens",
    "pair_accuracy": "pairwise accuracy",
    "pearson_r": "Pearson r with the ratings",
    "sign_accuracy": "sign accuracy",
}


def short(metric: str) -> str:
    return NAMES.get(metric, metric.split("/")[-1] if "/" in metric else metric)


def curve_panels(run: Run) -> list[tuple[str, str, dict[str, Curve]]]:
    """The panels of training curves this run's logs have: the known groups first, then one panel for each
    metric no group takes. The held-out loss of evals.jsonl joins the training loss."""
    metrics = dict(run.curves)
    held_out = [r for r in run.evals if is_number(r.get("eval_loss"))]
    if held_out:
        metrics["eval_loss"] = Curve([r["step"] for r in held_out], [float(r["eval_loss"]) for r in held_out])
    panels, taken = [], set()
    for title, unit, wanted in PANELS:
        names = [w for w in wanted if w in metrics]  # in the panel's order, then prefixed ones as logged
        names += [m for m in metrics if any(w.endswith("/") and m.startswith(w) for w in wanted)]
        chosen = {m: metrics[m] for m in names}
        if chosen:
            panels.append((title, unit, {short(m): c for m, c in chosen.items()}))
            taken |= set(chosen)
    for metric, curve in metrics.items():
        if metric not in taken:
            panels.append((metric, NAMES.get(metric, metric), {short(metric): curve}))
    return panels


def curves_html(run: Run) -> str:
    panels = curve_panels(run)
    if not panels:
        return '<p class="note">No training metrics yet (metrics.jsonl is empty or absent).</p>'
    figures = [
        figure(
            plots.curves_figure(title, unit, series, smooth=title not in UNSMOOTHED),
            f"{run.name}: {title} against optimizer steps",
        )
        for title, unit, series in panels
    ]
    longest = max(len(c.steps) for _, _, series in panels for c in series.values())
    window = plots.smoothing_window(longest)
    note = (
        f"Thin lines: each step; thick lines: the mean over the last {window} steps or so."
        if window > 1
        else ""
    )
    return f'<div class="grid">{"".join(figures)}</div>' + (
        f'<p class="note">{esc(note)}</p>' if note else ""
    )


def measures(result: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's numbers; a baseline judge's (a reward model's evaluation) as "judge: measure"."""
    out = {k: v for k, v in result.items() if is_number(v)}
    baseline = result.get("judge")
    if isinstance(baseline, dict):
        out.update({f"judge: {k}": v for k, v in baseline.items() if is_number(v)})
    return out


def heldout_table(run: Run) -> str:
    before, after = measures(run.before or {}), measures(run.after or {})
    keys = [k for k in MEASURES if k in before or k in after]
    keys += [k for k in {**before, **after} if k not in MEASURES]
    rows = []
    for key in keys:
        b, a = before.get(key), after.get(key)
        change = a - b if is_number(a) and is_number(b) and not key.endswith("stderr") else None
        label = MEASURES.get(key, key).replace("judge score", f"judge score ({run.judge})")
        rows.append(
            [
                text(label),
                num(b, f"{run.name}/before/{key}"),
                num(a, f"{run.name}/after/{key}"),
                num(change, signed=True),
            ]
        )
    return table(
        ["held-out measure", "before training", "after training", "change"], rows, key=f"heldout-{run.name}"
    )


def judge_change(run: Run) -> str:
    """The change in judged score with its standard error (the two evaluations are independent samples)."""
    a = run.after or {}
    measured = run.judge_change()
    if measured is None:
        return ""
    change, spread = measured
    kl = f" at a KL of {a['kl_mean']:.3f} nats" if is_number(a.get("kl_mean")) else ""
    return (
        f"<p>Change in held-out judge score ({esc(run.judge)}): <b>{change:+.3f}</b> "
        f"± {spread:.3f} s.e.{kl}.</p>"
    )


def before_after_figure(run: Run) -> str:
    bars = []
    for result in (run.before, run.after):
        mean, se = (result or {}).get("judge_mean"), (result or {}).get("judge_stderr")
        bars.append(
            (mean, mean - plots.Z95 * se, mean + plots.Z95 * se)
            if is_number(mean) and is_number(se)
            else None
        )
    if not any(bars):
        return ""
    uri = plots.bars_figure(
        f"{run.name}: held-out judge score",
        f"{run.judge} score (mean ± 1.96 s.e.)",
        ["before training", "after training"],
        {f"judge: {run.judge}": bars},
    )
    return figure(
        uri,
        f"{run.name}: held-out judge score before and after training",
        "Error bars: ±1.96 standard errors.",
    )


def run_section(run: Run, frontier: str = "", open_samples: bool = True) -> str:
    """The run's section; `frontier`: its judged score / KL figure, when drawn."""
    c = run.config
    facts = [
        f"method <b>{esc(run.method)}</b>",
        f"model {esc(c.get('model.name', '?'))}",
        f"data {esc(c.get('data.train', '?'))}",
        f"{run.last_step} steps",
    ]
    params = ", ".join(f"{k[5:]}={v}" for k, v in c.items() if k.startswith("loss.") and k != "loss.name")
    if params:
        facts.append(f"loss options {esc(params)}")
    parts = [
        f'<section class="run" id="run-{esc(run.name)}"><h2>Run {esc(run.name)}</h2>',
        f'<p class="facts">{"; ".join(facts)}. Directory: <code>{esc(run.path)}</code></p>',
        "<h3>Training curves</h3>",
        curves_html(run),
    ]
    if run.before or run.after:
        parts += [
            "<h3>Held-out evaluation</h3>",
            judge_change(run),
            before_after_figure(run),
            heldout_table(run),
        ]
        if frontier:
            parts.append(frontier)
    else:
        parts.append('<p class="note">No held-out evaluation yet (eval_before.json, eval_after.json).</p>')
    if run.samples:
        body = samples_table(run.samples, "before", "after", key=f"samples-{run.name}")
        title = f"The same {len(run.samples)} held-out prompts answered before and after training"
        parts += [f"<h3>{esc(title)}</h3>", details("show the samples", body, open_samples)]
    parts.append("</section>")
    return "\n".join(p for p in parts if p)

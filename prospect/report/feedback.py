"""`prospect feedback`'s report, shown: as a text table on the terminal, and as an HTML section (the spread of
each item's ratings, alpha per group with its interval, the judges' calibration curves, and the tables) that
`--html` writes as a self-contained page. Every number comes from the JSON report; in the page each one
carries a `data-key` naming where in the JSON it came from."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from prospect import __version__
from prospect.errors import UserError
from prospect.evaluation.feedback_checks import LENGTH_GAP_Z
from prospect.io import write_text_atomic
from prospect.report.markup import Cell, esc, figure, num, table, text
from prospect.report.page import html_document
from prospect.report.plots import Z95, data_uri, new_figure, set_labels, style

SHOWN_RATERS = 20  # the page lists the raters least in line with the others, and every flagged one
RELIABLE_ALPHA = 0.8  # Krippendorff's own bar for drawing conclusions from data


# ----- text ---------------------------------------------------------------------------------------------------


def show(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def interval(result: dict[str, Any]) -> str:
    return f"{show(result['alpha'])} [{show(result['low'])}, {show(result['high'])}]"


def flag(flagged: bool) -> str:
    return "  FLAG" if flagged else ""


def text_table(report: dict[str, Any]) -> str:
    """The report as text, section by section, with what was flagged last."""
    data = report["data"]
    splits = ", ".join(f"{n} {s}" for s, n in sorted(data["splits"].items()))
    lines = [
        f"{data['source']} ({data['format']}): {data['items']} items ({splits}), {data['marks']} marks",
        "",
    ]
    levels = list(next(iter(report["agreement"].values())))
    resamples = report["settings"]["resamples"]
    lines.append(f"Krippendorff's alpha [95% bootstrap interval over items, {resamples} resamples]")
    lines.append(f"{'group':24}{'items':>8}" + "".join(f"{level:>26}" for level in levels))
    for group, by_level in report["agreement"].items():
        count = next(iter(by_level.values()))["items"]
        lines.append(f"{group[:24]:24}{count:>8}" + "".join(f"{interval(by_level[v]):>26}" for v in levels))
    c = report["consensus"]
    lines += [
        "",
        f"raters agreeing with their item's label: mean {c['share_mean']:.3f}, median {c['share_median']:.3f}; "
        f"{c['below_0.7']} items below 0.7",
    ]
    if "spread" in c:
        s = c["spread"]
        lines.append(
            f"spread of an item's ratings (std): mean {s['mean']:.3f}, median {s['median']:.3f}, "
            f"90th percentile {s['p90']:.3f}"
        )
    if report["raters"]:
        lines += ["", *rater_lines(report["raters"])]
    lines += ["", *check_lines(report)]
    if report["judges"]:
        lines += ["", *judge_lines(report["judges"])]
    lines += [
        "",
        "flagged:" if report["flags"] else "flagged: nothing",
        *(f"  - {f}" for f in report["flags"]),
    ]
    return "\n".join(lines)


def rater_lines(raters: dict[str, Any], shown: int = 5) -> list[str]:
    """The raters least in line with the others, and every flagged one."""
    agreeing = raters["dawid_skene"]["agrees_with_consensus"]
    lines = [
        f"{len(raters['raters'])} named raters; Dawid-Skene's label is the consensus label for "
        f"{show(agreeing)} of the items; lowest {raters['ranked_by']} with the others' consensus first",
        f"{'rater':20}{'items':>7}{'agreement':>11}{'bias':>8}{'scale':>8}{'corr':>8}{'DS acc':>8}  flags",
    ]
    for r in listed_raters(raters["raters"], shown):
        lines.append(
            f"{r['rater'][:20]:20}{r['items']:>7}{show(r['agreement']):>11}{show(r.get('bias'), '+.2f'):>8}"
            f"{show(r.get('scale'), '.2f'):>8}{show(r.get('correlation'), '.2f'):>8}"
            f"{show(r['dawid_skene_accuracy']):>8}  {'; '.join(r['flags'])}"
        )
    return lines


def listed_raters(raters: list[dict[str, Any]], shown: int) -> list[dict[str, Any]]:
    return raters[:shown] + [r for r in raters[shown:] if r["flags"]]


def check_lines(report: dict[str, Any]) -> list[str]:
    found, votes = report["checks"], report["data"]["format"] == "votes"
    heading = "labels (votes: chosen won)" if votes else "labels (by training's thresholds)"
    lines = [f"{heading:32}{'desirable':>10}{'undesirable':>12}{'neither':>9}{'share':>8}"]
    for group, b in balance_rows(found["balance"]).items():
        lines.append(
            f"{group[:32]:32}{b['desirable']:>10}{b['undesirable']:>12}{b['neither']:>9}"
            f"{show(b['desirable_share']):>8}{flag(b['flagged'])}"
        )
    lines.append(
        f"{'length, desirable vs undesirable':32}{'characters':>22}{'gap ± s.e.':>16}{'z':>7}{'words':>16}"
    )
    for group, length in found["length"].items():
        if "chars" in length:
            ch, wd = length["chars"], length["words"]
            lines.append(
                f"{group[:32]:32}{ch['desirable_mean']:>11.1f} vs {ch['undesirable_mean']:>6.1f}"
                f"{ch['gap']:>+9.1f} ± {show(ch['stderr'], '.1f'):>4}{show(ch['z'], '.1f'):>7}"
                f"{wd['desirable_mean']:>7.1f} vs {wd['undesirable_mean']:>4.1f}{flag(length['flagged'])}"
            )
    copies = found["duplicates"]
    lines.append(
        f"repeated texts: {copies['exact']['extra_copies']} exact and {copies['near']['extra_copies']} near extra "
        f"copies; shared by train and test: {copies['exact']['across_splits']} exact, "
        f"{copies['near']['across_splits']} near{flag(copies['flagged'])}"
    )
    for name, share in concentrations(report).items():
        lines.append(
            f"most prolific {name}: the top 1% ({share['top_1_percent_size']} of {share['count']}) give "
            f"{share['top_1_percent']:.1%}, the top 10 give {share['top_10']:.1%}"
        )
    return lines


def balance_rows(balance: dict[str, Any]) -> dict[str, Any]:
    """Each group's counts, then the total (one group: the total alone)."""
    groups = balance["groups"]
    return {**groups, "all": balance["all"]} if len(groups) > 1 else {"all": balance["all"]}


def concentrations(report: dict[str, Any]) -> dict[str, Any]:
    found = {"prompts": report["checks"]["prompts"], "raters": (report["raters"] or {}).get("concentration")}
    return {name: share for name, share in found.items() if share}


def judge_rows(judges: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(judge, group, agreement) for each judge's groups, then its total."""
    return [(n, g, r) for n, j in judges.items() for g, r in {**j.get("groups", {}), "all": j}.items()]


def judge_lines(judges: dict[str, Any]) -> list[str]:
    """The judges' agreement with the people; the judge column as wide as its longest name."""
    width = max([len("judge"), *(len(name) for name in judges)]) + 2
    lines = [f"{'judge':{width}}{'group':24}{'items':>8}{'pearson':>9}{'spearman':>10}{'sign agrees':>13}"]
    for name, group, r in judge_rows(judges):
        lines.append(
            f"{name:{width}}{group[:24]:24}{r['items']:>8}{show(r['pearson']):>9}{show(r['spearman']):>10}"
            f"{show(r['sign_agreement']):>13}"
        )
    return lines


# ----- figures --------------------------------------------------------------------------------------------------


def alpha_figure(agreement: dict[str, Any]) -> str:
    """Horizontal bars, one per group and level, each with its 95% bootstrap interval; a dotted line at
    Krippendorff's bar for reliable data."""
    groups = list(agreement)
    levels = list(agreement[groups[0]])
    fig = new_figure(7.2, 1.8 + 0.4 * len(groups) * len(levels))
    ax = fig.add_subplot()
    height = 0.8 / len(levels)
    for i, level in enumerate(levels):
        s = style(i)
        for g, group in enumerate(groups):
            result = agreement[group][level]
            if result["alpha"] is None:
                continue
            y = g + (i - (len(levels) - 1) / 2) * height
            ax.barh(
                y,
                result["alpha"],
                height * 0.9,
                color="white" if i else "#bbbbbb",
                edgecolor=s.colour,
                hatch=s.hatch,
                label=level if g == 0 else None,
            )
            if result["low"] is not None:
                ax.errorbar(
                    result["alpha"],
                    y,
                    xerr=[[result["alpha"] - result["low"]], [result["high"] - result["alpha"]]],
                    color="black",
                    capsize=3,
                    linewidth=1.2,
                )
    ax.axvline(
        RELIABLE_ALPHA,
        color="black",
        linestyle=":",
        linewidth=1,
        label=f"{RELIABLE_ALPHA}: reliable (Krippendorff)",
    )
    ax.set_yticks(range(len(groups)), groups)
    ax.invert_yaxis()
    set_labels(
        fig, ax, "Krippendorff's alpha, 95% bootstrap interval", "alpha (1: full agreement, 0: chance)", ""
    )
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", fontsize="small", ncols=3)
    return data_uri(fig)


def spread_figure(spread: dict[str, Any]) -> str:
    edges, counts = spread["histogram"]["edges"], spread["histogram"]["counts"]
    fig = new_figure(5.6, 3.4)
    ax = fig.add_subplot()
    widths = [b - a for a, b in itertools.pairwise(edges)]
    ax.bar(edges[:-1], counts, widths, align="edge", color="#bbbbbb", edgecolor=style(0).colour)
    ax.axvline(
        spread["median"], color=style(1).colour, linestyle="--", label=f"median {spread['median']:.2f}"
    )
    set_labels(fig, ax, "How far an item's raters differ", "std of the item's ratings", "items")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return data_uri(fig)


def calibration_figure(judges: dict[str, Any]) -> str:
    """Each judge's binned score against the mean human consensus of the bin, ±1.96 s.e."""
    fig = new_figure(5.6, 4.0)
    ax = fig.add_subplot()
    for i, (name, result) in enumerate(judges.items()):
        s, curve = style(i), result["calibration"]
        ax.errorbar(
            [b["judge_mean"] for b in curve],
            [b["human_mean"] for b in curve],
            yerr=[Z95 * (b["human_stderr"] or 0.0) for b in curve],
            color=s.colour,
            linestyle=s.line,
            marker=s.marker,
            capsize=3,
            label=name,
        )
    ax.axhline(0, color="#888888", linestyle=":", linewidth=1)
    set_labels(
        fig, ax, "Judges against the people", "judge score (bin mean)", "mean human consensus in the bin"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return data_uri(fig)


# ----- HTML -------------------------------------------------------------------------------------------------------


def feedback_section(report: dict[str, Any]) -> str:
    data = report["data"]
    settings = report["settings"]
    parts = [
        f"<h2>Feedback from many raters: {esc(data['source'])}</h2>",
        f'<p class="facts">{data["items"]} items ({esc(data["format"])}), {data["marks"]} marks; intervals: '
        f"percentile bootstrap over items, {settings['resamples']} resamples, seed {settings['seed']}.</p>",
        "<h3>Agreement</h3>",
        figure(alpha_figure(report["agreement"]), "Krippendorff's alpha per group"),
        agreement_table(report["agreement"]),
    ]
    c = report["consensus"]
    parts.append(
        table(
            ["raters agreeing with the item's label", "mean", "median", "items below 0.7"],
            [
                [
                    text("share"),
                    num(c["share_mean"], "consensus/share_mean"),
                    num(c["share_median"], "consensus/share_median"),
                    num(c["below_0.7"], "consensus/below_0.7"),
                ]
            ],
        )
    )
    if "spread" in c:
        parts.append(figure(spread_figure(c["spread"]), "spread of each item's ratings"))
    if report["raters"]:
        parts += ["<h3>Raters</h3>", raters_table(report["raters"])]
    parts += ["<h3>What else the labels could teach</h3>", *checks_tables(report)]
    if report["judges"]:
        parts += ["<h3>AI judges against the human consensus</h3>", judges_table(report["judges"])]
        parts.append(figure(calibration_figure(report["judges"]), "judges' calibration curves"))
    found = "".join(f"<li>{esc(f)}</li>" for f in report["flags"]) or "<li>nothing</li>"
    parts.append(f"<h3>Flagged</h3><ul>{found}</ul>")
    return "\n".join(parts)


def agreement_table(agreement: dict[str, Any]) -> str:
    levels = list(next(iter(agreement.values())))
    rows = []
    for group, by_level in agreement.items():
        row: list[Cell] = [text(group), num(next(iter(by_level.values()))["items"], f"alpha/{group}/items")]
        for level in levels:
            row += [num(by_level[level][k], f"alpha/{group}/{level}/{k}") for k in ("alpha", "low", "high")]
        rows.append(row)
    headers = ["group", "items"] + [f"{level} {k}" for level in levels for k in ("alpha", "2.5%", "97.5%")]
    return table(headers, rows)


def raters_table(raters: dict[str, Any]) -> str:
    rows = []
    for r in listed_raters(raters["raters"], SHOWN_RATERS):
        key = f"rater/{r['rater']}"
        rows.append(
            [text(r["rater"]), num(r["items"]), num(r["agreement"], f"{key}/agreement")]
            + [num(r.get(k), f"{key}/{k}") for k in ("bias", "scale", "correlation", "dawid_skene_accuracy")]
            + [text("; ".join(r["flags"]))]
        )
    headers = ["rater", "items", "agreement", "bias", "scale", "correlation", "Dawid-Skene accuracy", "flags"]
    return f"<p>Lowest {esc(raters['ranked_by'])} with the other raters' consensus first.</p>" + table(
        headers, rows
    )


def checks_tables(report: dict[str, Any]) -> list[str]:
    found = report["checks"]
    balance = [
        [
            text(g),
            num(b["desirable"]),
            num(b["undesirable"]),
            num(b["neither"]),
            num(b["desirable_share"], f"balance/{g}/desirable_share"),
            text("FLAG" if b["flagged"] else ""),
        ]
        for g, b in balance_rows(found["balance"]).items()
    ]
    tables = [table(["group", "desirable", "undesirable", "neither", "desirable share", ""], balance)]
    rows = [
        [text(group), text(unit)]
        + [
            num(length[unit][k], f"length/{group}/{unit}/{k}")
            for k in ("desirable_mean", "undesirable_mean", "gap")
        ]
        + [
            num(length[unit]["stderr"]),
            num(length[unit]["z"], f"length/{group}/{unit}/z"),
            text("FLAG" if length["flagged"] else ""),
        ]
        for group, length in found["length"].items()
        if "chars" in length
        for unit in ("chars", "words")
    ]
    if rows:
        note = f"FLAG: a gap over {LENGTH_GAP_Z:g} standard errors; training on these labels teaches length"
        headers = ["group", "length in", "desirable", "undesirable", "gap", "± s.e.", "z", ""]
        tables.append(table(headers, rows) + f'<p class="note">{esc(note)}</p>')
    copies = found["duplicates"]
    tables.append(
        table(
            ["repeated texts", "extra copies", "shared by train and test"],
            [
                [text(k), num(copies[k]["extra_copies"]), num(copies[k]["across_splits"], f"duplicates/{k}")]
                for k in ("exact", "near")
            ],
        )
    )
    shares = [
        [
            text(name),
            num(s["count"]),
            num(s["top_1_percent"], f"concentration/{name}/top_1_percent"),
            num(s["top_10"], f"concentration/{name}/top_10"),
        ]
        for name, s in concentrations(report).items()
    ]
    if shares:
        tables.append(
            table(["most prolific", "how many", "share from the top 1%", "share from the top 10"], shares)
        )
    return tables


def judges_table(judges: dict[str, Any]) -> str:
    rows = [
        [text(name), text(group), num(r["items"])]
        + [num(r[k], f"judge/{name}/{group}/{k}") for k in ("pearson", "spearman", "sign_agreement")]
        for name, group, r in judge_rows(judges)
    ]
    return table(["judge", "group", "items", "Pearson", "Spearman", "sign agreement"], rows)


def check_page(path: Path, overwrite: bool) -> None:
    """Refuse a page path before any work: not .html, or an existing file."""
    if path.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--html {path}: the page is an HTML file; name it ....html")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: exists; pass --overwrite to replace it")


def write_page(report: dict[str, Any], path: Path) -> Path:
    title = f"prospect feedback: {report['data']['source']}"
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="facts">Written by prospect {__version__} on {time.strftime("%Y-%m-%d %H:%M")}.</p>',
        feedback_section(report),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, html_document(title, body))
    return path

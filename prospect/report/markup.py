"""HTML pieces of the report. Every text that comes from a run (prompts, completions, names, paths) is escaped
here; a number is shown with three decimals and carries a `data-key` naming where it came from, so a reader
(or a test) can check the page against the JSON."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

from prospect.report.runs import SamplePair, is_number

Cell = str  # one <td>...</td> or <th>...</th>


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def fmt(value: object, signed: bool = False) -> str:
    """Three decimals, or a dash for a number that is missing."""
    if not is_number(value):
        return "–"
    if isinstance(value, int):
        return f"{value:+d}" if signed else str(value)
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def num(value: object, key: str | None = None, signed: bool = False) -> Cell:
    """A number's cell; `key` names it (data-key) for whoever checks the page against the JSON."""
    attribute = f' data-key="{esc(key)}"' if key is not None and is_number(value) else ""
    return f'<td class="num"{attribute}>{fmt(value, signed)}</td>'


def text(value: object, css: str = "") -> Cell:
    return f'<td class="{css}">{esc(value)}</td>' if css else f"<td>{esc(value)}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], css: str = "", key: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    attributes = (f' class="{css}"' if css else "") + (f' id="{esc(key)}"' if key else "")
    return (
        f'<div class="wide"><table{attributes}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n'
        "</tbody></table></div>"
    )


def figure(uri: str, alt: str, caption: str = "") -> str:
    note = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{esc(alt)}">{note}</figure>'


def details(summary: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{esc(summary)}</summary>\n{body}\n</details>"


def common_start(texts: list[str]) -> str:
    first, last = min(texts), max(texts)  # the sorted extremes differ first where any two do
    n = next((i for i, (a, b) in enumerate(zip(first, last)) if a != b), min(len(first), len(last)))
    return first[:n]


def framing(prompts: list[str]) -> tuple[str, str]:
    """The text every prompt begins and ends with (a chat template, an instruction), cut at a line break (or,
    at the end, a special token such as <|im_end|>), so that each row shows only what differs."""
    if len(prompts) < 2:
        return "", ""
    prefix = common_start(prompts)
    prefix = prefix[: prefix.rfind("\n") + 1]
    suffix = common_start([p[len(prefix) :][::-1] for p in prompts])[::-1]
    cuts = [i for i in (suffix.find("\n"), suffix.find("<")) if i >= 0]  # a line break or a special token
    return prefix, suffix[min(cuts) :] if cuts else ""


def samples_table(pairs: list[SamplePair], left: str, right: str, key: str) -> str:
    """The same prompts answered by two models, side by side, with each answer's judged score."""
    prompts = [p.prompt for p in pairs]
    prefix, suffix = framing(prompts)
    rows = []
    for i, pair in enumerate(pairs):
        shown = pair.prompt[len(prefix) : len(pair.prompt) - len(suffix)]
        change = (
            pair.right_score - pair.left_score
            if is_number(pair.left_score) and is_number(pair.right_score)
            else None
        )
        rows.append(
            [
                text(i + 1, "num"),
                text(shown, "text"),
                text(pair.left, "text"),
                num(pair.left_score, f"{key}/{i}/{left}"),
                text(pair.right, "text"),
                num(pair.right_score, f"{key}/{i}/{right}"),
                num(change, signed=True),
            ]
        )
    framed = ""
    if prefix or suffix:
        framed = (
            '<p class="note">Every prompt is framed by the same text, shown once here:</p><table class="frame">'
            f"<tr><th>begins with</th><td><pre>{esc(prefix)}</pre></td></tr>"
            f"<tr><th>ends with</th><td><pre>{esc(suffix)}</pre></td></tr></table>"
        )
    headers = ["#", "prompt", left, "score", right, "score", "change"]
    return framed + table(headers, rows, css="samples", key=key)

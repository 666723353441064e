"""The table of a report and its formats: text for a terminal, CSV for tools, Markdown. Every
value may come from a user (an override, a directory name, an error message), so each format
escapes it: Markdown shows it as text (HTML and Markdown syntax escaped), CSV never starts a cell
with what a spreadsheet runs as a formula."""

from __future__ import annotations

import csv
import html
import re
from pathlib import Path
from typing import Any

from app.report.sweep import COLUMNS, Sweep
from app.summary import duration

# OWASP's CSV injection rule: a cell starting with one of these is a formula to a spreadsheet.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_\[\]|])")


def cell_text(value: Any, key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if key == "samples_per_s":
            return f"{value:,.0f}"
        if key == "wall_time_s":
            return duration(value)
        return f"{value:.4f}"
    return str(value)


def columns(sweep: Sweep) -> list[str]:
    return ["point", *sweep.swept, *COLUMNS[1:]]


def text_table(sweep: Sweep, width: int = 60) -> str:
    """The table for a terminal: an error cut to `width` characters (report.csv keeps it whole)."""
    keys = columns(sweep)
    rows = [keys] + [[cell_text(row[k], k) for k in keys] for row in sweep.rows()]
    rows = [[c if len(c) <= width else c[: width - 3] + "..." for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def markdown_text(text: str) -> str:
    """`text` as Markdown that shows it as it is, on one line, in a table cell or not: HTML
    escaped, Markdown's syntax (and a table's pipes) backslash-escaped."""
    one_line = re.sub(r"[\r\n]+", " ", text)
    return html.escape(_MARKDOWN_SYNTAX.sub(r"\\\1", one_line), quote=False)


def markdown_table(sweep: Sweep) -> str:
    keys = columns(sweep)
    lines = ["| " + " | ".join(markdown_text(k) for k in keys) + " |", "|" + "---|" * len(keys)]
    for row in sweep.rows():
        lines.append("| " + " | ".join(markdown_text(cell_text(row[k], k)) for k in keys) + " |")
    return "\n".join(lines)


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell: numbers as they are; text that a spreadsheet would run as a formula
    prefixed with ' (text that is a plain number, such as -0.5, stays as it is)."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value)
    if text.startswith(_FORMULA_STARTS) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def write_csv(sweep: Sweep, path: Path) -> None:
    """Unrounded values, for tools."""
    keys = columns(sweep)
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([csv_cell(k) for k in keys])
        for row in sweep.rows():
            writer.writerow([csv_cell(row[k]) for k in keys])


def headline(sweep: Sweep) -> str:
    counts: dict[str, int] = {}
    for point in sweep.points:
        counts[point.status] = counts.get(point.status, 0) + 1
    said = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    planned = f" of {sweep.planned_points} planned" if sweep.planned_points else ""
    missing = ""
    if sweep.planned_points and len(sweep.points) < sweep.planned_points:
        missing = f"; {sweep.planned_points - len(sweep.points)} not started"
    problems = "".join(f"; unreadable {problem}" for problem in sweep.problems)
    return f"{sweep.root}: {len(sweep.points)} point(s){planned} ({said}{missing}){problems}"

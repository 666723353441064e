"""A report's HTML page, and the report's files written together."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from app.report.plots import write_plots
from app.report.sweep import Sweep
from app.report.table import cell_text, columns, headline, markdown_table, markdown_text, write_csv


def write_html(sweep: Sweep, plots: dict[str, Path], path: Path) -> None:
    """One page: the headline, the table, and every plot embedded (the page needs no other file)."""
    keys = columns(sweep)
    header = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell_text(row[k], k))}</td>" for k in keys) + "</tr>"
        for row in sweep.rows()
    )
    images = "".join(
        f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'><figcaption>{html.escape(name)}</figcaption></figure>"
        for name, p in plots.items()
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>rectrain report: {html.escape(str(sweep.root))}"
        "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        "figure{display:inline-block;margin:1em}</style></head><body>"
        f"<h1>rectrain report</h1><p>{html.escape(headline(sweep))}</p>"
        f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>{images}</body></html>"
    )
    path.write_text(page)


def write_report(sweep: Sweep, directory: Path) -> dict[str, Path]:
    """report.csv, report.md, report.html and the PNGs into `directory`; returns what was written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = {"csv": directory / "report.csv", "markdown": directory / "report.md"}
    write_csv(sweep, written["csv"])
    written["markdown"].write_text(f"{markdown_text(headline(sweep))}\n\n{markdown_table(sweep)}\n")
    plots = write_plots(sweep, directory)
    written["html"] = directory / "report.html"
    write_html(sweep, plots, written["html"])
    return {**written, **plots}

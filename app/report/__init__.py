"""Reports of runs and sweeps (scripts/report.py): a table of every point, best first, as text,
CSV, Markdown and HTML, and plots of how they trained.

A point is a run directory: what Hydra wrote (.hydra/overrides.yaml, .hydra/hydra.yaml), what the
run wrote (summary.json, metrics.jsonl). A sweep directory is one holding several, and Hydra's
multirun.yaml: from it come the swept parameters, how many points the sweep has (so a sweep still
running shows what is missing), and for an Optuna sweep its search space and direction. Nothing
here needs torch: a report can be made on any machine that can read the directories.

run_files.py parses and checks each of those files (a malformed one makes its point "unreadable",
with the reason); sweep.py makes the points and the sweep of them; table.py the table and its
text, CSV and Markdown; plots.py the PNGs; page.py the HTML page and the report's files together.
"""

from app.report.page import write_html, write_report
from app.report.plots import write_plots
from app.report.sweep import Point, Sweep, find_run_dirs, read_point, read_sweep
from app.report.table import columns, headline, markdown_table, text_table, write_csv

__all__ = [
    "Point",
    "Sweep",
    "columns",
    "find_run_dirs",
    "headline",
    "markdown_table",
    "read_point",
    "read_sweep",
    "text_table",
    "write_csv",
    "write_html",
    "write_plots",
    "write_report",
]

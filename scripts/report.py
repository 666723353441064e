"""A report of a sweep, or of several runs: one row per point, best first, with plots.

    python scripts/report.py outputs/sweep_lr                    # a sweep directory
    python scripts/report.py outputs/run_a outputs/run_b         # runs side by side
    python scripts/report.py outputs/sweep_optuna --out reports/optuna

Prints the table, and writes report.csv (unrounded), report.md, report.html (the table and every
plot on one page) and PNGs: val_auc.png (validation AUC over steps, every point), one
final_auc_vs_<parameter>.png per swept parameter, and for an Optuna sweep optuna_history.png
and optuna_importances.png. They go to <first directory>/report/ unless --out says where.
Points still running, failed or never started are listed as such, and a point whose files are
malformed as unreadable, with the reason. Exit 2 when a directory holds no run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.errors import BAD_INPUT
from app.report import headline, read_sweep, text_table, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="a sweep directory, or run directories")
    parser.add_argument("--out", type=Path, help="where the files go (default: <first dir>/report)")
    args = parser.parse_args()
    try:
        sweep = read_sweep(args.dirs)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(BAD_INPUT)
    print(headline(sweep))
    print(text_table(sweep))
    written = write_report(sweep, args.out or args.dirs[0] / "report")
    print("wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()

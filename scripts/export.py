"""Export a sharded training checkpoint as one unsharded model file, loadable in one CPU process.

    python scripts/export.py outputs/tiny --out exported/tiny                        # the run's best checkpoint
    python scripts/export.py outputs/tiny --pick latest --out exported/tiny-latest   # its newest
    python scripts/export.py outputs/tiny/checkpoints/step_00000010 --out exported/tiny-10
    python scripts/export.py s3://my-bucket/runs/tiny --out exported/tiny     # checkpoint.dir's newest

Of a run directory, export takes the checkpoint checkpoints/best names (the best by the validation
metric trainer.early_stopping.metric) where there is one, else the newest intact checkpoint.

Writes <out>/model.pt (the whole state_dict, every table in full, whatever the sharding and the
number of ranks it was trained on) and <out>/config.json (the training config and the step).
scripts/predict.py scores it as the run's evaluations did: the dense part in the run's
trainer.precision (bf16 or fp16 under autocast), the tables in fp32.
Needs no process group and no GPU, but the whole model must fit in this machine's memory.
Score Parquet files with it: scripts/predict.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.errors import BAD_INPUT, UserError
from app.export import CONFIG_FILE, MODEL_FILE, export_checkpoint


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint",
        help="a run directory (its best checkpoint, else its newest), its checkpoints/ "
        "directory, checkpoints/best, or one step_N checkpoint; a local path or "
        "a URL (s3://...)",
    )
    parser.add_argument(
        "--pick",
        choices=("best", "latest"),
        default="best",
        help="of a run directory: its best checkpoint by validation metric (default; the newest "
        "when it has none) or its newest",
    )
    parser.add_argument("--out", required=True, help="output directory (created; an earlier export there is replaced)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        out_dir = export_checkpoint(args.checkpoint, Path(args.out), prefer=args.pick)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT
    info = json.loads((out_dir / CONFIG_FILE).read_text())
    size_mb = (out_dir / MODEL_FILE).stat().st_size / 2**20
    precision = info["config"].get("trainer", {}).get("precision", "fp32")  # the config's default when absent
    print(
        f"exported step {info['step']} of {info['checkpoint']}: {info['parameters']:,} parameters, "
        f"{out_dir / MODEL_FILE} ({size_mb:.1f} MiB) and {out_dir / CONFIG_FILE}; predict.py computes its dense "
        f"part in {precision}, the run's trainer.precision"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Score Parquet files with an exported model (scripts/export.py) in one CPU process.

    python scripts/predict.py --model exported/tiny --data data/synthetic/<fingerprint>/val --out predictions.parquet
    python scripts/predict.py --model exported/tiny --data 'new/*.parquet' --out scores.parquet --batch-size 8192

--data is a directory (every .parquet below it), one file, or a glob; files are read in sorted
order, and row i of --out is the i-th row read. --out holds `prediction` (the click probability,
float32) and, when the input has a label column, `label` (0.0 / 1.0); with labels, AUC, logloss
and NE are printed, computed as training's evaluation computes them: the dense part in the run's
trainer.precision (bf16 or fp16 under autocast, as its evaluations ran), the tables in fp32. A multi-task model
(features.labels) writes `prediction_<task>` for each task (and `label_<task>`), and prints each
task's metrics after the primary task's. Inputs are checked and
repaired as the model's training config says (data.invalid_ids, data.invalid_dense).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from app.data.files import resolve_files
from app.errors import BAD_INPUT, UserError
from app.export import check_inputs, load_exported, score_files
from app.features import FeatureSchema
from app.logs import quiet_torch_notes
from app.metrics import evaluation_metrics
from app.storage import atomic_output

ROWS_PER_ROW_GROUP = 1 << 20  # predictions are buffered into row groups of this size, not one per batch


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an export directory from scripts/export.py")
    parser.add_argument(
        "--data",
        required=True,
        help="Parquet input: a directory, a file, or a glob; local or "
        "a URL (s3://bucket/prefix/, credentials from AWS_* / ~/.aws)",
    )
    parser.add_argument("--out", required=True, help="the Parquet file to write (replaced when it exists)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="rows per forward pass (default: data.eval_batch_size of the training config)",
    )
    return parser.parse_args(argv)


def predict(args: argparse.Namespace) -> dict:
    """Writes args.out; returns {"rows", "labeled"} and, with labels, the metrics."""
    model, config = load_exported(Path(args.model))
    files = resolve_files(args.data, key="--data")
    labeled = check_inputs(files, FeatureSchema.from_config(config.features))
    tasks = config.features.tasks() if len(config.features.tasks()) > 1 else []
    names = output_columns(tasks, labeled)
    schema = pa.schema([(name, pa.float32()) for name in names])
    batches = score_files(model, config, files, args.batch_size or config.data.eval_batch_size, labeled)
    metrics = evaluation_metrics(torch.device("cpu"), tasks, config.primary_task())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, written, pending = 0, 0, []
    with atomic_output(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:  # in place once every row is scored
        for logits, labels in batches:
            columns = [torch.sigmoid(logits)] + ([labels.float()] if labels is not None else [])
            if tasks:  # B x T: a column per task
                columns = [c[:, task] for c in columns for task in range(len(tasks))]
            pending.append(pa.record_batch([pa.array(c.contiguous().numpy()) for c in columns], schema=schema))
            if labeled:
                metrics.update(logits, labels)
            rows += len(logits)
            if rows - written >= ROWS_PER_ROW_GROUP:
                writer.write_table(pa.Table.from_batches(pending))
                pending, written = [], rows
        writer.write_table(pa.Table.from_batches(pending, schema=schema))
    return {
        "rows": rows,
        "labeled": labeled,
        "tasks": tasks,
        "precision": config.trainer.precision,
        **(metrics.compute() if labeled else {}),
    }


def output_columns(tasks: list[str], labeled: bool) -> list[str]:
    """prediction (and label) for one task; prediction_<task> for each task (then label_<task>)."""
    if not tasks:
        return ["prediction"] + (["label"] if labeled else [])
    return [f"prediction_{task}" for task in tasks] + ([f"label_{task}" for task in tasks] if labeled else [])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    quiet_torch_notes()
    try:
        result = predict(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT
    print(
        f"{result['rows']:,} predictions in {args.out}, the dense part computed in {result['precision']} "
        "(the run's trainer.precision, as its evaluations computed it)"
    )
    if result["labeled"]:
        print(f"AUC {result['auc']:.6f}  logloss {result['logloss']:.6f}  NE {result['ne']:.6f}")
        for task in result["tasks"]:  # multi-task: the line above is the primary task's
            print(
                f"task {task}: AUC {result[task + '/auc']:.6f}  logloss {result[task + '/logloss']:.6f}  "
                f"NE {result[task + '/ne']:.6f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

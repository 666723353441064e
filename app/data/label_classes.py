"""Held-out splits whose labels have one class only, found from the Parquet footers at start-up.

AUC is undefined (nan) on such a split: every evaluation of it would be nan, never the best, and
early stopping by it could never decide. Footers' statistics (each row group's min and max) say
it without reading a row; a column written without statistics is not judged here (its
evaluations then say that their metric is undefined).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from app.data.files import StorageOptions, read_metadata

log = logging.getLogger(__name__)


def one_class_labels(
    files: Sequence[str], labels: Sequence[str], storage_options: StorageOptions = None
) -> dict[str, float]:
    """Each of `labels` whose every value in `files` is the same, with that value (from the
    footers' statistics; a label without them in some row group is left out)."""
    ranges: dict[str, list[float] | None] = dict.fromkeys(labels)
    for path in files:
        metadata = read_metadata(path, storage_options)
        names = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
        for index in range(metadata.num_row_groups):
            group = metadata.row_group(index)
            if group.num_rows == 0:
                continue
            for label in [name for name in labels if name in ranges]:
                stats = group.column(names.index(label)).statistics if label in names else None
                if stats is None or not stats.has_min_max or stats.null_count:
                    del ranges[label]  # not judged
                    continue
                low, high = float(stats.min), float(stats.max)
                seen = ranges[label]
                ranges[label] = [low, high] if seen is None else [min(seen[0], low), max(seen[1], high)]
    return {label: seen[0] for label, seen in ranges.items() if seen is not None and seen[0] == seen[1]}


def warn_one_class(
    split: str, files: Sequence[str], labels: Sequence[str], storage_options: StorageOptions = None
) -> dict[str, float]:
    """Warns, naming the split, where its files are and the label, of each label with one class."""
    found = one_class_labels(files, labels, storage_options) if files else {}
    where = os.path.dirname(files[0]) if len(files) > 1 else (files[0] if files else "")
    for label, value in found.items():
        log.warning(
            "the %s split (%s) has one class only: every row's %r is %g. Its AUC is undefined (nan): its "
            "evaluations cannot make a best checkpoint and do not count toward "
            "trainer.early_stopping.patience",
            split,
            where,
            label,
            value,
        )
    return found

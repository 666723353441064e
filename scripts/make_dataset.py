"""Generate the synthetic dataset a config trains on, without training.

    python scripts/make_dataset.py                                   # the default dataset
    python scripts/make_dataset.py experiment=tiny data.synthetic.train_rows=50000

Takes the same overrides as app.train; prints where the dataset is and, per split, the best
achievable AUC and logloss (those of the true click probabilities).
"""

from __future__ import annotations

import json
import sys

from app.data.synthetic import METADATA_FILE, ensure_dataset
from app.errors import BAD_INPUT, UserError
from app.features import FeatureSchema
from app.hydra_edge import compose_config


def main(overrides: list) -> int:
    try:
        config = compose_config(overrides)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT
    train_dir, _ = ensure_dataset(FeatureSchema.from_config(config.features), config.data.synthetic)
    metadata = json.loads((train_dir.parent / METADATA_FILE).read_text())
    print(f"dataset: {train_dir.parent}")
    for split, scores in metadata["splits"].items():
        print(
            f"{split:>5}: {scores['rows']:,} rows, click rate {scores['click_rate']:.3f}, best achievable "
            f"AUC {scores['best_auc']:.4f}, logloss {scores['best_logloss']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

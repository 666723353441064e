"""Convert Criteo click logs (tab-separated, plain or .gz) into the Parquet files training reads.

    python scripts/convert_criteo.py --out data/criteo_1tb/train --workers 8 /data/day_{0..22}.gz features=criteo_1tb
    python scripts/convert_criteo.py --out data/criteo_1tb/val /data/day_23.gz features=criteo_1tb
    python scripts/convert_criteo.py --out data/criteo_kaggle --categorical vocab --min-frequency 3 \\
        /data/train.txt features=criteo_kaggle
    python scripts/convert_criteo.py --out data/kaggle_val --categorical vocab --vocabulary data/criteo_kaggle \\
        /data/val.txt features=criteo_kaggle             # the same ids as the training conversion

Categorical columns whose features config gives a hotness h > 1 (features=criteo_1tb: the MLPerf
DLRMv2 reference's 26 values) are written multi-hot: each row's id, then h - 1 ids derived from it
deterministically by --multi-hot-seed, as the reference materialises its synthetic multi-hot
dataset (app/data/criteo/multi_hot.py). --multi-hot-sizes 3,2,1,... (26 values) overrides them.

Arguments of the form key=value are config overrides, the same as app.train takes: they pick the
features config whose column names and table sizes the files must match (hash ids are taken modulo
the table sizes). Running the same command again resumes: inputs already converted are skipped.
Then train with data.source=parquet data.train_path=<out> (see app/data/criteo/ for the layout).
"""

from __future__ import annotations

import argparse
import logging
import sys

from app.config import ConfigError, FeaturesConfig
from app.data.criteo import CATEGORICAL_MODES, MIN_ROW_GROUPS, ConvertOptions, convert
from app.errors import BAD_INPUT, UserError
from app.hydra_edge import compose_config


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, config overrides); the input paths are in options.inputs."""
    defaults = ConvertOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="+", metavar="INPUT|key=value", help="Criteo TSV files and config overrides")
    parser.add_argument("--out", required=True, help="output directory (created; a re-run resumes it)")
    _add_value_options(parser, defaults)
    _add_output_options(parser, defaults)
    _add_multi_hot_options(parser, defaults)
    args = parser.parse_intermixed_args(argv)
    args.inputs = [item for item in args.items if "=" not in item]
    return args, [item for item in args.items if "=" in item]


def _add_value_options(parser: argparse.ArgumentParser, defaults: ConvertOptions) -> None:
    """How the columns' values become ids and dense floats."""
    parser.add_argument(
        "--categorical",
        choices=CATEGORICAL_MODES,
        default=defaults.categorical,
        help="hash: int(hex) %% num_embeddings; vocab: ids by frequency over the inputs; raw: "
        "int(hex) itself (64-bit ids for managed collision, or data.invalid_ids=hash)",
    )
    parser.add_argument(
        "--min-frequency",
        type=int,
        default=defaults.min_frequency,
        help="vocab: values seen fewer times get the rare id 0",
    )
    parser.add_argument(
        "--vocabulary",
        default=defaults.vocabulary,
        help="vocab: apply the vocabulary of an earlier conversion (its --out) instead of counting",
    )
    parser.add_argument(
        "--log-dense",
        action=argparse.BooleanOptionalAction,
        default=defaults.log_dense,
        help="dense values as log(1 + max(x, 0)) (the DLRM reference's transform)",
    )


def _add_output_options(parser: argparse.ArgumentParser, defaults: ConvertOptions) -> None:
    """How the Parquet files are laid out, and how the conversion reads and spreads its work."""
    parser.add_argument(
        "--rows-per-file", type=int, default=defaults.rows_per_file, help="rows per Parquet part (default %(default)s)"
    )
    parser.add_argument(
        "--rows-per-row-group",
        type=int,
        default=defaults.rows_per_row_group,
        help="rows per row group, the unit training deals to workers (default %(default)s); "
        f"an input of fewer than {MIN_ROW_GROUPS} row groups is written in {MIN_ROW_GROUPS} "
        "equal smaller ones, so that even a small conversion can be split",
    )
    parser.add_argument(
        "--block-size-mb",
        type=float,
        default=defaults.block_size / 2**20,
        help="bytes per streamed read, in MiB: memory per worker is about 45 times it",
    )
    parser.add_argument("--workers", type=int, default=defaults.workers, help="processes, one input each at a time")


def _add_multi_hot_options(parser: argparse.ArgumentParser, defaults: ConvertOptions) -> None:
    """Categorical columns written multi-hot: how many ids a row, and the seed of the derived ones."""
    parser.add_argument(
        "--multi-hot-sizes",
        default=None,
        metavar="H0,H1,...,H25",
        help="ids per row of each categorical column (26 comma-separated values; default: the "
        "features config's hotness); h > 1 adds h - 1 ids derived from the row's id",
    )
    parser.add_argument(
        "--multi-hot-seed",
        type=int,
        default=defaults.multi_hot_seed,
        help="seed of the derived multi-hot ids (default %(default)s)",
    )


def features_config(overrides: list[str]) -> FeaturesConfig:
    """The features group as training would compose it with these overrides. Only this group is
    checked: the converter does not care whether the model fits the features (the default model's
    dense arch ends in 16, `features=criteo_1tb` has 128-wide tables)."""
    features = compose_config(overrides, validate=False).features
    features.validate()
    return features


def multi_hot_sizes(text: str | None) -> tuple[int, ...] | None:
    """--multi-hot-sizes as integers (their count and range are ConvertOptions.validate's to check)."""
    if text is None:
        return None
    try:
        return tuple(int(value) for value in text.split(","))
    except ValueError:
        raise ConfigError(f"--multi-hot-sizes must be comma-separated integers, got {text!r}.") from None


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("app").setLevel(logging.INFO)  # progress; the libraries' INFO stays quiet
    try:
        sizes = multi_hot_sizes(args.multi_hot_sizes)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT
    options = ConvertOptions(
        categorical=args.categorical,
        min_frequency=args.min_frequency,
        vocabulary=args.vocabulary,
        log_dense=args.log_dense,
        rows_per_file=args.rows_per_file,
        rows_per_row_group=args.rows_per_row_group,
        block_size=int(args.block_size_mb * 2**20),
        workers=args.workers,
        multi_hot_sizes=sizes,
        multi_hot_seed=args.multi_hot_seed,
    )
    try:
        # The FeaturesConfig, not a FeatureSchema: app.features would load torchrec for nothing.
        summary = convert(args.inputs, args.out, features_config(overrides), options)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT
    for stem, entry in summary["inputs"].items():
        state = "skipped (already converted)" if stem in summary["skipped"] else "converted"
        print(f"{stem}: {entry['rows']:,} rows in {len(entry['parts'])} part(s), {state}")
    if summary["vocabulary"]:
        kept = ", ".join(f"{name} {size:,}" for name, size in summary["vocabulary"].items())
        print(f"vocabulary (values kept per feature, plus the rare id 0): {kept}")
    print(
        f"{summary['rows']:,} rows in {summary['out_dir']}; train with data.source=parquet "
        f"data.train_path={summary['out_dir']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Parquet input: reading (parquet.py), Arrow -> Batch (batch.py), the synthetic dataset (synthetic.py)."""


class DataError(ValueError):
    """Input data that cannot be trained on; the message names file, row group, row and column.
    `rank_specific`: met in this rank's share of the rows while reading, so other ranks may not
    have met it (unlike the checks every rank makes alike before training)."""

    rank_specific = False

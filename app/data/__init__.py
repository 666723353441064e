"""Parquet input: reading (parquet.py), Arrow -> Batch (batch.py), the synthetic dataset (synthetic.py)."""


class DataError(ValueError):
    """Input data that cannot be trained on; the message names file, row group, row and column."""

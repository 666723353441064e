"""Parquet input: finding and checking a split's files (files.py), which rank reads which row
groups (row_groups.py), the training and evaluation readers (parquet.py), the fork server their
processes come from (reader_server.py starts it; reader_process.py is what it runs), Arrow ->
Batch (batch.py), the synthetic dataset (synthetic.py; its planted model in planted_model.py, its
files in synthetic_files.py) and the Criteo converter (criteo/)."""

from app.errors import UserError


class DataError(UserError, ValueError):
    """Input data that cannot be trained on; the message names file, row group, row and column."""

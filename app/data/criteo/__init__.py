"""Criteo click logs (Kaggle train.txt, 1TB day_N; plain or .gz) -> the Parquet files training reads.

A raw line is `label, 13 integers, 26 categoricals`, tab-separated (tsv); its columns become the
features config's, in that order (parts). A categorical value's id comes from one of:
  - hash:  int(value, 16) % num_embeddings; needs nothing but the line itself;
  - vocab: its rank by count over all the inputs (vocabulary);
  - raw:   int(value, 16) itself, a 64-bit id (one-hot columns only).

Memory is bounded whatever the input size: a file is streamed in blocks of block_size bytes and
every step works on a block's columns at once (Arrow compute, numpy; Python touches no row or value).
Only the vocabulary grows with the data (vocab mode).

The output directory (the loader globs **/*.parquet, so only finished data parts end in .parquet):
  <stem>-NNNNN.parquet          the parts of one input (stem: its name less .gz/.txt)
  _done/<stem>.json             written once that input's parts are in place; a re-run skips it
  _vocabulary/<feature>.arrow   vocab mode: Arrow IPC (value = int(hex, 16), id, count), and
                                vocabulary.json (what it was counted from, sizes)
  _conversion.json              what the directory holds: settings, rows per input, total rows
  .<name>.tmp                   a part, marker or vocabulary being written (app.storage.atomic_output)
  .tmp/                         work in progress: value counts
"""

from app.data.criteo.driver import convert
from app.data.criteo.options import CATEGORICAL_MODES, ConvertOptions
from app.data.criteo.output_dir import input_stem
from app.data.criteo.parts import MIN_ROW_GROUPS

__all__ = ["CATEGORICAL_MODES", "MIN_ROW_GROUPS", "ConvertOptions", "convert", "input_stem"]

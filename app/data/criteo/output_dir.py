"""Names in the output directory, and its small JSON files (see the package docstring)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from app.storage import write_atomically

DONE_DIR = "_done"
VOCABULARY_DIR = "_vocabulary"
VOCABULARY_META = "vocabulary.json"
SUMMARY_FILE = "_conversion.json"
WORK_DIR = ".tmp"
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".lz4", ".zst")
TEXT_SUFFIXES = (".txt", ".tsv", ".csv")


def input_stem(path: str) -> str:
    """The name parts of an input are named after: day_0.gz -> day_0, train.txt -> train."""
    name = os.path.basename(path)
    for suffixes in (COMPRESSION_SUFFIXES, TEXT_SUFFIXES):
        stem, suffix = os.path.splitext(name)
        if suffix in suffixes and stem:
            name = stem
    return name


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a marker or summary that exists is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(data, indent=2) + "\n")

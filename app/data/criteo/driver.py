"""The whole conversion: which inputs to do, the vocabulary they need, one worker job per input,
the markers that make a re-run resume, and the summary of what the directory holds."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import ConfigError
from app.data import DataError
from app.data.criteo.options import ConvertOptions, CriteoColumns
from app.data.criteo.output_dir import (
    DONE_DIR,
    SUMMARY_FILE,
    VOCABULARY_DIR,
    VOCABULARY_META,
    WORK_DIR,
    input_stem,
    read_json,
    write_json,
)
from app.data.criteo.parts import PartWriter, output_rows, output_schema
from app.data.criteo.processes import map_in_processes
from app.data.criteo.tsv import read_blocks
from app.data.criteo.vocabulary import check_vocabulary_fits, ensure_vocabulary, given_vocabulary, load_vocabularies
from app.storage import atomic_output

if TYPE_CHECKING:
    from app.config import FeaturesConfig
    from app.features import FeatureSchema


def convert(
    inputs: Sequence[str], out_dir: str, schema: FeatureSchema | FeaturesConfig, options: ConvertOptions
) -> dict:
    """Convert every input not yet done into out_dir; returns (and writes to _conversion.json) a
    summary of all the directory holds. `options.workers` processes convert inputs in parallel;
    the output does not depend on their number. Only the schema's label, dense and sparse are
    read, so the FeaturesConfig it is built from will do (and spares loading torchrec)."""
    options.validate()
    columns = CriteoColumns.from_schema(schema, options.multi_hot_sizes)
    _refuse_raw_multi_hot(columns, options)
    inputs, stems = _checked_inputs(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    given = given_vocabulary(options.vocabulary) if options.vocabulary else None
    built_from = _vocabulary_built_from(options, given, stems)
    settings = _settings(columns, options, built_from)
    finished = _check_finished(out, settings)
    todo = [(path, stem) for path, stem in zip(inputs, stems) if stem not in finished]
    vocabulary_dir = _vocabulary_dir(out, given, todo, inputs, stems, columns, options, built_from)

    jobs = [
        InputJob(path, stem, str(out), columns, options, str(vocabulary_dir) if vocabulary_dir else None, settings)
        for path, stem in todo
    ]
    map_in_processes(convert_input, jobs, options.workers, "converted")

    summary = _summary(out, stems, todo, finished, settings, options, vocabulary_dir)
    write_json(out / SUMMARY_FILE, summary)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return summary


def _refuse_raw_multi_hot(columns: CriteoColumns, options: ConvertOptions) -> None:
    if options.categorical == "raw" and any(h > 1 for h in columns.hotness):
        multi_hot = [name for name, h in zip(columns.sparse, columns.hotness) if h > 1]
        raise ConfigError(
            f"categorical='raw' keeps each value as its id, but {multi_hot} are multi-hot: their derived ids are "
            "drawn within the table's rows (hash or vocab ids). Use --categorical hash or vocab, or hotness 1 "
            "(--multi-hot-sizes)."
        )


def _checked_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """The inputs as paths and their stems (their names less .gz/.txt, which name their parts)."""
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise ConfigError("no input files given.")
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such input file; expected a Criteo TSV file (plain or .gz).")
    stems = [input_stem(p) for p in inputs]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise ConfigError(f"inputs {repeated} appear twice (by name less .gz/.txt): their parts would collide.")
    return inputs, stems


def _vocabulary_built_from(options: ConvertOptions, given: Path | None, stems: list[str]) -> dict | None:
    """With categorical=vocab, what the vocabulary is built from: the given one's record, or these inputs."""
    if options.categorical != "vocab":
        return None
    if given:
        meta = read_json(given / VOCABULARY_META)
        assert meta is not None, f"{given} holds no {VOCABULARY_META}"  # found there by given_vocabulary
        return meta["built_from"]
    return {"inputs": sorted(stems), "min_frequency": options.min_frequency}


def _vocabulary_dir(
    out: Path,
    given: Path | None,
    todo: list[tuple[str, str]],
    inputs: list[str],
    stems: list[str],
    columns: CriteoColumns,
    options: ConvertOptions,
    built_from: dict | None,
) -> Path | None:
    """The vocabulary the inputs to do are converted with (built into out_dir first where none is
    given and there is work), checked to fit the tables; None without categorical=vocab."""
    vocabulary_dir = given
    if options.categorical == "vocab" and vocabulary_dir is None:
        vocabulary_dir = out / VOCABULARY_DIR
        if todo:
            assert built_from is not None  # categorical=vocab: _vocabulary_built_from gave one
            vocabulary_dir = ensure_vocabulary(out, inputs, stems, columns, options, built_from)
    if todo and vocabulary_dir is not None:
        check_vocabulary_fits(vocabulary_dir, columns)
    return vocabulary_dir


def _summary(
    out: Path,
    stems: list[str],
    todo: list[tuple[str, str]],
    finished: dict[str, dict],
    settings: dict,
    options: ConvertOptions,
    vocabulary_dir: Path | None,
) -> dict:
    """All the directory holds (from its markers), what this run converted and skipped, and how."""
    markers = _markers(out)
    vocabulary = read_json(vocabulary_dir / VOCABULARY_META) if vocabulary_dir else None
    return {
        "out_dir": str(out),
        "rows": sum(m["rows"] for m in markers.values()),
        "inputs": {stem: {k: m[k] for k in ("input", "rows", "parts")} for stem, m in sorted(markers.items())},
        "converted": [stem for _, stem in todo],
        "skipped": [stem for stem in stems if stem in finished],
        "settings": settings,
        "options": asdict(options),
        "vocabulary": vocabulary["sizes"] if vocabulary else None,
    }


def _settings(columns: CriteoColumns, options: ConvertOptions, built_from: dict | None) -> dict:
    """What the output depends on: inputs converted under other settings cannot share a directory."""
    settings = {
        "columns": list(columns.names),
        "categorical": options.categorical,
        "log_dense": options.log_dense,
        "rows_per_file": options.rows_per_file,
        "rows_per_row_group": options.rows_per_row_group,
    }
    if options.categorical == "hash":
        settings["num_embeddings"] = list(columns.num_embeddings)
    elif options.categorical == "vocab":
        settings["vocabulary"] = built_from
    if any(h > 1 for h in columns.hotness):
        settings["multi_hot"] = {
            "hotness": list(columns.hotness),
            "seed": options.multi_hot_seed,
            "num_embeddings": list(columns.num_embeddings),
        }
    return json.loads(json.dumps(settings))  # as it reads back from a marker


def _markers(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / DONE_DIR).glob("*.json"))}


def _check_finished(out: Path, settings: dict) -> dict[str, dict]:
    """The finished inputs (by stem); refuses a directory whose inputs were converted differently."""
    markers = _markers(out)
    for stem, marker in markers.items():
        if marker["settings"] != settings:
            differ = sorted(
                k for k in settings.keys() | marker["settings"].keys() if settings.get(k) != marker["settings"].get(k)
            )
            changes = "; ".join(f"{k}: {marker['settings'].get(k)} there, {settings.get(k)} now" for k in differ)
            raise ConfigError(
                f"{out}: input {stem!r} was converted with other settings ({changes}); convert into another "
                "directory, or delete this one to start over."
            )
    return markers


@dataclass(frozen=True)
class InputJob:
    path: str
    stem: str
    out_dir: str
    columns: CriteoColumns
    options: ConvertOptions
    vocabulary_dir: str | None
    settings: dict


def convert_input(job: InputJob) -> dict:
    """One input's parts, then its marker. Each part is written under a temporary name beside its
    own, and all are renamed into place only once the whole input is written: a crash at any point
    leaves no marker, and the next run redoes the input."""
    out = Path(job.out_dir)
    _remove_leftovers(out, job.stem)
    vocabularies = load_vocabularies(Path(job.vocabulary_dir), job.columns) if job.vocabulary_dir else None
    options, rows = job.options, 0
    with ExitStack() as publish:

        def open_part(name: str) -> Path:
            return publish.enter_context(atomic_output(out / name))

        with PartWriter(
            open_part, job.stem, output_schema(job.columns), options.rows_per_file, options.rows_per_row_group
        ) as writer:
            for first_line, batch in read_blocks(job.path, job.columns, options.block_size):
                writer.write(
                    output_rows(
                        batch,
                        first_line,
                        job.path,
                        job.columns,
                        options.log_dense,
                        vocabularies,
                        options.multi_hot_seed,
                        raw=options.categorical == "raw",
                    )
                )
                rows += batch.num_rows
            parts = writer.close()
    marker = {"input": os.path.abspath(job.path), "rows": rows, "parts": parts, "settings": job.settings}
    write_json(out / DONE_DIR / f"{job.stem}.json", marker)
    return marker


def _remove_leftovers(out: Path, stem: str) -> None:
    """What an interrupted conversion of this input left: parts published before its marker was
    written, and parts a killed process was writing."""
    leftover = re.compile(rf"{re.escape(stem)}-\d{{5,}}\.parquet|\.{re.escape(stem)}-\d{{5,}}\.parquet\.tmp")
    for name in os.listdir(out):
        if leftover.fullmatch(name):
            os.remove(out / name)

"""The console filter: library chatter stays in the log files, our own lines and library warnings show."""

from __future__ import annotations

import logging

from app.logs import QuietLibraries


def record(name: str, level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_console_keeps_our_lines_and_real_library_warnings():
    quiet = QuietLibraries()
    assert quiet.filter(record("app.job", logging.INFO, "sharding plan:"))
    assert quiet.filter(record("root", logging.WARNING, "fbgemm: bounds check failed"))
    assert quiet.filter(record("torchrec.distributed.utils", logging.WARNING, "Sharding Type is table_wise, ..."))
    assert quiet.filter(record("asyncio", logging.ERROR, "Unclosed client session"))


def test_console_drops_library_chatter():
    quiet = QuietLibraries()
    assert not quiet.filter(record("root", logging.INFO, "Successfully loaded: 'fbgemm_gpu_py.so'"))
    assert not quiet.filter(record("py.warnings", logging.WARNING, "FutureWarning: ... is deprecated"))
    assert not quiet.filter(record("root", logging.WARNING, "Sharding spec not found for model.t_cat_8"))
    assert not quiet.filter(
        record(
            "torchrec.distributed.utils",
            logging.WARNING,
            "Sharding Type is data_parallel, caching params will be ignored",
        )
    )
    # A store that died under a save: aiohttp's orphaned request, after the job's own one-line error.
    assert not quiet.filter(record("asyncio", logging.ERROR, "Task exception was never retrieved\nfuture: <Task ...>"))

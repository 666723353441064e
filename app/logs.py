"""What reaches the console, as opposed to each rank's log file (which keeps everything).

Hydra's console handler takes this filter from configs/hydra/default.yaml, before torchrec and
fbgemm are imported; setup_logging adds it to the handlers of workers that start without Hydra."""

from __future__ import annotations

import logging

from app.config import LoggingConfig

# Warnings torchrec gives for every data-parallel table, about nothing the user set: such tables
# are replicated, so they have no sharding spec and no cache.
_ROUTINE_WARNINGS = ("Sharding spec not found for ", "Sharding Type is data_parallel, caching params will be ignored")
# What asyncio says of the object-store client's requests left unfinished when the store stopped
# answering (its event loop runs in a thread of fsspec's): the job says that failure itself, in one
# line (app/storage_failure.py's StorageFailure); these tracebacks only repeat it.
_ORPHANED_REQUESTS = ("Task exception was never retrieved", "Future exception was never retrieved")


class QuietLibraries(logging.Filter):
    """Keeps library output that users cannot act on off the console:
    - fbgemm's INFO through the root logger (each library it loads, every embedding kernel's full
      arguments); its warnings still show;
    - Python warnings (deprecations inside torch and torchrec), which setup_logging routes into
      logging so that they land in the log files;
    - torchrec's routine warnings about data-parallel tables;
    - asyncio's tracebacks of the object-store client's orphaned requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings" or record.getMessage().startswith(_ROUTINE_WARNINGS):
            return False
        if record.name == "asyncio" and record.getMessage().startswith(_ORPHANED_REQUESTS):
            return False
        return record.name != "root" or record.levelno >= logging.WARNING


def quiet_torch_notes() -> None:
    """torch's note to library authors that is_fx_tracing() also covers torch.export comes
    through torch's own handler (so QuietLibraries cannot catch it) on every first forward of
    torchrec's models: in training and in scoring alike."""
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def setup_logging(config: LoggingConfig, is_rank0: bool) -> None:
    """The job's logging: level, library loggers, Python warnings, and the console filter."""
    root = logging.getLogger()
    if not root.handlers:  # a self-launched worker has no Hydra logging
        logging.basicConfig(format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    root.setLevel(config.level)
    # TorchRec logs every pipeline fill and drain at INFO; keep its warnings.
    logging.getLogger("torchrec").setLevel(max(logging.WARNING, logging.getLevelName(config.level)))
    quiet_torch_notes()
    logging.captureWarnings(True)  # into the log files, by rank (QuietLibraries keeps them off the console)
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler:
            handler.addFilter(QuietLibraries())
            if not is_rank0:  # one console voice; every rank's log file keeps everything
                handler.setLevel(logging.ERROR)

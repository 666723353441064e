"""What reaches the console, as opposed to each rank's log file (which keeps everything).

Hydra's console handler takes this filter from configs/hydra/default.yaml, before torchrec and
fbgemm are imported; app/job.py adds it to the handlers of workers that start without Hydra."""

from __future__ import annotations

import logging


# Warnings torchrec gives for every data-parallel table, about nothing the user set: such tables
# are replicated, so they have no sharding spec and no cache.
_ROUTINE_WARNINGS = ("Sharding spec not found for ", "Sharding Type is data_parallel, caching params will be ignored")


class QuietLibraries(logging.Filter):
    """Keeps library output that users cannot act on off the console:
    - fbgemm's INFO through the root logger (each library it loads, every embedding kernel's full
      arguments); its warnings still show;
    - Python warnings (deprecations inside torch and torchrec), which app/job.py routes into
      logging so that they land in the log files;
    - torchrec's routine warnings about data-parallel tables."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings" or record.getMessage().startswith(_ROUTINE_WARNINGS):
            return False
        return record.name != "root" or record.levelno >= logging.WARNING

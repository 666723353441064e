"""What reaches the console, as opposed to each rank's log file (which keeps everything).

Hydra's console handler takes this filter from configs/hydra/default.yaml, before torchrec and
fbgemm are imported; app/job.py adds it to the handlers of workers that start without Hydra."""

from __future__ import annotations

import logging


class QuietLibraries(logging.Filter):
    """Keeps two kinds of library output off the console: fbgemm's INFO through the root logger
    (each library it loads, every embedding kernel's full arguments; its warnings still show),
    and Python warnings (deprecations inside torch and torchrec that users cannot act on), which
    app/job.py routes into logging so that they land in the log files."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            return False
        return record.name != "root" or record.levelno >= logging.WARNING

"""What reaches the console, as opposed to each rank's log file (which keeps everything).

Hydra's console handler takes this filter from configs/hydra/default.yaml, before torchrec and
fbgemm are imported; app/job.py adds it to the handlers of workers that start without Hydra."""

from __future__ import annotations

import logging


class QuietRootLogger(logging.Filter):
    """fbgemm logs at INFO through the root logger (each library it loads, every embedding
    kernel's full arguments): those lines go to the log file only; its warnings still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "root" or record.levelno >= logging.WARNING

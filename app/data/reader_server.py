"""Where reader processes come from: the fork server, started as early as a training process
knows it will read (app/train.py, before it imports torch), so that the server's imports overlap
the training process's own instead of delaying its first step.

This module imports neither torch nor the reader's modules: the server itself imports those (its
preload, app/data/reader_process.py, which says what the readers run and how they handle signals).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.popen_forkserver
import multiprocessing.resource_tracker
import signal
import sys

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
SERVER_MODULE = "app.data.reader_process"


class _ReaderPopen(multiprocessing.popen_forkserver.Popen):
    """A reader ignores SIGTERM, so terminating it is killing it."""

    def terminate(self) -> None:
        self.kill()


class _ReaderProcess(multiprocessing.context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: multiprocessing.process.BaseProcess) -> _ReaderPopen:  # noqa: N802 (multiprocessing's name)
        return _ReaderPopen(process_obj)


class _ReaderContext(multiprocessing.context.ForkServerContext):
    Process = _ReaderProcess


_READER_CONTEXT = _ReaderContext()
_preloaded = False


def worker_context() -> multiprocessing.context.BaseContext:
    """Where reader processes come from: a fork server, not a fork of the training process. A fork
    copies the process as it is, threads' locks included (Arrow's pools, torch's, NCCL's, CUDA's
    after it is initialised), and the child may hang on a lock some thread held at the fork. The
    server is a fresh interpreter, started once per training process, that imports the reader's
    modules once (SERVER_MODULE) and forks each reader from itself: a reader starts in
    milliseconds, where a spawned one would import torch again, every epoch and evaluation pass.
    As with spawn, each reader re-imports the main module, so a script must start its work under
    `if __name__ == "__main__"`; one run as `python -m module` is preloaded too, so its imports are
    done once (Python 3.11's server cannot preload a script given by path: a script's own imports
    are redone per reader). The preload list is the process's own (multiprocessing keeps one fork
    server), set here before the server starts, which is here too (see _ensure_server)."""
    global _preloaded
    if not _preloaded:
        main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        main = [main_spec.name] if main_spec is not None and not main_spec.name.endswith("__main__") else []
        _READER_CONTEXT.set_forkserver_preload([SERVER_MODULE, *main])
        _preloaded = True
    _ensure_server()
    return _READER_CONTEXT


def _ensure_server() -> None:
    """Start the fork server, unless it runs, with the stop signals blocked: it inherits this
    thread's mask, and its preload ignores them only once torch is imported (seconds). A stop
    signal this process gets meanwhile waits until the server is started. The resource tracker
    is started first: its own start (inside the server's) unblocks both signals in this thread."""
    multiprocessing.resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def start_reader_server() -> None:
    """Start the fork server now, rather than at the first reader: its imports then overlap the
    training process's own (torch, torchrec) and set-up (process group, plan, model) instead of
    delaying the first step."""
    worker_context()

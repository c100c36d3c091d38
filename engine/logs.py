"""Engine logs go to ``<run_dir>/engine.log``; the terminal keeps the progress line and the summary.

vLLM, transformers, torch and the other libraries a run loads write warnings and INFO lines (on
the embedded model, vLLM alone warns once per weight that it loads a float32 checkpoint into
bfloat16). `engine_logs` sends every such logger, and Python warnings, to the run's log file.
vLLM's engine core runs in a child process that configures its logging from
``VLLM_LOGGING_CONFIG_PATH``, so the same routing is written there for it; what that child and
C++ code (torch's NUMA notes) write straight to file descriptor 2 goes to the log too, because
descriptor 2 points at it while the run lasts (Python's ``sys.stderr`` keeps the terminal).
``--verbose`` leaves descriptor 2 alone and echoes the logs to stderr as well.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

LOG_NAME = "engine.log"
ENGINE_LOGGERS = ("vllm", "transformers", "torch", "accelerate", "peft", "trl", "datasets", "huggingface_hub",
                  "sentence_transformers", "httpx", "ray", "py.warnings")


class RunLogHandler(logging.FileHandler):
    """Appends to the log file, creating it (and the run directory) only when a first record
    comes: a run refused before it starts leaves nothing behind."""

    def __init__(self, filename: str, mode: str = "a", encoding: str = "utf-8"):
        super().__init__(filename, mode, encoding, delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def logging_config(log: Path, *, verbose: bool) -> dict:
    """The `logging.config.dictConfig` routing engine loggers to `log` (and stderr if `verbose`).

    >>> sorted(logging_config(Path("runs/x/engine.log"), verbose=True)["handlers"])
    ['file', 'stderr']
    """
    handlers = {"file": {"class": f"{__name__}.RunLogHandler", "filename": str(log), "formatter": "plain"}}
    if verbose:
        handlers["stderr"] = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "plain"}
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"}},
            "handlers": handlers,
            "loggers": {name: {"handlers": list(handlers), "level": "INFO", "propagate": False}
                        for name in ENGINE_LOGGERS},
            "root": {"handlers": list(handlers), "level": "WARNING"}}


def _route(log: Path, *, verbose: bool) -> None:
    """Route the engine loggers and the root to `log` (and stderr if `verbose`) in this process.

    Not `logging.config.dictConfig`: that first closes every handler of the process (its
    `_clearExistingHandlers`), including those of whoever embeds synthloop; the saved handlers
    are put back after the run instead."""
    fmt = logging.Formatter(logging_config(log, verbose=verbose)["formatters"]["plain"]["format"])
    handlers: list[logging.Handler] = [RunLogHandler(str(log))]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(fmt)
    for name in (*ENGINE_LOGGERS, ""):
        lg = logging.getLogger(name or None)
        for h in lg.handlers[:]:
            lg.removeHandler(h)
        for h in handlers:
            lg.addHandler(h)
        if name:
            lg.setLevel(logging.INFO)
            lg.propagate = False
        else:
            lg.setLevel(logging.WARNING)


@contextlib.contextmanager
def _descriptor_2_to(log: Path) -> Iterator[None]:
    """Point file descriptor 2 (inherited by child processes, written by C++ code) at `log`, and
    give Python's `sys.stderr` (progress line, error messages) the terminal it had."""
    sys.stderr.flush()
    terminal = os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    swap = sys.stderr is sys.__stderr__      # else someone captures sys.stderr already (tests)
    ours = None
    if swap:
        ours = sys.stderr = open(os.dup(terminal), "w", buffering=1, encoding=sys.__stderr__.encoding or "utf-8",
                                 errors="backslashreplace")
    try:
        yield
    finally:
        if ours is not None:
            # Never closed here: whatever took a reference to it meanwhile (a logging handler, a
            # thread) keeps a working stream; it closes when the last reference goes.
            ours.flush()
            if sys.stderr is ours:
                sys.stderr = sys.__stderr__
        sys.__stderr__.flush()
        os.dup2(terminal, 2)
        os.close(terminal)


@contextlib.contextmanager
def engine_logs(run_dir: str | Path, *, verbose: bool = False) -> Iterator[Path]:
    """Route engine logs of this process and of vLLM's child processes to ``run_dir/engine.log``
    while the block runs; logging and stderr are as they were afterwards. A run that logged
    nothing leaves no log (and no run directory, if it made none).

    >>> with engine_logs("runs/quickstart"):          # doctest: +SKIP
    ...     execute(cfg)
    """
    log = Path(run_dir).resolve() / LOG_NAME
    fresh = not log.parent.exists()
    config = logging_config(log, verbose=verbose)
    fd, path = tempfile.mkstemp(prefix="synthloop-logging-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh)
    env = {k: os.environ.get(k) for k in ("VLLM_LOGGING_CONFIG_PATH", "VLLM_CONFIGURE_LOGGING")}
    os.environ.update(VLLM_LOGGING_CONFIG_PATH=path, VLLM_CONFIGURE_LOGGING="1")
    saved = {name: (lg.handlers[:], lg.level, lg.propagate)
             for name in (*ENGINE_LOGGERS, "") for lg in [logging.getLogger(name or None)]}
    try:
        # transformers adds its own stderr handler on first use: take it out now. Its progress
        # bars bypass logging, so they show only with --verbose.
        from transformers.utils import logging as hf_logging
    except ImportError:
        hf_logging = None
    if hf_logging is not None:
        hf_logging.disable_default_handler()
        bars = hf_logging.is_progress_bar_enabled()
        if not verbose:
            hf_logging.disable_progress_bar()
    if not verbose:
        log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.nullcontext() if verbose else _descriptor_2_to(log):
            _route(log, verbose=verbose)
            logging.captureWarnings(True)
            yield log
    finally:
        logging.captureWarnings(False)
        for name, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(name or None)
            for h in lg.handlers[:]:
                lg.removeHandler(h)
                if h not in handlers:
                    h.close()
            for h in handlers:
                lg.addHandler(h)
            lg.setLevel(level)
            lg.propagate = propagate
        if hf_logging is not None and bars:      # its handlers came back with the saved ones above
            hf_logging.enable_progress_bar()
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        Path(path).unlink(missing_ok=True)
        if log.exists() and log.stat().st_size == 0:
            log.unlink()
        if fresh and log.parent.is_dir() and not any(log.parent.iterdir()):
            log.parent.rmdir()

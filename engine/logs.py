"""Engine logs go to ``<run_dir>/engine.log``; the terminal keeps the progress line and the summary.

vLLM, transformers, torch and the other libraries a run loads write warnings and INFO lines (on
the embedded model, vLLM alone warns once per weight that it loads a float32 checkpoint into
bfloat16). `engine_logs` sends every such logger, and Python warnings, to the run's log
file; ``--verbose`` echoes them to stderr as well. vLLM's engine core runs in a child process
and configures its logging from ``VLLM_LOGGING_CONFIG_PATH`` at import, so the same routing is
written there for it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import logging.config
import os
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
                        for name in ENGINE_LOGGERS}}


@contextlib.contextmanager
def engine_logs(run_dir: str | Path, *, verbose: bool = False) -> Iterator[Path]:
    """Route engine logs of this process and of vLLM's child processes to ``run_dir/engine.log``
    while the block runs; logging is as it was afterwards.

    >>> with engine_logs("runs/quickstart"):          # doctest: +SKIP
    ...     execute(cfg)
    """
    log = Path(run_dir).resolve() / LOG_NAME
    config = logging_config(log, verbose=verbose)
    fd, path = tempfile.mkstemp(prefix="synthloop-logging-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh)
    env = {k: os.environ.get(k) for k in ("VLLM_LOGGING_CONFIG_PATH", "VLLM_CONFIGURE_LOGGING")}
    os.environ.update(VLLM_LOGGING_CONFIG_PATH=path, VLLM_CONFIGURE_LOGGING="1")
    saved = {name: (lg.handlers[:], lg.level, lg.propagate)
             for name in ENGINE_LOGGERS for lg in [logging.getLogger(name)]}
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
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    try:
        yield log
    finally:
        logging.captureWarnings(False)
        for name, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(name)
            for h in lg.handlers[:]:
                lg.removeHandler(h)
                if h not in handlers:
                    h.close()
            for h in handlers:
                lg.addHandler(h)
            lg.setLevel(level)
            lg.propagate = propagate
        if hf_logging is not None:
            hf_logging.enable_default_handler()
            if bars:
                hf_logging.enable_progress_bar()
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        Path(path).unlink(missing_ok=True)

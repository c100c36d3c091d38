"""Engine logs go to RUN_DIR/engine.log: library loggers, Python warnings, and what child processes
and C++ code write to file descriptor 2 (vLLM's engine core, torch's NUMA notes); the terminal
keeps the progress line. --verbose shows the logs too."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from synthloop.engine.logs import engine_logs


def _noise() -> None:
    logging.getLogger("vllm.model_executor").warning("Attempted to load weight w with dtype float32")
    logging.getLogger("transformers").warning("transformers says hi")
    warnings.warn("a library warning", FutureWarning)
    os.write(2, b"[W utils.cpp:68] Warning: NUMA binding\n")
    subprocess.run([sys.executable, "-c", "import sys; print('engine core child', file=sys.stderr)"], check=True)


def _logger_state(name: str) -> tuple:
    lg = logging.getLogger(name)
    return lg.propagate, list(lg.handlers), lg.level


def test_engine_noise_lands_in_the_log_not_on_the_terminal(tmp_path, capfd):
    before = {name: _logger_state(name) for name in ("vllm", "transformers", "")}
    with engine_logs(tmp_path / "run") as log:
        _noise()
    out, err = capfd.readouterr()
    text = log.read_text()
    for line in ("Attempted to load weight", "transformers says hi", "a library warning", "NUMA binding",
                 "engine core child"):
        assert line in text and line not in err
    # Afterwards logging is as it was (whatever an earlier import of vllm set up).
    assert {name: _logger_state(name) for name in before} == before


def test_verbose_shows_the_logs_too(tmp_path, capfd):
    with engine_logs(tmp_path / "run", verbose=True) as log:
        _noise()
    _, err = capfd.readouterr()
    assert "Attempted to load weight" in err and "Attempted to load weight" in log.read_text()
    assert "engine core child" in err


def test_a_run_that_logs_nothing_leaves_nothing(tmp_path):
    with engine_logs(tmp_path / "run"):
        pass
    assert not (tmp_path / "run").exists()

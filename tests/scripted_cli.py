"""`synthloop` itself, with the scripted backend answering for models named by a name.

    python tests/scripted_cli.py run CONFIG.toml --out DIR      # = synthloop run ..., scripted

The fault campaign (tests/kill_campaign.py) kills real CLI processes; this entry point is the
real `engine.cli.main` (argument parsing, signal handling, exit codes) with the generation backends
of `run` and `rounds`, and any other backend spec whose model is not a local folder (``embedded``,
``judge``, ...), answered by `ScriptedLLM` (latency per request up to ``SCRIPTED_LATENCY`` seconds,
default 0.02), as the in-process tests do. Training and evaluation load the real (tiny) model.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scripted_llm  # noqa: E402

import synthloop.core.llm as llm_module  # noqa: E402
from synthloop.engine import rounds, runner  # noqa: E402

_real_open = llm_module.open_llm
_scripted = scripted_llm.scripted_factory(latency=float(os.environ.get("SCRIPTED_LATENCY", "0.02")))


def open_llm(spec, *, cache=None):
    if Path(spec.model).is_dir():
        return _real_open(spec, cache=cache)
    return _scripted(spec, cache)


llm_module.open_llm = open_llm
runner.execute.__kwdefaults__["backend_factory"] = _scripted
rounds.run_rounds.__kwdefaults__["backend_factory"] = _scripted

if __name__ == "__main__":
    from synthloop.engine.cli import main
    sys.exit(main(sys.argv[1:]))

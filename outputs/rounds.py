"""`rounds.json`: the record of a self-improvement loop, one entry per finished round.

It lives at the top of a rounds directory, next to the ``round-NN/`` run directories::

    {"format": 1,
     "base": {"benchmark": {"prompt_loose": 0.21, ...}},   # the base student on the benchmark (once)
     "rounds": [
       {"round": 0,
        "run_dir": "round-00",                        # relative to the rounds directory
        "adapter": "round-00/adapter",                # null: this round's student is the base model
        "train_metrics": {"steps": 120, "final_loss": 1.41, "seconds": 960.0, "tokens": 412345},
        "eval": {"loss": 1.52,                        # mean reference-token loss on the held-out set
                 "previous_loss": 1.71,               # the same for the previous student (round 0: the base)
                 "win_rate": 0.58,                    # judge: new student vs previous (null if not run)
                 "wins": 23, "losses": 16, "ties": 2, "parse_failures": 1, "n": 42,
                 "benchmark": {"prompt_loose": 0.27, "instruction_loose": 0.38, ...},  # [rounds] benchmark
                 "previous_benchmark": {...}}}]}             # the previous student's (round 0: the base)

`train_metrics` is a summary of the adapter's train_metrics.json (the per-step losses stay there).
Entries are replaced by round number, so re-running a round overwrites its entry; the file is
written atomically, so a killed loop leaves the previous version.
"""
from __future__ import annotations

import json
from pathlib import Path

from synthloop.outputs.shards import write_bytes_atomic

FORMAT = 1
FILENAME = "rounds.json"


def _read(run_dir: str | Path) -> dict:
    path = Path(run_dir) / FILENAME
    if not path.exists():
        return {"format": FORMAT, "rounds": []}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    rounds = data.get("rounds") if isinstance(data, dict) else None
    if not isinstance(rounds, list) or any(not isinstance(r, dict) or "round" not in r for r in rounds):
        raise ValueError(f"{path}: expected {{\"rounds\": [{{\"round\": N, ...}}, ...]}}")
    return data


def _write(run_dir: Path, data: dict) -> None:
    write_bytes_atomic(json.dumps({"format": FORMAT, **data}, indent=2).encode("utf-8"), run_dir / FILENAME)


def load_base(run_dir: str | Path) -> dict | None:
    """The base student's evaluation stored once per loop (None until it is)."""
    return _read(run_dir).get("base")


def record_base(run_dir: str | Path, base: dict) -> None:
    data = _read(run_dir)
    _write(Path(run_dir), {**{k: v for k, v in data.items() if k != "format"}, "base": base})


def load_rounds(run_dir: str | Path) -> list[dict]:
    """The entries of ``run_dir/rounds.json`` sorted by round; [] when there is none.

    >>> load_rounds("runs/loop")[0]["eval"]["loss"]     # doctest: +SKIP
    1.52
    """
    return sorted(_read(run_dir)["rounds"], key=lambda r: r["round"])


def record_round(run_dir: str | Path, entry: dict) -> list[dict]:
    """Add (or replace, by round number) one entry and rewrite rounds.json atomically."""
    if not isinstance(entry.get("round"), int):
        raise ValueError("a rounds.json entry needs an integer 'round'")
    data = _read(run_dir)
    rounds = [r for r in data["rounds"] if r["round"] != entry["round"]] + [entry]
    rounds.sort(key=lambda r: r["round"])
    _write(Path(run_dir), {**{k: v for k, v in data.items() if k != "format"}, "rounds": rounds})
    return rounds

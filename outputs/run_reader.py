"""Read-only views of run directories: committed shards, rejects and round folders.

Unlike `RunStore.open()`, nothing here writes or cleans up, so a report, a dataset card or a
training job may read a run that another process is still writing: only what the last
manifest commit lists is read.

A *rounds directory* holds one run directory per self-improvement round (``round-00/``,
``round-01/``, ...), each with its own ``manifest.json``, next to ``rounds.json`` (outputs/rounds.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from synthloop.core.schema import SCHEMA
from synthloop.outputs.manifest import load_manifest
from synthloop.outputs.paths import inside
from synthloop.outputs.shards import REJECTS_SCHEMA, scan_shards

_ROUND = re.compile(r"^round-(\d+)$")


def _paths(run_dir: Path, manifest: dict, key: str, pending_key: str) -> list[Path]:
    paths = [inside(run_dir, e["path"], what="manifest path") for e in manifest.get(key, [])]
    pending = (manifest.get("pending") or {}).get(pending_key)
    if pending:   # rows not yet filling a shard are committed too
        paths.append(inside(run_dir, pending, what="manifest path"))
    return paths


def kept_paths(run_dir: str | Path) -> list[Path]:
    """Parquet files of the committed dataset of one run directory, in commit order.

    >>> kept_paths("runs/quickstart")        # doctest: +SKIP
    [PosixPath('runs/quickstart/data/shard-00000.parquet')]
    """
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    if manifest is None:
        raise FileNotFoundError(f"{run_dir}: no manifest.json (not a run directory)")
    return _paths(run_dir, manifest, "shards", "kept")


def rejects_paths(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir) or {}
    return _paths(run_dir, manifest, "rejects", "rejects")


def read_kept(run_dir: str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    frame = scan_shards(kept_paths(run_dir), SCHEMA)
    return (frame.select(columns) if columns else frame).collect()


def read_rejects(run_dir: str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    frame = scan_shards(rejects_paths(run_dir), REJECTS_SCHEMA)
    return (frame.select(columns) if columns else frame).collect()


def round_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(round number, folder) of every ``round-NN/`` run directory under `run_dir`, by round."""
    run_dir = Path(run_dir)
    found = []
    for sub in run_dir.iterdir() if run_dir.is_dir() else []:
        m = _ROUND.match(sub.name)
        if m and sub.is_dir() and (sub / "manifest.json").exists():
            found.append((int(m.group(1)), sub))
    return sorted(found)


def run_dirs(run_dir: str | Path) -> list[tuple[int | None, Path]]:
    """The run directories a path stands for: its rounds if it has any, else itself.

    >>> run_dirs("runs/loop")                 # doctest: +SKIP
    [(0, PosixPath('runs/loop/round-00')), (1, PosixPath('runs/loop/round-01'))]
    """
    rounds = round_dirs(run_dir)
    if rounds:
        return list(rounds)
    if not (Path(run_dir) / "manifest.json").exists():
        raise FileNotFoundError(f"{run_dir}: neither a run directory (manifest.json) nor a rounds "
                                "directory (round-NN/ folders)")
    return [(None, Path(run_dir))]

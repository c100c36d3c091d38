"""Parquet shards: atomic writes, fixed row counts, and reading them back.

A shard is written under a temporary name, fsynced and renamed, so a reader (or a resumed run)
never sees half a file. A `ShardSeries` rolls shards at a fixed row count; rows that do not yet
fill a shard are kept in a *pending* file at each commit, so a commit never writes short shards
and never loses rows.
"""
from __future__ import annotations

import glob
import io
import os
from pathlib import Path
from typing import Iterable

import polars as pl

from synthloop.core.schema import SCHEMA, upgrade

#: Rejects carry the stage that dropped them next to the record schema.
REJECTS_SCHEMA = pl.Schema({**SCHEMA, "drop_stage": pl.String})


def write_parquet_atomic(df: pl.DataFrame, path: Path, *, compression: str = "zstd") -> None:
    """Write `df` to `path` so that `path` is either absent or complete.

    >>> write_parquet_atomic(pl.DataFrame({"a": [1]}), Path("/tmp/_sl_doc.parquet"))
    """
    # Encoded in memory, written with Python's own file calls: a full disk then raises OSError
    # (ENOSPC) naming the file; polars' own writer reports it as an unrelated format error.
    buf = io.BytesIO()
    df.write_parquet(buf, compression=compression, statistics=True)
    write_bytes_atomic(buf.getbuffer(), path)


def write_bytes_atomic(data: bytes | memoryview, path: Path) -> None:
    """Write `data` to `path` under a temporary name, fsync, rename: `path` is either the old
    file or the new one. Temporary files that killed writers left beside it are removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: Path) -> None:
    """Remove the temporary files writers of `path` that were killed left (``.<name>.tmp-<pid>``
    of a pid no longer running); a live writer's file is left alone."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def fsync_dir(directory: Path) -> None:
    """Make renames inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardSeries:
    """Numbered shards `<prefix>-00000.parquet`, ... of exactly `rows_per_shard` rows (the last may be short).

    `add` buffers; `commit` writes every full shard and returns (new shard entries, pending rows);
    the caller persists the pending rows with the manifest and hands them back on resume.
    """

    def __init__(self, directory: Path, prefix: str, *, schema: pl.Schema, rows_per_shard: int,
                 next_index: int = 0, pending: pl.DataFrame | None = None):
        if rows_per_shard < 1:
            raise ValueError("rows_per_shard must be >= 1")
        self.directory, self.prefix, self.schema = directory, prefix, schema
        self.rows_per_shard, self.next_index = rows_per_shard, next_index
        self._parts: list[pl.DataFrame] = [] if pending is None or pending.is_empty() else [pending]
        self._buffered = 0 if pending is None else pending.height

    @property
    def buffered(self) -> int:
        return self._buffered

    def add(self, batch: pl.DataFrame) -> None:
        if batch.height:
            self._parts.append(batch)
            self._buffered += batch.height

    def full(self) -> bool:
        return self._buffered >= self.rows_per_shard

    def commit(self, *, final: bool = False) -> tuple[list[dict], pl.DataFrame]:
        """Write full shards (and, if `final`, the remainder); return their entries and what is left."""
        buf = pl.concat(self._parts, how="vertical") if self._parts else pl.DataFrame(schema=self.schema)
        entries, start = [], 0
        while buf.height - start >= self.rows_per_shard or (final and buf.height > start):
            part = buf.slice(start, self.rows_per_shard)
            name = f"{self.prefix}-{self.next_index:05d}.parquet"
            write_parquet_atomic(part, self.directory / name)
            entries.append({"path": f"{self.directory.name}/{name}", "rows": part.height})
            self.next_index += 1
            start += part.height
        rest = buf.slice(start)
        self._parts = [rest] if rest.height else []
        self._buffered = rest.height
        return entries, rest


def scan_shards(paths: Iterable[Path], schema: pl.Schema = SCHEMA) -> pl.LazyFrame:
    """Lazily read shards (in the given order) as one frame; no paths gives an empty frame.
    Shards an older synthloop wrote are upgraded to `schema` (core/schema.py:upgrade)."""
    paths = [str(p) for p in paths]
    if not paths:
        return pl.LazyFrame(schema=schema)
    if all(pl.Schema(pl.read_parquet_schema(p)) == schema for p in paths):
        return pl.scan_parquet(paths)
    return pl.concat([upgrade(pl.scan_parquet(p), schema) for p in paths], how="vertical")

"""A run directory: kept shards, rejects shards, pending rows and the manifest, committed together.

Layout of ``runs/<name>/``::

    manifest.json          the commit record (see outputs/manifest.py)
    data/shard-00000.parquet ...      kept records, record schema, zstd
    rejects/rejects-00000.parquet ... dropped records with drop_reason and drop_stage
    pending/kept-<commit>.parquet     rows not yet filling a shard, carried to the next commit

Crash safety: every file is written under a temp name and renamed, and the manifest is replaced
last. On open, files the manifest does not list (written after the last commit) and the temporary
files of a killed writer are removed, so a resumed run continues from exactly what was committed.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import polars as pl

from synthloop.core.schema import SCHEMA, upgrade
from synthloop.outputs.manifest import FORMAT, load_manifest, save_manifest
from synthloop.outputs.paths import confine
from synthloop.outputs.shards import (REJECTS_SCHEMA, ShardSeries, fsync_dir, remove_stale_temps, scan_shards,
                                      write_parquet_atomic)


class ConfigMismatch(RuntimeError):
    pass


class RunStore:
    """Owns one run directory. `open()` first, then `add`/`reject`, `commit`, and `committed` views."""

    def __init__(self, run_dir: Path, *, config_hash: str, rows_per_shard: int = 1000):
        self.dir = Path(run_dir)
        self.config_hash = config_hash
        self.rows_per_shard = rows_per_shard
        self.manifest: dict = {}
        self._ids: set[str] = set()
        # True from the start of a commit until it completed. A commit cut short (Ctrl-C inside
        # it) leaves it True: its shard series moved on without a manifest, so nothing may
        # commit on top of it; the previous commit stands and a rerun removes the strays.
        self.committing = False

    # -- opening and resuming ---------------------------------------------------------------
    def open(self, *, meta: dict) -> dict | None:
        """Load the last commit (or start fresh); returns the previous manifest, if any."""
        confine(self.dir, ("manifest.json", "data", "rejects", "pending"), what="run file")
        prev = load_manifest(self.dir)
        if prev is not None:     # resume reads, and cleans up next to, every path the manifest lists
            confine(self.dir, [e.get("path") for e in prev.get("shards", []) + prev.get("rejects", [])]
                    + list(prev.get("pending", {}).values()), what="manifest path")
        if prev is not None and prev.get("config_hash") != self.config_hash:
            raise ConfigMismatch(
                f"{self.dir}: made by a different config (hash {prev.get('config_hash')} != "
                f"{self.config_hash}); use another --out or remove the directory")
        now = time.time()
        self.manifest = dict(prev) if prev else {
            "format": FORMAT, "run_id": uuid.uuid4().hex[:12], "config_hash": self.config_hash,
            "created_at": now, "commits": 0, "complete": False,
            "shards": [], "rejects": [], "pending": {}, "pending_rows": {"kept": 0, "rejects": 0},
            "stages": [], "state": {}, "llm": {},
        }
        self.manifest.update(meta)
        self._remove_uncommitted()
        pending = self.manifest.get("pending", {})
        self.kept = ShardSeries(self.dir / "data", "shard", schema=SCHEMA,
                                rows_per_shard=self.rows_per_shard,
                                next_index=len(self.manifest["shards"]),
                                pending=self._read_pending(pending.get("kept"), SCHEMA))
        self.rej = ShardSeries(self.dir / "rejects", "rejects", schema=REJECTS_SCHEMA,
                               rows_per_shard=self.rows_per_shard,
                               next_index=len(self.manifest["rejects"]),
                               pending=self._read_pending(pending.get("rejects"), REJECTS_SCHEMA))
        self._ids = set(self.committed_kept().select("id").collect()["id"].to_list())
        return prev

    def _read_pending(self, rel: str | None, schema: pl.Schema) -> pl.DataFrame | None:
        return upgrade(pl.read_parquet(self.dir / rel), schema) if rel else None

    def _listed(self) -> set[str]:
        m = self.manifest
        return {e["path"] for e in m["shards"] + m["rejects"]} | set(m.get("pending", {}).values())

    def _remove_uncommitted(self) -> None:
        remove_stale_temps(self.dir / "manifest.json")      # a manifest write cut short by a kill
        listed = self._listed()
        for sub in ("data", "rejects", "pending"):
            for f in (self.dir / sub).glob("*") if (self.dir / sub).is_dir() else []:
                if f"{sub}/{f.name}" not in listed:
                    f.unlink()

    # -- the dataset so far -----------------------------------------------------------------
    def committed_kept(self) -> pl.LazyFrame:
        """Every kept row committed so far (shards, then pending), in commit order."""
        m = self.manifest
        paths = [self.dir / e["path"] for e in m["shards"]]
        if m.get("pending", {}).get("kept"):
            paths.append(self.dir / m["pending"]["kept"])
        return scan_shards(paths, SCHEMA)

    def committed_rejects(self) -> pl.LazyFrame:
        m = self.manifest
        paths = [self.dir / e["path"] for e in m["rejects"]]
        if m.get("pending", {}).get("rejects"):
            paths.append(self.dir / m["pending"]["rejects"])
        return scan_shards(paths, REJECTS_SCHEMA)

    # -- writing ----------------------------------------------------------------------------
    @property
    def kept_rows(self) -> int:
        return len(self._ids)

    def is_new(self, ids: pl.Series) -> pl.Series:
        """True where an id is not yet in the dataset (the writer's exactly-once guard)."""
        seen = self._ids
        return pl.Series([i not in seen for i in ids.to_list()], dtype=pl.Boolean)

    def add(self, batch: pl.DataFrame) -> None:
        self._ids.update(batch["id"].to_list())
        self.kept.add(batch)

    def reject(self, batch: pl.DataFrame, stage: str) -> None:
        if batch.height:
            self.rej.add(batch.with_columns(pl.lit(stage).alias("drop_stage")))

    def commit_due(self) -> bool:
        return self.kept.full() or self.rej.full()

    def commit(self, *, stages: list[dict], state: dict, llm: dict, batches: int = 0, complete: bool = False,
               final: bool = False, languages: dict | None = None) -> None:
        """Persist everything added so far; the manifest rename is the commit point. `batches`
        is the watermark: how many source batches the committed rows and state cover;
        `languages` counts the kept rows per language code."""
        self.committing = True
        self._commit(stages=stages, state=state, llm=llm, batches=batches, complete=complete, final=final,
                     languages=languages)
        self.committing = False

    def _commit(self, *, stages, state, llm, batches, complete, final, languages) -> None:
        m = self.manifest
        self.dir.mkdir(parents=True, exist_ok=True)
        seq = m["commits"] + 1
        new_kept, rest_kept = self.kept.commit(final=final)
        new_rej, rest_rej = self.rej.commit(final=final)
        old_pending = dict(m.get("pending", {}))
        pending = {}
        for key, rest in (("kept", rest_kept), ("rejects", rest_rej)):
            if rest.height:
                rel = f"pending/{key}-{seq:06d}.parquet"
                write_parquet_atomic(rest, self.dir / rel)
                pending[key] = rel
        for sub in ("data", "rejects", "pending"):
            if (self.dir / sub).is_dir():
                fsync_dir(self.dir / sub)
        m.update(commits=seq, updated_at=time.time(), complete=complete,
                 shards=m["shards"] + new_kept, rejects=m["rejects"] + new_rej, pending=pending,
                 pending_rows={"kept": rest_kept.height, "rejects": rest_rej.height},
                 stages=stages, state=state, llm=llm, batches=batches)
        if languages is not None:
            m["languages"] = languages
        save_manifest(self.dir, m)
        for rel in set(old_pending.values()) - set(pending.values()):
            (self.dir / rel).unlink(missing_ok=True)

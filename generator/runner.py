"""The local streaming runner: source -> stages -> shards, with exact checkpoints.

Batches are pulled through the chain one at a time (memory stays flat: at most one batch per
stage is alive). After every stage the runner routes rows with a ``drop_reason`` to the rejects
stream and counts them; a last ``write`` step drops ids already in the dataset
(``duplicate_id``) so the shards hold each record once. At every batch boundary no stage holds
rows in flight (the one-batch-out-per-batch-in contract, checked here), so a snapshot of the
counts and of each stage's `state()` taken there is exact; commits persist it with the rows.
Killed at any instant, a rerun restores that snapshot and continues.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import polars as pl

from synthloop.generator.config import RunConfig
from synthloop.generator.llm import RequestCache, open_llm
from synthloop.generator.models import cache_dir
from synthloop.generator.registry import Context, build
from synthloop.generator.schema import SCHEMA
from synthloop.generator.stages import Batches
from synthloop.outputs.manifest import stage_row
from synthloop.outputs.run_store import RunStore
from synthloop.seeds.loaders import load_seeds


class ContractError(RuntimeError):
    pass


@dataclass
class Counts:
    name: str
    n_in: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    pulled: int = 0      # batches taken from upstream
    yielded: int = 0     # batches passed downstream

    def row(self) -> dict:
        return stage_row(self.name, self.n_in, self.kept, dict(self.dropped))

    def load(self, row: dict) -> None:
        self.n_in, self.kept, self.dropped = row["in"], row["kept"], Counter(row["dropped"])


class _Committed:
    """The `committed` view handed to one part's `restore()`; `later` names the parts after it."""

    def __init__(self, store: RunStore, later: tuple[str, ...] = ()):
        self.store, self.later = store, later

    def kept(self) -> pl.LazyFrame:
        return self.store.committed_kept()

    def rejects(self) -> pl.LazyFrame:
        return self.store.committed_rejects()

    def passed(self) -> pl.LazyFrame:
        """Rows that came out of this part: kept rows plus rows a later part dropped."""
        later = self.rejects().filter(pl.col("drop_stage").is_in(list(self.later)))
        return pl.concat([self.kept(), later.select(list(SCHEMA.names()))])


def _count_in(batches: Batches, c: Counts) -> Batches:
    for b in batches:
        c.n_in += b.height
        c.pulled += 1
        yield b


def _split(batches: Batches, c: Counts, store: RunStore) -> Batches:
    for b in batches:
        c.yielded += 1
        bad = b["drop_reason"].is_not_null()
        if bad.any():
            rej = b.filter(bad)
            c.dropped.update(rej["drop_reason"].to_list())
            store.reject(rej, c.name)
            b = b.filter(~bad)
        c.kept += b.height
        yield b


def _write_guard(batches: Batches, store: RunStore) -> Batches:
    for b in batches:
        fresh = store.is_new(b["id"]) & b["id"].is_first_distinct()
        yield b.with_columns(pl.when(fresh).then(pl.col("drop_reason"))
                             .otherwise(pl.lit("duplicate_id")).alias("drop_reason"))


@dataclass
class Pipeline:
    source: Any
    stages: list
    ctx: Context

    @property
    def parts(self) -> list:
        return [self.source, *self.stages]


def build_pipeline(cfg: RunConfig, ctx: Context) -> Pipeline:
    source = build("source", cfg.source, ctx, "source")
    stages = [build("stage", st, ctx, f"stages.{i}") for i, st in enumerate(cfg.stages)]
    return Pipeline(source, stages, ctx)


def open_cache(cfg: RunConfig) -> RequestCache | None:
    if cfg.run.cache == "off":
        return None
    path = cache_dir() / "requests.sqlite" if cfg.run.cache == "default" else Path(cfg.run.cache)
    return RequestCache(path)


def run_dir_for(cfg: RunConfig, out: str | Path | None) -> Path:
    return Path(out or cfg.run.out or Path("runs") / cfg.run.name)


def execute(cfg: RunConfig, *, out: str | Path | None = None, limit: int | None = None,
            show_progress: bool = True, backend_factory=open_llm) -> dict:
    """Run (or resume) a config into its run directory; returns the final manifest.

    `backend_factory(spec, cache=...)` builds LLM backends (tests pass a scripted one).

    >>> manifest = execute(load_config("configs/quickstart.toml"), limit=20)   # doctest: +SKIP
    """
    limit = cfg.run.limit if limit is None else limit
    seeds = load_seeds(cfg.seeds.path, format=cfg.seeds.format, fields=cfg.seeds.fields)
    run_dir = run_dir_for(cfg, out)
    store = RunStore(run_dir, config_hash=cfg.hash(), rows_per_shard=cfg.run.shard_rows)
    prev = store.open(meta={"name": cfg.run.name, "config_path": cfg.path, "config": cfg.text,
                            "seeds": {"path": str(cfg.seeds.path), "records": len(seeds)},
                            "models": {role: f"{s.backend}:{s.model}" for role, s in cfg.llm.items()},
                            "limit": limit})
    if prev and prev.get("complete") and prev.get("limit") == limit:
        print(f"{run_dir}: already complete ({store.kept_rows} records)", file=sys.stderr)
        return store.manifest
    cache = open_cache(cfg)
    ctx = Context(config=cfg, run_dir=run_dir, seeds=seeds, open_llm=lambda spec: backend_factory(spec, cache=cache))
    pipe = build_pipeline(cfg, ctx)
    try:
        return _drive(pipe, store, prev, limit, show_progress)
    finally:
        for part in pipe.parts:
            if hasattr(part, "close"):
                part.close()
        for llm in ctx.llms():
            llm.close()
        if cache is not None:
            cache.close()


def _llm_totals(ctx: Context, before: dict) -> dict:
    now = Counter()
    for llm in ctx.llms():
        now.update(llm.stats.as_dict())
    total = Counter(before.get("total", {}))
    total.update(now)
    return {"last_process": dict(now), "total": dict(total)}


def _drive(pipe: Pipeline, store: RunStore, prev: dict | None, limit: int, show_progress: bool) -> dict:
    counts = [Counts(getattr(p, "name", type(p).__name__)) for p in pipe.parts] + [Counts("write")]
    names = [c.name for c in counts]
    llm_before = (prev or {}).get("llm", {})
    if prev:
        rows = {r["name"]: r for r in prev.get("stages", [])}
        for c in counts:
            if c.name in rows:
                c.load(rows[c.name])
        for part in pipe.parts:
            if hasattr(part, "restore"):
                later = tuple(names[names.index(part.name) + 1:])
                part.restore(prev.get("state", {}).get(part.name, {}), _Committed(store, later))

    stream: Iterator[pl.DataFrame] = _split(pipe.source(), counts[0], store)
    for st, c in zip(pipe.stages, counts[1:-1]):
        stream = _split(st(_count_in(stream, c)), c, store)
    stream = _split(_write_guard(_count_in(stream, counts[-1]), store), counts[-1], store)

    def snapshot(complete: bool = False) -> dict:
        for c in counts[1:]:
            if c.pulled != c.yielded:
                raise ContractError(f"stage {c.name} yielded {c.yielded} batches for {c.pulled} pulled; "
                                    "a stage must yield exactly one batch per input batch")
        return {"stages": [c.row() for c in counts],
                "state": {p.name: p.state() for p in pipe.parts if hasattr(p, "state")},
                "llm": _llm_totals(pipe.ctx, llm_before), "complete": complete}

    from synthloop.generator.progress import RunProgress
    progress = RunProgress(limit=limit, enabled=show_progress, start_rows=store.kept_rows)
    last = snapshot()
    try:
        with progress:
            if not (limit and store.kept_rows >= limit):
                for batch in stream:
                    snap = snapshot()
                    last = None          # store and snapshot disagree until both are updated
                    store.add(batch)
                    last = snap
                    progress.update(store.kept_rows, sum(sum(c.dropped.values()) for c in counts), pipe.ctx.llms())
                    if store.commit_due():
                        store.commit(**last)
                    if limit and store.kept_rows >= limit:
                        break
            stream.close()
            store.commit(**snapshot(complete=True), final=True)
    except KeyboardInterrupt:
        # Rows added up to the last batch boundary are consistent with `last`: keep them.
        # Interrupted inside a commit or between add and snapshot, we keep the previous commit.
        if last is not None and not store.committing:
            store.commit(**last)
        print(f"interrupted: {store.kept_rows} records committed; rerun the same command to continue",
              file=sys.stderr)
        raise
    return store.manifest

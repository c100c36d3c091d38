"""Running a config: source -> stages -> shards, resumable, on the executor the config names.

`execute` opens the run directory and the request cache, builds the source and stages, restores
them on a resumed run, and hands them to an executor (engine/executors.py) on one event loop;
the commit point (engine/commit.py) routes rejects, counts and commits. Ctrl-C or SIGTERM
commits what was applied; killed at any instant, a rerun continues from the last commit.
"""
from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthloop.engine.commit import Committer
from synthloop.core.config import ConfigError, RunConfig
from synthloop.engine.executors import PipelinedExecutor, SequentialExecutor
from synthloop.core.llm import RequestCache, open_llm
from synthloop.core.models import cache_dir
from synthloop.core.registry import Context, build
from synthloop.outputs.manifest import model_identity
from synthloop.outputs.run_store import RunStore
from synthloop.seeds.loaders import load_seeds

#: Requests kept in flight when no backend says how many it wants (no LLM in the pipeline).
DEFAULT_IN_FLIGHT = 64


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


def make_executor(name: str, ctx: Context, in_flight: int = 0, cluster=None):
    """The executor a config names; the pipelined one (also the driver side of the ray one, whose
    engines `cluster` placed) keeps `in_flight` requests outstanding (0: the largest
    `default_in_flight` of the run's backends)."""
    if name == "sequential":
        return SequentialExecutor()
    if name not in ("pipelined", "ray"):
        raise ValueError(f"unknown executor '{name}' (sequential, pipelined, ray)")
    llms = ctx.llms()
    budget = in_flight or max((l.default_in_flight for l in llms), default=DEFAULT_IN_FLIGHT)
    pipelined = PipelinedExecutor(budget=budget, in_flight=lambda: sum(l.in_flight for l in llms),
                                  speculate=ctx.speculate)
    if name == "ray":
        from synthloop.engine.ray_executor import RayExecutor
        return RayExecutor(cluster, pipelined)
    return pipelined


def execute(cfg: RunConfig, *, out: str | Path | None = None, limit: int | None = None,
            show_progress: bool = True, backend_factory=open_llm, executor: str | None = None,
            address: str | None = None) -> dict:
    """Run (or resume) a config into its run directory; returns the final manifest.

    `backend_factory(spec, cache=...)` builds LLM backends (tests pass a scripted one; on Ray it
    runs in each engine actor, with ``cache=None``); `executor` overrides ``[run] executor``
    ("pipelined", "sequential" or "ray"); `address` overrides ``[run.ray] address``.

    >>> manifest = execute(load_config("configs/quickstart.toml"), limit=20)   # doctest: +SKIP
    """
    limit = cfg.run.limit if limit is None else limit
    seeds = load_seeds(cfg.seeds.path, format=cfg.seeds.format, fields=cfg.seeds.fields)
    run_dir = run_dir_for(cfg, out)
    store = RunStore(run_dir, config_hash=cfg.hash(), rows_per_shard=cfg.run.shard_rows)
    prev = store.open(meta={"name": cfg.run.name, "config_path": cfg.path, "config": cfg.text,
                            "seeds": {"path": str(cfg.seeds.path), "records": len(seeds)},
                            "models": {role: f"{s.backend}:{s.model}" for role, s in cfg.llm.items()},
                            "model_details": {role: model_identity(s) for role, s in cfg.llm.items()},
                            "limit": limit})
    if prev and prev.get("complete") and prev.get("limit") == limit:
        print(f"{run_dir}: already complete ({store.kept_rows} records)", file=sys.stderr)
        return store.manifest
    cache = open_cache(cfg)
    name = executor or cfg.run.executor
    cluster = None
    if name == "ray":
        try:
            from synthloop.engine.ray_executor import RayCluster
        except ImportError as e:
            raise ConfigError(f"{cfg.path}: executor 'ray' needs Ray ({e}): pip install 'synthloop[ray]'") from None
        cluster = RayCluster(cfg, backend_factory, cache, address)
    ctx = Context(config=cfg, run_dir=run_dir, seeds=seeds,
                  open_llm=cluster.open_llm if cluster else lambda spec: backend_factory(spec, cache=cache),
                  speculate=lambda: cache is None or cache.misses > 0)
    pipe = None
    try:
        pipe = build_pipeline(cfg, ctx)
        return _drive(pipe, store, prev, limit, show_progress, make_executor(name, ctx, cfg.run.in_flight, cluster))
    finally:
        for part in pipe.parts if pipe else []:
            if hasattr(part, "close"):
                part.close()
        for llm in ctx.llms():
            llm.close()
        if cluster is not None:
            cluster.close()
        if cache is not None:
            cache.close()


def _drive(pipe: Pipeline, store: RunStore, prev: dict | None, limit: int, show_progress: bool, executor) -> dict:
    from synthloop.engine.progress import RunProgress
    progress = RunProgress(limit=limit, enabled=show_progress, start_rows=store.kept_rows)
    commit = Committer(pipe.parts, store, prev, limit=limit, llms=pipe.ctx.llms, progress=progress)
    with progress, asyncio.Runner() as loop:
        try:
            loop.run(executor.run(pipe.source, pipe.stages, commit))
            commit.finish()
        except KeyboardInterrupt:
            commit.interrupted()
            print(f"interrupted: {store.kept_rows} records committed; rerun the same command to continue",
                  file=sys.stderr)
            raise
    return store.manifest

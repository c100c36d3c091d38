"""The ray executor: the same config and stages, with the model engines and CPU stages on a cluster.

What a run writes is fixed by the stages and the commit point (engine/executors.py), so this
executor moves only *where* work happens and keeps everything that decides the output on the
driver:

- **Engines** (engine/ray_engines.py): every backend of the run is a pool of Ray actors, one
  engine per GPU (or per ``cpus_per_engine`` CPUs), each fed many requests at once. Stages,
  sources and the judge reach them through the usual LLM seam, behind the driver's request
  cache: cached answers never leave the driver, and the cache is one local SQLite file even on a
  cluster without a shared file system.
- **CPU stages**: an unordered stage made of a plain function (heuristics, function scorers)
  runs as a Ray task per batch on its Arrow table, the per-block form of Ray Data's
  ``map_batches``; a task whose worker dies is run again by Ray (the function is pure).
- **The driver** runs the pipelined executor as it is: the source, the ordered stages (dedup
  indexes, judge, constraints) in id order, and the commit point, so shards, rejects, counts,
  manifest and resume are the local executors' by construction.
"""
from __future__ import annotations

import dataclasses
import pickle
import sys
import time
from typing import Any, Callable

import polars as pl
import ray

from synthloop.core.config import ConfigError, RaySection, RunConfig
from synthloop.core.llm import BackendSpec, CachedLLM, RequestCache
from synthloop.core.schema import empty_batch
from synthloop.core.stages import PerBatch
from synthloop.engine.ray_engines import MODEL_BACKENDS, EnginePool, placement


@ray.remote
def _map_batch(fn: Callable[[pl.DataFrame], pl.DataFrame], table):
    return fn(pl.from_arrow(table)).to_arrow()


class RemoteStage:
    """An unordered function stage whose batches run as Ray tasks; state and closing stay with
    the stage on the driver."""

    ordered = False

    def __init__(self, stage: PerBatch, fn_ref):
        self.stage, self.fn_ref, self.name = stage, fn_ref, stage.name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.stage, attr)

    async def process(self, batch: pl.DataFrame, batch_id: int) -> pl.DataFrame:
        # Arrow both ways: the frame comes back with the very schema it left with.
        return pl.from_arrow(await _map_batch.remote(self.fn_ref, batch.to_arrow()))


class RayCluster:
    """A connection to a Ray cluster and the engine pools of one run.

    ``open_llm(spec)`` is the run's backend opener (`Context.open_llm`): a pool of engine actors
    behind the driver's request cache. `place(stages)` sends the function stages to the cluster.
    The pools are the run's backends: closing them (the runner does) ends their actors.
    `close()` disconnects from Ray if this object started or joined it.
    """

    def __init__(self, cfg: RunConfig, factory: Callable, cache: RequestCache | None, address: str | None = None):
        self.settings = RaySection(**cfg.run.ray)
        self.factory, self.cache, self.path = factory, cache, cfg.path
        # The GPUs are shared among the distinct backends that run a model (HTTP clients need none).
        self.backends = max(1, len({repr(dataclasses.asdict(s)) for s in cfg.llm.values() if s.backend in MODEL_BACKENDS}))
        self.owned = not ray.is_initialized()
        if self.owned:
            # "" asks Ray to find a cluster ($RAY_ADDRESS, one started on this machine) or start one.
            where = address or self.settings.address or None
            try:
                ray.init(address=where, log_to_driver=False)
            except ConnectionError as e:
                raise ConfigError(f"{cfg.path}: cannot join a Ray cluster at {where or '$RAY_ADDRESS'}: {e}") from None
        res = ray.cluster_resources()
        print(f"ray: cluster of {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU, "
              f"{res.get('GPU', 0):g} GPU", file=sys.stderr)

    def open_llm(self, spec: BackendSpec):
        try:
            engines, gpus, cpus = placement(self.settings, spec, self.backends, ray.cluster_resources().get("GPU", 0))
        except ValueError as e:
            raise ConfigError(f"{self.path}: {e}") from None
        pool = EnginePool(spec, self.factory, engines=engines, num_gpus=gpus, num_cpus=cpus,
                          max_restarts=self.settings.max_restarts)
        return CachedLLM(pool, self.cache, spec.backend) if self.cache is not None else pool

    async def place(self, stages: list) -> list:
        """The stages, with every unordered function stage running on the cluster (one that does
        not pickle, e.g. holding a local model, stays on the driver, and says so). Each sends an
        empty batch first, so its workers' start (imports) is paid, and shown, before the run."""
        out = []
        for st in stages:
            if isinstance(st, PerBatch) and not st.ordered:
                try:
                    remote = RemoteStage(st, ray.put(st.fn))
                except (TypeError, pickle.PicklingError, AttributeError) as e:
                    print(f"ray: stage {st.name} runs on the driver (cannot send it: {e})", file=sys.stderr)
                else:
                    t0 = time.perf_counter()
                    await remote.process(empty_batch(), -1)
                    print(f"ray: stage {st.name} runs as tasks, first one in {time.perf_counter() - t0:.1f} s",
                          file=sys.stderr)
                    st = remote
            out.append(st)
        return out

    def close(self) -> None:
        if self.owned:
            ray.shutdown()


class RayExecutor:
    """`run(source, stages, commit)` of the inner (pipelined) executor, with the function stages
    placed on the cluster; the engines were placed when the stages opened their backends."""

    def __init__(self, cluster: RayCluster, inner: Any):
        self.cluster, self.inner = cluster, inner

    async def run(self, source: Any, stages: list, commit) -> None:
        await self.inner.run(source, await self.cluster.place(stages), commit)

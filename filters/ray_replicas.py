"""`synthloop score --executor ray` and `synthloop select --executor ray`: replicas on a Ray cluster.

A `ReplicaPool` holds `replicas` actors, each built once by the same picklable `build()` (a
scorer with its model, an embedding model) and then fed batches: up to two per actor in flight,
each to the actor with the fewest outstanding, results handed back in input order. Every call
returns the work's output and how much its counters (`stats`) moved, so the driver adds up
exactly the calls whose results it used.

Faults: an actor that dies (its process killed, its node lost) fails the batches it held; the
pool sends them to another actor and Ray restarts the dead one (`max_restarts`). A batch is a
pure function of its rows and settings (judge requests carry their seeds), so a batch sent again
gives the same rows: nothing is lost or doubled.

- score: the replicas are the scorer itself, each with its own model or backend (one per GPU on
  a GPU cluster, else one per CPU), so judge, deita, ifd and reward scale like function scorers.
- select: the replicas encode (the costly part, spread over the cluster); the greedy pick, best
  score first against everything kept so far, is one sequential pass on the driver
  (filters/select.py), so Ray keeps the same rows as the local command.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import polars as pl


def plain_stats(stats: Any) -> Any:
    """A scorer's counters as nested dicts of numbers (RatingStats and dicts of them included)."""
    if hasattr(stats, "as_dict"):
        return stats.as_dict()
    if isinstance(stats, dict):
        return {k: plain_stats(v) for k, v in stats.items()}
    return stats


def add_stats(a: Any, b: Any, sign: int = 1) -> Any:
    """a + sign * b over nested dicts of numbers; a key either side lacks counts as 0 there, and
    what is not a number (a name) is kept as it is."""
    if isinstance(a, dict) or isinstance(b, dict):
        a, b = (a if isinstance(a, dict) else {}), (b if isinstance(b, dict) else {})
        return {k: add_stats(a.get(k, 0), b.get(k, 0), sign) for k in {**a, **b}}
    number = (int, float)
    if isinstance(a, number) and isinstance(b, number) and not isinstance(a, bool) and not isinstance(b, bool):
        return a + sign * b
    return b if isinstance(a, number) and a == 0 else a


class _Replica:
    """One `build()` result in one actor process; `call` returns (output, change of its stats)."""

    def __init__(self, build: Callable[[], Callable]):
        import os

        import ray
        import torch

        # torch's default (every core in every actor) would oversubscribe the node
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.fn, self.pid = build(), os.getpid()

    def ping(self) -> int:
        return self.pid

    def call(self, item):
        before = plain_stats(getattr(self.fn, "stats", None))
        out = self.fn(item)
        after = plain_stats(getattr(self.fn, "stats", None))
        return out, (add_stats(after, before, -1) if after is not None else None)

    def close(self) -> None:
        if hasattr(self.fn, "close"):
            self.fn.close()


@dataclass
class ReplicaPool:
    """`replicas` actors of `build()`; see the module docstring."""

    build: Callable[[], Callable]
    replicas: int
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    max_restarts: int = 3
    resent: int = 0                              # batches sent again after their actor died
    stats: Any = None                            # the sum of every used call's stats change
    actors: list = field(default_factory=list)

    def __post_init__(self):
        import ray

        t0 = time.perf_counter()
        cls = ray.remote(_Replica).options(num_gpus=self.num_gpus, num_cpus=self.num_cpus,
                                           max_restarts=self.max_restarts)
        self.actors = [cls.remote(self.build) for _ in range(self.replicas)]
        self.pids()                              # every replica has built its model
        print(f"ray: {self.replicas} replica(s) ({self.num_gpus:g} GPU, {self.num_cpus:g} CPU each), "
              f"up in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def pids(self) -> list[int]:
        import ray

        return ray.get([a.ping.remote() for a in self.actors])

    def map(self, items: Sequence, progress: Callable[[int], None] | None = None) -> list:
        """Each item's output, in input order."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        todo = list(range(len(items)))[::-1]     # popped from the end: first item first
        out: list = [None] * len(items)
        load = [0] * len(self.actors)
        pending: dict = {}                       # ref -> (item index, actor index)
        tries = len(self.actors) * (self.max_restarts + 1) + 1
        failures = 0
        while todo or pending:
            while todo and min(load) < 2:
                a = min(range(len(self.actors)), key=load.__getitem__)
                i = todo.pop()
                pending[self.actors[a].call.remote(items[i])] = (i, a)
                load[a] += 1
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i, a = pending.pop(ref)
            load[a] -= 1
            try:
                out[i], change = ray.get(ref)
            except (RayActorError, ActorUnavailableError) as e:
                failures += 1
                if failures > tries:
                    raise RuntimeError(f"ray: replicas keep dying ({e}); restarts used up") from None
                print(f"ray: replica {a} lost ({type(e).__name__}); batch {i} sent to another", file=sys.stderr)
                self.resent += 1
                todo.append(i)
                continue
            if change is not None:
                self.stats = change if self.stats is None else add_stats(self.stats, change)
            if progress:
                progress(i)
        return out

    def close(self) -> None:
        import ray

        try:
            ray.get([a.close.remote() for a in self.actors], timeout=60)
        except Exception as e:  # a replica that cannot close is killed all the same
            print(f"ray: closing replicas: {type(e).__name__}: {e}", file=sys.stderr)
        for a in self.actors:
            ray.kill(a)


def placement(replicas: int | None, gpus_per_replica: float | None, cpus_per_replica: float) -> tuple[int, float]:
    """(replicas, GPUs each) on the connected cluster: by default one replica per GPU, or, on a
    cluster without GPUs, one per `cpus_per_replica` CPUs."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0), res.get("CPU", 1)
    per_gpu = (1.0 if gpus else 0.0) if gpus_per_replica is None else gpus_per_replica
    if per_gpu > gpus:
        raise ValueError(f"--gpus-per-replica {per_gpu:g}, but the cluster has {gpus:g} GPU(s)")
    if not replicas:
        replicas = int(gpus // per_gpu) if per_gpu else int(cpus // max(cpus_per_replica, 1e-9))
    return max(1, replicas), per_gpu


# ---------------------------------------------------------------- the two commands


def require_ray() -> None:
    """ValueError (one line) when Ray is not installed; every `--executor ray` checks this first."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("--executor ray: Ray is not installed (pip install 'synthloop[ray]')") from None


def pool(args, build: Callable[[], Callable]) -> ReplicaPool:
    """Replicas of `build()` on the cluster named by --address, placed by --replicas,
    --gpus-per-replica and --cpus-per-replica; ValueError when they cannot be placed."""
    from synthloop.filters.dedup_ray import connect

    connect(args.address)
    replicas, gpus = placement(args.replicas, args.gpus_per_replica, args.cpus_per_replica)
    return ReplicaPool(build, replicas, num_gpus=gpus, num_cpus=args.cpus_per_replica)


def scorer_pool(args, settings: dict, backend: dict) -> ReplicaPool:
    """Replicas of --scorer, each with its own model or backend."""
    from functools import partial

    from synthloop.filters.score_cli import OpenedScorer

    return pool(args, partial(OpenedScorer, args.scorer, settings, backend))


def encoder_pool(args) -> ReplicaPool:
    """Replicas of the default embedding model (filters/select.py)."""
    from synthloop.filters.select import default_embedder

    return pool(args, default_embedder)


def score(replicas: ReplicaPool, todo: pl.DataFrame, batch_rows: int,
          advance: Callable[[int], None]) -> tuple[pl.DataFrame, Any, dict]:
    """`todo` scored by the replicas in `batch_rows` batches: (frame in input order, summed
    stats, what Ray did)."""
    parts = [t.to_arrow() for t in todo.iter_slices(batch_rows)]
    outs = replicas.map(parts, progress=lambda i: advance(parts[i].num_rows))
    frame = pl.concat([pl.from_arrow(t) for t in outs], how="vertical") if outs else todo
    return frame, replicas.stats, {"replicas": replicas.replicas, "gpus_per_replica": replicas.num_gpus,
                                   "resent": replicas.resent}


def embedder(replicas: ReplicaPool, rows: int = 512) -> Callable[[Sequence[str]], np.ndarray]:
    """An Embedder (filters/select.py) that encodes on the replicas: pieces of `rows` texts,
    vectors back in input order."""
    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.concatenate(replicas.map([list(texts[i:i + rows]) for i in range(0, len(texts), rows)]))
    return embed

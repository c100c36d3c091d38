"""Model engines as Ray actors, behind the one LLM seam.

`EnginePool` is a backend like any other (`agenerate`, `generate`, `stats`, `in_flight`), so
every stage, source and the request cache use it unchanged: the ray executor hands it to the
run's `Context` instead of a local backend. Each pool holds `engines` actors of one
`BackendSpec`; each actor builds its backend in its own process with the run's backend factory
(`open_llm`, or a test's scripted one) and serves many calls at once (an async actor: vLLM's
continuous batching sees every request in flight). A call goes to the actor with the fewest
requests outstanding.

Faults: an actor that dies (its process killed, its node lost) fails the calls it held with
`RayActorError`; the pool sends those requests again to another actor, and Ray restarts the dead
one (`max_restarts`), which rejoins once it answers. Requests carry their seeds, so an answer sent
again is the same answer, and a stage awaits each call exactly once: nothing is lost or doubled.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any, Callable

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from synthloop.core.llm.base import BackendSpec, Completion, Params, Request, Stats, per_request

#: Backends that run a model in their own process (the others are HTTP clients).
MODEL_BACKENDS = ("vllm", "transformers")


class Engine:
    """One backend in one actor process."""

    def __init__(self, factory: Callable, spec: BackendSpec):
        self.llm = factory(spec, cache=None)

    async def ready(self) -> tuple[str, int, int]:
        """(model name, requests it wants in flight, process id); answers once the engine is up."""
        return self.llm.name, self.llm.default_in_flight, os.getpid()

    async def agenerate(self, requests: list, params: list[dict]) -> list[Completion]:
        return await self.llm.agenerate(requests, params)

    async def close(self) -> None:
        self.llm.close()


def placement(settings: Any, spec: BackendSpec, backends: int, gpus: float) -> tuple[int, float, float]:
    """(engines, GPUs per engine, CPUs per engine) for one of the run's `backends` distinct model
    backends on a cluster with `gpus` GPUs, from ``[run.ray]`` (a `RaySection`).

    >>> from synthloop.core.config import RaySection
    >>> placement(RaySection(), BackendSpec(backend="vllm"), 2, 8)
    (4, 1.0, 1)
    """
    per_gpu = settings.gpus_per_engine
    if per_gpu < 0:
        per_gpu = 1.0 if gpus and spec.backend in MODEL_BACKENDS else 0.0
    if per_gpu > gpus:       # the actors would wait for GPUs forever
        raise ValueError(f"[run.ray] gpus_per_engine = {per_gpu:g}, but the cluster has {gpus:g} GPU(s)")
    engines = settings.engines
    if not engines:
        engines = max(1, int(gpus // (per_gpu * backends))) if per_gpu else 1
    return engines, per_gpu, settings.cpus_per_engine


class EnginePool:
    """The LLM seam over `engines` actors of one backend; see the module docstring."""

    def __init__(self, spec: BackendSpec, factory: Callable, *, engines: int, num_gpus: float, num_cpus: float,
                 max_restarts: int):
        t0 = time.perf_counter()
        actor = ray.remote(Engine).options(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts)
        self.spec, self.max_restarts = spec, max_restarts
        self.actors = [actor.remote(factory, spec) for _ in range(engines)]
        info = ray.get([a.ready.remote() for a in self.actors])
        self.name = info[0][0]
        self.default_in_flight = sum(i[1] for i in info)
        self.stats = Stats()
        self.in_flight = 0
        self.lock = threading.Lock()           # `generate` runs in worker threads beside the event loop
        self.resent = 0                        # requests sent again after their engine died
        self.load = [0] * engines              # requests outstanding per actor
        self.down: set[int] = set()            # actors that died and have not answered since
        print(f"ray: {engines} engine(s) for {spec.backend}:{spec.model} "
              f"({num_gpus:g} GPU, {num_cpus:g} CPU each), up in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    async def pids(self) -> list[int]:
        """The process id of every engine actor (as it is now)."""
        return [i[2] for i in await asyncio.gather(*(a.ready.remote() for a in self.actors))]

    def _pick(self) -> int:
        up = [i for i in range(len(self.actors)) if i not in self.down] or range(len(self.actors))
        return min(up, key=lambda i: self.load[i])

    def _lost(self, i: int, err: Exception, n: int) -> None:
        with self.lock:
            self.resent += n
        print(f"ray: engine {i} of {self.spec.model} lost ({type(err).__name__}); "
              f"{n} request(s) sent to another", file=sys.stderr)
        if i not in self.down:
            self.down.add(i)
            # Back in once Ray has restarted it and it answers (never, if its restarts are used up).
            # A concurrent future: its callback needs no event loop (`generate` runs its own).
            self.actors[i].ready.remote().future().add_done_callback(
                lambda f: f.exception() is None and self.down.discard(i))

    async def agenerate(self, requests: list[Request], params: Params) -> list[Completion]:
        plist = per_request(params, len(requests))
        n = len(requests)
        self._count(None, n)
        try:
            for attempt in range(len(self.actors) * (self.max_restarts + 1) + 1):
                with self.lock:
                    i = self._pick()
                    self.load[i] += n
                try:
                    out = await self.actors[i].agenerate.remote(list(requests), plist)
                    break
                except (RayActorError, ActorUnavailableError) as e:
                    self._lost(i, e, n)
                finally:
                    self._count(i, -n)
            else:
                raise RuntimeError(f"ray: every engine of {self.spec.model} died, restarts used up")
        finally:
            self._count(None, -n)
        with self.lock:
            self.stats.calls += 1
            self.stats.add(out)
        return out

    def _count(self, actor: int | None, n: int) -> None:
        """Add n to the pool's requests in flight (actor None) or to one actor's."""
        with self.lock:
            if actor is None:
                self.in_flight += n
            else:
                self.load[actor] += n

    def generate(self, requests: list[Request], params: Params) -> list[Completion]:
        """Blocking form, for synchronous stages (they run in worker threads, off the event loop)."""
        return asyncio.run(self.agenerate(requests, params))

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)

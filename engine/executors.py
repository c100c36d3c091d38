"""Executors: how source batches travel through the stages to the commit point.

An executor decides only *when* work happens. What happens is fixed by the stages (random
streams keyed by batch or row id, ordered stages fed in id order) and by the commit point
(engine/commit.py: rejects, counts, states and commits, in id order), so every executor
writes the same run directory for the same config and request cache.

- `SequentialExecutor`: one batch at a time through the whole chain. The reference.
- `PipelinedExecutor`: many batches in flight, so the engine always has requests to work on. A
  feeder admits the next source batch while the backends have fewer than `in_flight` requests
  outstanding and fewer than `max_batches` batches are uncommitted (this bounds memory); each
  admitted batch runs through the stages in its own task, unordered stages working on many
  batches at once and ordered stages taking them one at a time in id order; the commit point
  takes batches in id order as they complete. Synchronous stages run in worker threads, so
  Python work overlaps the engine's. Near the limit it admits only as many batches as the rate
  of kept rows per batch says are still needed.

Speculation: batches admitted early and source steps launched ahead are work a run may not need
(it stops at its limit). A first run pays a little for that; a rerun over a warm request cache
must not send a request the first run never needed. So while every answer so far came from the
cache (`speculate()` is false), the pipelined executor admits one batch at a time and sources
launch no step ahead, exactly like the sequential executor; the first request the cache cannot
answer is needed work, and from then on the run pipelines.

The ray executor (engine/ray_executor.py) is the pipelined one with its engines and function stages
on a Ray cluster: the same `run`, the same commit point.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, Callable, Protocol

from synthloop.engine.commit import Committer, Unit


class Executor(Protocol):
    async def run(self, source: Any, stages: list, commit: Committer) -> None:
        """Feed every source batch through `stages` into `commit.apply`, in id order, until the
        source ends or `commit.done`."""
        ...


async def _open(source: Any, batches, batch_id: int) -> Unit | None:
    """The next source batch as a unit, or None at the end of the source."""
    try:
        frame = await anext(batches)
    except StopAsyncIteration:
        return None
    unit = Unit(batch_id)
    unit.route(source, 0, frame)        # the source's state right after it: nothing ran since
    return unit


async def _advance(unit: Unit, stage: Any) -> None:
    n_in = unit.frame.height
    unit.route(stage, n_in, await stage.process(unit.frame, unit.id))


class SequentialExecutor:
    """One batch at a time: source, every stage, commit; then the next batch."""

    async def run(self, source: Any, stages: list, commit: Committer) -> None:
        batches = source()
        try:
            while not commit.done:
                unit = await _open(source, batches, commit.next_id)
                if unit is None:
                    break
                for stage in stages:
                    await _advance(unit, stage)
                commit.apply(unit)
        finally:
            await batches.aclose()


class _Turns:
    """Lets batches into an ordered stage one at a time, in id order."""

    def __init__(self, first: int):
        self.next = first
        self.cond = asyncio.Condition()

    @asynccontextmanager
    async def turn(self, batch_id: int):
        async with self.cond:
            await self.cond.wait_for(lambda: self.next == batch_id)
        try:
            yield
        finally:
            self.next = batch_id + 1
            async with self.cond:
                self.cond.notify_all()


class _Signal:
    """Wakes every waiter when something moved (a stage finished a batch, a batch was committed)."""

    def __init__(self):
        self.waiters: list[asyncio.Event] = []

    def notify(self) -> None:
        for e in self.waiters:
            e.set()

    async def wait(self, timeout: float) -> None:
        e = asyncio.Event()
        self.waiters.append(e)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the timeout expires, and the run would never stop.
            async with asyncio.timeout(timeout):
                await e.wait()
        except TimeoutError:
            pass
        finally:
            self.waiters.remove(e)


class PipelinedExecutor:
    """Many batches in flight; see the module docstring.

    `in_flight()` is the backends' outstanding requests (`LLM.in_flight`, summed); admission stops
    at `budget` of them, or at `max_batches` uncommitted batches (default: budget / 8, at least 2).
    `peak_batches` records the most batches that were ever uncommitted at once.
    """

    def __init__(self, *, budget: int, in_flight: Callable[[], int], max_batches: int = 0,
                 speculate: Callable[[], bool] = lambda: True):
        if budget < 1:
            raise ValueError("in_flight must be >= 1")
        self.budget, self.in_flight, self.speculate = budget, in_flight, speculate
        self.max_batches = max_batches or max(2, budget // 8)
        self.peak_batches = 0

    async def run(self, source: Any, stages: list, commit: Committer) -> None:
        if commit.done:
            return
        turns = {i: _Turns(commit.next_id) for i, st in enumerate(stages) if st.ordered}
        moved = _Signal()
        finished: dict[int, Unit] = {}
        tasks: set[asyncio.Task] = set()
        state = {"alive": 0, "fed": False, "error": None}

        def spawn(coro) -> None:
            task = asyncio.ensure_future(coro)
            tasks.add(task)
            task.add_done_callback(on_done)

        def on_done(task: asyncio.Task) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None and state["error"] is None:
                state["error"] = task.exception()
            moved.notify()

        async def flow(unit: Unit) -> None:
            for i, stage in enumerate(stages):
                if i in turns:
                    async with turns[i].turn(unit.id):
                        await _advance(unit, stage)
                else:
                    await _advance(unit, stage)
                moved.notify()
            finished[unit.id] = unit

        async def feed() -> None:
            batches = source()
            batch_id = commit.next_id
            try:
                while True:
                    while (state["alive"] >= self.max_batches or self.in_flight() >= self.budget
                           or (state["alive"] and not self.speculate())
                           or commit.limit_in_sight(list(finished.values()), state["alive"] - len(finished))):
                        # Requests finish without a stage finishing (stages make several calls):
                        # look again every 50 ms as well.
                        await moved.wait(0.05)
                    if commit.done:
                        return
                    unit = await _open(source, batches, batch_id)
                    if unit is None:
                        return
                    batch_id += 1
                    state["alive"] += 1
                    self.peak_batches = max(self.peak_batches, state["alive"])
                    spawn(flow(unit))
            finally:
                state["fed"] = True
                await batches.aclose()

        spawn(feed())
        try:
            while not commit.done:
                if state["error"] is not None:
                    raise state["error"]
                unit = finished.pop(commit.next_id, None)
                if unit is not None:
                    commit.apply(unit)
                    state["alive"] -= 1
                    moved.notify()
                elif state["fed"] and state["alive"] == 0:
                    return
                else:
                    await moved.wait(1.0)
                    commit.tick()          # the progress line moves while long requests run
        finally:
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

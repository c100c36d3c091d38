"""The stage protocol.

A stage turns one batch into one batch: ``await stage.process(batch, batch_id)`` over batches of
the record schema. It may add rows (generators), fill columns (scorers) or reject rows by setting
``drop_reason`` on them: the executor routes those rows to the rejects stream and counts them, so
a stage never has to know where rejects go.

Batch ids: the source's batches are numbered 0, 1, 2, ... in order, across resumes, and a batch
keeps its id through every stage. Random streams derive from the run seed and the batch id (or a
row's id), never from the order batches arrive in, so a batch sends the same requests whether it
runs alone or beside others, in a first run or after a resume.

Ordered or not: a stage whose work on a batch depends on the batches before it (a dedup index)
declares ``ordered = True`` and gets the batches one at a time, in id order; the executor
snapshots its `state()` after each. Any other stage may work on several batches at once and keeps
no order-dependent state: what it counts goes through a `Tally`, which the executor folds in batch
order at the commit point (``fold(batch_id)``), so the state it commits is exact.

A source is the first step: ``source()`` returns an async iterator of batches, in id order, and
its `state()` describes it right after the batch it last yielded. Sources and stages may carry
resumable state by offering ``state() -> dict`` and ``restore(state: dict, committed: Committed)
-> None``, and may offer ``close()``.
"""
from __future__ import annotations

import asyncio
import copy
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Protocol

import polars as pl

#: What a source yields.
AsyncBatches = AsyncIterator[pl.DataFrame]
#: The batches of a stage written as an iterator (`IteratorStage`).
Batches = Iterator[pl.DataFrame]


class ContractError(RuntimeError):
    """A stage broke the protocol (e.g. more or fewer batches out than in)."""


class Stage(Protocol):
    name: str
    ordered: bool

    async def process(self, batch: pl.DataFrame, batch_id: int) -> pl.DataFrame: ...


class Committed(Protocol):
    """What a resumed stage can read back: the rows already committed by an earlier process."""

    def kept(self) -> pl.LazyFrame: ...

    def rejects(self) -> pl.LazyFrame: ...

    def passed(self) -> pl.LazyFrame:
        """The committed rows that came out of this part: kept, or dropped by a later part."""
        ...


@dataclass
class PerBatch:
    """A stage made from a synchronous per-batch function; optional state lives on its owner.

    The function runs in a worker thread, so the event loop keeps feeding the engine meanwhile.
    With an owner (state) the stage is ordered unless told otherwise."""

    name: str
    fn: Callable[[pl.DataFrame], pl.DataFrame]
    owner: Any = None
    ordered: bool = True

    async def process(self, batch: pl.DataFrame, batch_id: int) -> pl.DataFrame:
        return await asyncio.to_thread(self.fn, batch)

    def state(self) -> dict:
        return self.owner.state() if hasattr(self.owner, "state") else {}

    def restore(self, state: dict, committed: Committed) -> None:
        if hasattr(self.owner, "restore"):
            self.owner.restore(state, committed)

    def close(self) -> None:
        if hasattr(self.owner, "close"):
            self.owner.close()


def per_batch(name: str, fn: Callable[[pl.DataFrame], pl.DataFrame], owner: Any = None, *,
              ordered: bool | None = None) -> PerBatch:
    """Make a stage from ``fn(batch) -> batch``; ordered by default when it has an owner.

    >>> st = per_batch("upper", lambda b: b.with_columns(pl.col("instruction").str.to_uppercase()))
    >>> st.name, st.ordered
    ('upper', False)
    """
    return PerBatch(name=name, fn=fn, owner=owner, ordered=owner is not None if ordered is None else ordered)


class IteratorStage:
    """A stage written as ``Iterator[DataFrame] -> Iterator[DataFrame]`` (one batch out per batch
    in), run one batch at a time, in order, in a worker thread; other attributes pass through."""

    ordered = True

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    async def process(self, batch: pl.DataFrame, batch_id: int) -> pl.DataFrame:
        out = await asyncio.to_thread(lambda: list(self.inner(iter([batch]))))
        if len(out) != 1:
            raise ContractError(f"stage {self.inner.name} yielded {len(out)} batches for one; "
                                "a stage must yield exactly one batch per input batch")
        return out[0]


def as_stage(obj: Any) -> Any:
    """`obj` if it speaks the stage protocol, else `obj` behind an `IteratorStage`."""
    return obj if hasattr(obj, "process") else IteratorStage(obj)


# ---------------------------------------------------------------- counters folded in batch order


def bump(counter: dict, *path: str, n: int = 1) -> None:
    """Add `n` at a nested key of a dict of counters.

    >>> c = {}; bump(c, "ops", "deepen", "kept"); bump(c, "ops", "deepen", "kept", n=2); c
    {'ops': {'deepen': {'kept': 3}}}
    """
    for key in path[:-1]:
        counter = counter.setdefault(key, {})
    counter[path[-1]] = counter.get(path[-1], 0) + n


def add_counts(into: dict, delta: dict) -> None:
    """Add a nested dict of counters into another, key by key.

    >>> t = {"a": 1, "b": {"c": 1}}; add_counts(t, {"a": 2, "b": {"c": 1, "d": 5}}); t
    {'a': 3, 'b': {'c': 2, 'd': 5}}
    """
    for k, v in delta.items():
        if isinstance(v, dict):
            add_counts(into.setdefault(k, {}), v)
        else:
            into[k] = into.get(k, 0) + v


class Tally:
    """Counters of a stage that works on several batches at once: each batch counts into its own
    dict (`batch(id)`), and `fold(id)` adds it to `totals` when the executor commits that batch,
    in batch order, so `totals` always describe exactly the committed batches.

    >>> t = Tally({"rows": 0}); bump(t.batch(1), "rows", n=2); t.totals
    {'rows': 0}
    >>> t.fold(1); t.totals
    {'rows': 2}
    """

    def __init__(self, zero: dict):
        self.zero = copy.deepcopy(zero)
        self.totals = copy.deepcopy(zero)
        self._open: dict[int, dict] = {}

    def batch(self, batch_id: int) -> dict:
        return self._open.setdefault(batch_id, {})

    def fold(self, batch_id: int) -> None:
        add_counts(self.totals, self._open.pop(batch_id, {}))

    def restore(self, totals: dict) -> None:
        """Start from committed totals (keys of `zero` only: older states may hold others)."""
        self.totals = copy.deepcopy(self.zero)
        add_counts(self.totals, {k: v for k, v in totals.items() if k in self.zero})


# ---------------------------------------------------------------- step-wise sources


async def run_steps(source: Any, label: str, *, max_steps: int, patience: int, ahead: int = 1,
                    speculate: Callable[[], bool] = lambda: True) -> AsyncBatches:
    """Batches of a step-wise source (self-instruct, Magpie) until `max_steps` steps are done
    (0: no bound) or `patience` steps in a row kept nothing.

    Up to `ahead` steps are in flight at once: ``source.launch(step)`` fixes a step's requests and
    returns the awaitable of their answers; ``await source.finish(step, answers)`` turns them into
    the step's batch, strictly in step order, and advances ``source.step``. Steps launched past
    the end are cancelled. While `speculate()` is false a step is launched only when its batch
    is asked for.
    """
    if ahead < 1:
        raise ValueError(f"{label}: steps_in_flight must be >= 1")
    launched: deque[tuple[int, asyncio.Future]] = deque()
    upcoming = source.step

    def fill(n: int) -> None:
        nonlocal upcoming
        while len(launched) < n and (not max_steps or upcoming < max_steps):
            launched.append((upcoming, asyncio.ensure_future(source.launch(upcoming))))
            upcoming += 1

    idle = 0
    try:
        while True:
            fill(ahead if speculate() else 1)
            if not launched:
                return
            step, answers = launched.popleft()
            batch = await source.finish(step, await answers)
            if speculate():
                fill(ahead)              # the next steps run while the consumer works on this one
            idle = 0 if batch["drop_reason"].is_null().any() else idle + 1
            yield batch
            if idle >= patience:
                print(f"{label}: no new instruction in {idle} steps; stopping", file=sys.stderr)
                return
    finally:
        for _, task in launched:
            task.cancel()


def drop_where(batch: pl.DataFrame, mask: pl.Expr | pl.Series, reason: str) -> pl.DataFrame:
    """Mark rows matching `mask` (and not already marked) as rejected with `reason`.

    >>> from synthloop.core.schema import make_batch
    >>> b = drop_where(make_batch([{"instruction": "Hi there you"}]), pl.col("response") == "", "empty")
    >>> b["drop_reason"].to_list()
    ['empty']
    """
    return batch.with_columns(
        pl.when(pl.col("drop_reason").is_null() & mask).then(pl.lit(reason))
        .otherwise(pl.col("drop_reason")).alias("drop_reason"))

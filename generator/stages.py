"""The stage protocol.

A stage is a plain function ``Iterator[DataFrame] -> Iterator[DataFrame]`` over batches of the
record schema. It may add rows (generators), fill columns (scorers) or reject rows by setting
``drop_reason`` on them: the runner routes those rows to the rejects stream and counts them, so a
stage never has to know where rejects go.

Checkpoint contract: a stage yields exactly one batch (possibly empty) for each batch it pulls,
so when the runner commits, no stage holds rows in flight and stage state is exact. `per_batch`
builds such a stage from a ``DataFrame -> DataFrame`` function; the runner checks the contract.

A source is the first step: a callable ``() -> Iterator[DataFrame]`` that produces batches from
nothing (seeds, self-instruct). Sources and stages may carry resumable state by offering
``state() -> dict`` and ``restore(state: dict, committed: Committed) -> None``, and may offer
``close()``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import polars as pl

Batches = Iterator[pl.DataFrame]


class Stage(Protocol):
    name: str

    def __call__(self, batches: Batches) -> Batches: ...


class Committed(Protocol):
    """What a resumed stage can read back: the rows already committed by an earlier process."""

    def kept(self) -> pl.LazyFrame: ...

    def rejects(self) -> pl.LazyFrame: ...

    def passed(self) -> pl.LazyFrame:
        """The committed rows that came out of this part: kept, or dropped by a later part."""
        ...


@dataclass
class PerBatch:
    """A stage made from a per-batch function; optional state lives on the function's owner."""

    name: str
    fn: Callable[[pl.DataFrame], pl.DataFrame]
    owner: Any = None

    def __call__(self, batches: Batches) -> Batches:
        for batch in batches:
            yield self.fn(batch)

    def state(self) -> dict:
        return self.owner.state() if hasattr(self.owner, "state") else {}

    def restore(self, state: dict, committed: Committed) -> None:
        if hasattr(self.owner, "restore"):
            self.owner.restore(state, committed)

    def close(self) -> None:
        if hasattr(self.owner, "close"):
            self.owner.close()


def per_batch(name: str, fn: Callable[[pl.DataFrame], pl.DataFrame], owner: Any = None) -> PerBatch:
    """Make a stage from ``fn(batch) -> batch``.

    >>> st = per_batch("upper", lambda b: b.with_columns(pl.col("instruction").str.to_uppercase()))
    >>> st.name
    'upper'
    """
    return PerBatch(name=name, fn=fn, owner=owner)


def run_steps(source: Any, label: str, *, max_steps: int, patience: int) -> Batches:
    """Batches of a step-wise source (`source.step`, `source._one_step()`) until `max_steps` steps
    are done (0: no bound) or `patience` steps in a row kept nothing (self-instruct, Magpie)."""
    idle = 0
    while not max_steps or source.step < max_steps:
        batch = source._one_step()
        idle = 0 if batch["drop_reason"].is_null().any() else idle + 1
        yield batch
        if idle >= patience:
            print(f"{label}: no new instruction in {idle} steps; stopping", file=sys.stderr)
            return


def drop_where(batch: pl.DataFrame, mask: pl.Expr | pl.Series, reason: str) -> pl.DataFrame:
    """Mark rows matching `mask` (and not already marked) as rejected with `reason`.

    >>> from synthloop.generator.schema import make_batch
    >>> b = drop_where(make_batch([{"instruction": "Hi there you"}]), pl.col("response") == "", "empty")
    >>> b["drop_reason"].to_list()
    ['empty']
    """
    return batch.with_columns(
        pl.when(pl.col("drop_reason").is_null() & mask).then(pl.lit(reason))
        .otherwise(pl.col("drop_reason")).alias("drop_reason"))

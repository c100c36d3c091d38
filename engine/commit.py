"""The commit point: batches reach the run directory in batch-id order, whatever order they finish in.

An executor runs each source batch through the stages as a `Unit`: the rows still live, and per
part (the source, then each stage) what it did to this batch: rows in, rows kept, the rows it
dropped, and for ordered parts a snapshot of their state right after this batch. Nothing touches
the run directory meanwhile. `Committer.apply(unit)` then, in one synchronous step and in id
order: writes each part's rejects (part by part), adds up the counts, drops ids already in the
dataset (the last step, ``write``: ``duplicate_id``), adds the kept rows, and moves each part's
committed state to this batch (an ordered part's snapshot; an unordered part folds this batch's
tally). After `apply(b)` the store, counts and states describe exactly batches <= b, the
watermark, and a commit persists exactly that together with the next batch id. Batches past the
watermark exist only in memory: a kill loses them and a rerun redoes them, from the request cache.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from synthloop.core.schema import SCHEMA
from synthloop.filters.language import fill_language, language_counts
from synthloop.outputs.manifest import stage_row
from synthloop.outputs.run_store import RunStore


@dataclass
class Counts:
    name: str
    n_in: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def row(self) -> dict:
        return stage_row(self.name, self.n_in, self.kept, dict(self.dropped))

    def load(self, row: dict) -> None:
        self.n_in, self.kept, self.dropped = row["in"], row["kept"], Counter(row["dropped"])


@dataclass
class Unit:
    """One source batch on its way through the stages."""

    id: int
    frame: pl.DataFrame = None                              # rows still live
    counts: list[Counts] = field(default_factory=list)     # per part that has run, in chain order
    rejects: list[pl.DataFrame] = field(default_factory=list)
    states: dict[str, dict] = field(default_factory=dict)  # ordered parts: state right after this batch

    def route(self, part: Any, n_in: int, out: pl.DataFrame) -> None:
        """Record what `part` made of this batch: its drops aside, the rest live on."""
        bad = out["drop_reason"].is_not_null()
        rej = out.filter(bad)
        self.frame = out.filter(~bad)
        self.counts.append(Counts(part.name, n_in, self.frame.height, Counter(rej["drop_reason"].to_list())))
        self.rejects.append(rej)
        if getattr(part, "ordered", True) and hasattr(part, "state"):
            self.states[part.name] = copy.deepcopy(part.state())


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


class Committer:
    """Applies units in id order and commits; restores the parts of a resumed run on creation."""

    def __init__(self, parts: list, store: RunStore, prev: dict | None, *, limit: int, llms, progress=None):
        self.parts, self.store, self.limit, self.llms, self.progress = parts, store, limit, llms, progress
        self.counts = [Counts(p.name) for p in parts] + [Counts("write")]
        prev = prev or {}
        self.llm_before = prev.get("llm", {})
        self.next_id = prev.get("batches", 0)       # the id of the next batch to commit
        self.languages = Counter(prev.get("languages", {}))   # kept rows per language code
        names = [c.name for c in self.counts]
        rows = {r["name"]: r for r in prev.get("stages", [])}
        for c in self.counts:
            if c.name in rows:
                c.load(rows[c.name])
        for part in parts:
            if prev and hasattr(part, "restore"):
                later = tuple(names[names.index(part.name) + 1:])
                part.restore(prev.get("state", {}).get(part.name, {}), _Committed(store, later))
        self.states = {p.name: copy.deepcopy(p.state()) for p in parts if hasattr(p, "state")}
        self.consistent = True      # false while a unit is half applied

    @property
    def done(self) -> bool:
        return bool(self.limit) and self.store.kept_rows >= self.limit

    def limit_in_sight(self, finished: list[Unit], running: int) -> bool:
        """Whether the batches already through the stages (`finished`, not applied yet) and
        `running` more, at the rate of live rows per batch so far, would reach the limit: more in
        flight would be work past the limit, thrown away when the run stops."""
        batches = self.next_id + len(finished)
        if not self.limit or not batches:
            return False
        ahead = sum(u.frame.height for u in finished)
        rate = (self.counts[-1].kept + ahead) / batches
        return self.store.kept_rows + ahead + running * rate >= self.limit

    def apply(self, unit: Unit) -> None:
        if unit.id != self.next_id:
            raise RuntimeError(f"batch {unit.id} reached the commit point before batch {self.next_id}")
        self.consistent = False
        for total, part, rej in zip(self.counts, unit.counts, unit.rejects):
            total.n_in += part.n_in
            total.kept += part.kept
            total.dropped.update(part.dropped)
            self.store.reject(rej, total.name)
        self._write(unit.frame)
        for part in self.parts:
            if part.name in unit.states:
                self.states[part.name] = unit.states[part.name]
            elif hasattr(part, "fold"):
                part.fold(unit.id)
                self.states[part.name] = copy.deepcopy(part.state())
        self.next_id += 1
        self.consistent = True
        self.tick()
        if self.store.commit_due():
            self.store.commit(**self.snapshot())

    def _write(self, batch: pl.DataFrame) -> None:
        """The last step: rows whose id the dataset already holds are dropped as ``duplicate_id``;
        kept rows that no `language` stage saw get their language here (every record has one)."""
        w = self.counts[-1]
        w.n_in += batch.height
        fresh = self.store.is_new(batch["id"]) & batch["id"].is_first_distinct()
        if not fresh.all():
            dup = batch.filter(~fresh).with_columns(pl.lit("duplicate_id").alias("drop_reason"))
            w.dropped["duplicate_id"] += dup.height
            self.store.reject(dup, w.name)
            batch = batch.filter(fresh)
        batch = fill_language(batch)
        self.languages.update(language_counts(batch))
        w.kept += batch.height
        self.store.add(batch)

    def snapshot(self, complete: bool = False) -> dict:
        now = Counter()
        for llm in self.llms():
            now.update(llm.stats.as_dict())
        total = Counter(self.llm_before.get("total", {}))
        total.update(now)
        return {"stages": [c.row() for c in self.counts], "state": copy.deepcopy(self.states),
                "llm": {"last_process": dict(now), "total": dict(total)}, "batches": self.next_id,
                "languages": dict(sorted(self.languages.items())), "complete": complete}

    def finish(self) -> None:
        self.store.commit(**self.snapshot(complete=True), final=True)

    def interrupted(self) -> None:
        """Keep what was applied; half-applied or mid-commit, the previous commit stands."""
        if self.consistent and not self.store.committing:
            self.store.commit(**self.snapshot())

    def tick(self) -> None:
        if self.progress is not None:
            self.progress.update(self.store.kept_rows, sum(sum(c.dropped.values()) for c in self.counts), self.llms())

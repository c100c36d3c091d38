"""Reading earlier data into a dedup index: Parquet paths/globs or a LazyFrame, in batches.

A round must never re-emit what an earlier round kept, and a resumed run rebuilds its index from
the rows it already committed; both stream only the text columns, so preloading 1M rows holds
one batch at a time.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterator, Sequence

import polars as pl


def expand_paths(paths: Sequence[str | Path]) -> list[str]:
    """Paths with globs expanded, in the order given (sorted within one glob).

    >>> expand_paths(["/nonexistent/*.parquet", "/tmp/x.parquet"])
    ['/tmp/x.parquet']
    """
    out: list[str] = []
    for p in paths:
        p = str(p)
        out.extend(sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p])
    return out


def iter_frames(source: Sequence[str | Path] | pl.LazyFrame, columns: Sequence[str],
                batch_rows: int = 65536) -> Iterator[pl.DataFrame]:
    """Batches of `columns` from Parquet paths/globs or a LazyFrame, never the whole table at once.

    >>> [f.height for f in iter_frames(pl.LazyFrame({"t": ["a", "b", "c"]}), ["t"], batch_rows=2)]
    [2, 1]
    """
    if isinstance(source, pl.LazyFrame):
        lf = source
    else:
        paths = expand_paths(source)
        if not paths:
            return
        lf = pl.scan_parquet(paths)
    for batch in lf.select(list(columns)).collect_batches(chunk_size=batch_rows):
        if batch.height:
            yield batch


class PreloadedIndex:
    """Shared resume logic of the keep-first dedup stages: subclasses provide `cfg` (with
    `text_columns` and `preload`), `add(frames)` and `reset()`, and may set `batch_rows`."""

    batch_rows = 65536

    def preload(self, source: Sequence[str | Path] | pl.LazyFrame, *, batch_rows: int | None = None) -> int:
        """Index every row of earlier shards (paths, globs or a LazyFrame); returns rows indexed."""
        return self.add(iter_frames(source, self.cfg.text_columns, batch_rows or self.batch_rows))

    def restore(self, state: dict, committed) -> None:
        """Rebuild from preload + every row that passed this stage in an earlier process: the kept
        rows and the rows a later stage dropped, exactly the rows an uninterrupted run indexed
        (rows that a stage after this one created are indexed too, a superset)."""
        self.reset()
        if self.cfg.preload:
            self.preload(self.cfg.preload)
        self.preload(committed.passed())

    def close(self) -> None:
        self.reset()  # let go of the index memory

"""Exact dedup on normalised text: a streaming keep-first stage over chosen text columns.

Two rows are duplicates when every text column matches after normalisation (case, whitespace and
punctuation, filters/normalize.py). The index is one 64-bit key per kept row in a `U64Set`
(8 bytes a row); two different texts share a key with probability ~n**2 / 2**65 (3e-8 at 1M rows).

TOML::

    [[stages]]
    type = "exact_dedup"
    text_columns = ["instruction", "input"]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import polars as pl

from synthloop.filters.hashtable import U64Set
from synthloop.filters.normalize import exact_keys
from synthloop.filters.preload import PreloadedIndex
from synthloop.core.registry import register
from synthloop.core.stages import drop_where, per_batch

REASON = "exact_duplicate"


@dataclass
class ExactConfig:
    text_columns: list = field(default_factory=lambda: ["instruction", "input", "response"])
    preload: list = field(default_factory=list)   # Parquet paths/globs indexed before the stream


class ExactDedup(PreloadedIndex):
    """Keep the first row of every group of rows whose normalised text columns are equal.

    >>> from synthloop.core.schema import make_batch
    >>> dd = ExactDedup(ExactConfig(text_columns=["instruction"]))
    >>> b = make_batch([{"instruction": "Name a colour."}, {"instruction": "name a  colour"}])
    >>> dd.mark(b)["drop_reason"].to_list()
    [None, 'exact_duplicate']
    """

    def __init__(self, cfg: ExactConfig | None = None):
        self.cfg = cfg or ExactConfig()
        if not self.cfg.text_columns:
            raise ValueError("text_columns must name at least one column")
        self.reset()
        if self.cfg.preload:
            self.preload(self.cfg.preload)

    def reset(self) -> None:
        self.index = U64Set()

    def mark(self, batch: pl.DataFrame) -> pl.DataFrame:
        """Set drop_reason on live rows whose text was kept before (earlier batch or this one)."""
        if batch.height == 0:
            return batch
        live = batch["drop_reason"].is_null().to_numpy()
        dup = self.index.query_insert(exact_keys(batch, self.cfg.text_columns), live)
        return drop_where(batch, pl.Series(dup), REASON) if dup.any() else batch

    def add(self, frames: Iterable[pl.DataFrame]) -> int:
        """Index rows without marking anything; returns rows seen."""
        n = 0
        for df in frames:
            self.index.query_insert(exact_keys(df, self.cfg.text_columns))
            n += df.height
        return n


    def state(self) -> dict:
        return {"indexed_keys": self.index.count}



@register("stage", "exact_dedup", ExactConfig, tags=("dedup",))
def build(cfg: ExactConfig, ctx) -> object:
    dd = ExactDedup(cfg)
    return per_batch("exact_dedup", dd.mark, owner=dd)

"""The `seeds` source: the seed records themselves, in batches, for pipelines that evolve or
distill seeds rather than grow new instructions. State: how many seed rows were emitted."""
from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from synthloop.core.registry import Context, register


@dataclass
class SeedsSourceConfig:
    batch_size: int = 32
    repeat: int = 1          # pass over the seeds this many times (with evolution, each pass differs)


class SeedsSource:
    def __init__(self, cfg: SeedsSourceConfig, ctx: Context):
        if cfg.batch_size < 1 or cfg.repeat < 1:
            raise ValueError("seeds source: batch_size and repeat must be >= 1")
        self.cfg = cfg
        self.records = ctx.seeds.records
        self.round = ctx.round
        self.cursor = 0

    def state(self) -> dict:
        return {"cursor": self.cursor}

    def restore(self, state: dict, committed) -> None:
        self.cursor = state.get("cursor", 0)

    async def __call__(self):
        n = self.records.height
        while self.cursor < n * self.cfg.repeat:
            start = self.cursor % n
            batch = self.records.slice(start, min(self.cfg.batch_size, n - start))
            self.cursor += batch.height
            yield batch.with_columns(pl.lit(self.round, dtype=pl.Int32).alias("round"))


@register("source", "seeds", SeedsSourceConfig)
def build(cfg: SeedsSourceConfig, ctx: Context) -> SeedsSource:
    return SeedsSource(cfg, ctx)

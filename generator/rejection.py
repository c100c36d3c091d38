"""Rejection sampling as a stage: n answers per instruction, each verified, the best one kept.

Each row's task goes to a role (``generator`` = the student by default, or ``teacher``) `n`
times. Every completed sample is checked against the row's ``constraints`` (filters/checks.py;
``verify = "strict"`` by default, IFEval's strict reading, or ``"loose"``). A sample *passes* when
it finished on its own (not cut at ``max_tokens``), is not empty and follows every constraint; a
row without constraints passes with any completed sample.

Kept: one passing sample per row. Ties between passing samples go to the lowest sample index:
the samples are drawn independently, so this is a uniform pick that biases neither length nor
style. ``scores.pass_rate`` = passing samples / n (the hard-example signal the rounds loop
reseeds from), ``scores.verified`` = fraction of constraints the kept sample follows (1.0) and
``scores.verified_all`` = true.

Dropped, each to the rejects stream with its reason and counted:
- ``failed_check``: every completed sample that missed a constraint (with its own
  ``scores.verified``): the rejected side of preference pairs (`synthloop export --format dpo`);
- ``no_passing_sample``: a row none of whose samples passed; it carries the sample that followed
  the most constraints, so it is visible and reseedable; its other failed samples are
  ``failed_check`` rows as usual;
- ``truncated`` / ``empty_response`` / ``generation_error``: samples cut at the token limit, empty,
  or failed requests (a row whose samples all failed that way has no ``no_passing_sample`` row).

- ``not_selected``: the other passing samples of a kept row (all of them are good data).

Every failed sample shares the row's ``id`` (same task), so a kept row and its failures join on it.
Sampling seeds come from (run seed, stage name, round, row id, sample index): the same row draws
the same requests in any run, order or resume, so the request cache answers reruns. The stage
keeps no order-dependent state (its counts are a `Tally`), so the executor runs several batches
through it at once; the checks run in a worker thread, off the event loop that feeds the engine.

Example::

    [[stages]]
    type = "constraints"        # attach verifiable constraints first
    [[stages]]
    type = "rejection_sampling"
    n = 4
    sampling = { temperature = 0.8, top_p = 0.95, max_tokens = 256 }
"""
from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

import polars as pl

from synthloop.filters import checks
from synthloop.core.registry import Context, register
from synthloop.core.schema import make_batch, to_messages
from synthloop.core.stages import Tally, bump


@dataclass
class RejectionConfig:
    role: str = "generator"           # [llm.<role>] that samples: the student (default) or a teacher
    n: int = 4                        # samples per instruction
    verify: str = "strict"            # strict | loose (IFEval's two readings)
    system: str = ""                  # system prompt while sampling ("" = none); not part of the record
    sampling: dict = field(default_factory=lambda: {"temperature": 0.8, "top_p": 0.95, "max_tokens": 256})


def sample_seed(seed: int, stage: str, round_: int, row_id: str, j: int) -> int:
    """The sampling seed of sample `j` of a row: independent of batch order and resumes.

    >>> sample_seed(0, "rs", 0, "abc", 1) == sample_seed(0, "rs", 0, "abc", 1) != sample_seed(0, "rs", 0, "abc", 2)
    True
    """
    key = f"{seed}:{stage}:{round_}:{row_id}:{j}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little") >> 1


@dataclass
class Sample:
    text: str
    status: str                       # passed | failed_check | truncated | generation_error | empty
    verified: float | None = None


class RejectionSampling:
    """The rejection-sampling stage (one batch out per batch in; failed samples become rejects).

    State: counts of rows, samples, passing samples and kept rows, and per constraint id how many
    samples were checked against it and how many followed it."""

    ordered = False

    def __init__(self, cfg: RejectionConfig, ctx: Context):
        if cfg.n < 1:
            raise ValueError("rejection_sampling: n must be >= 1")
        if cfg.verify not in ("strict", "loose"):
            raise ValueError(f"rejection_sampling: verify must be strict or loose, got '{cfg.verify}'")
        self.cfg, self.ctx = cfg, ctx
        self.llm = ctx.llm(cfg.role)
        self.name = "rejection_sampling"
        self.tally = Tally({"rows": 0, "samples": 0, "passed_samples": 0, "rows_kept": 0, "by_constraint": {}})

    def state(self) -> dict:
        return self.tally.totals

    def restore(self, state: dict, committed) -> None:
        self.tally.restore(state)

    def fold(self, batch_id: int) -> None:
        self.tally.fold(batch_id)

    def _chat(self, row: dict) -> list[dict]:
        msgs = to_messages(row["instruction"], row["input"], "")
        return ([{"role": "system", "content": self.cfg.system}] if self.cfg.system else []) + msgs

    def _judge(self, row: dict, completion, counts: dict) -> Sample:
        text = completion.text.strip()
        if not completion.ok:
            return Sample(text, "generation_error")
        if completion.finish_reason == "length":
            return Sample(text, "truncated")
        if not text:
            return Sample(text, "empty")
        if not row["constraints"]:
            return Sample(text, "passed")
        prompt = to_messages(row["instruction"], row["input"], "")[0]["content"]
        results = checks.check(text, row["constraints"], prompt)
        for c, r in zip(row["constraints"], results):
            bump(counts, "by_constraint", c["id"], "checked")
            bump(counts, "by_constraint", c["id"], "followed", n=int(r.strict if self.cfg.verify == "strict" else r.loose))
        frac, ok = checks.verified(results, loose=self.cfg.verify == "loose")
        return Sample(text, "passed" if ok else "failed_check", frac)

    async def process(self, batch: pl.DataFrame, batch_id: int) -> pl.DataFrame:
        """Kept rows with their best sample, plus every failed sample as a rejected row."""
        rows = batch.to_dicts()
        todo = [i for i, r in enumerate(rows) if r["drop_reason"] is None]
        if not todo:
            return batch
        n = self.cfg.n
        params = [dict(self.cfg.sampling, seed=sample_seed(self.ctx.seed, self.name, self.ctx.round, rows[i]["id"], j))
                  for i in todo for j in range(n)]
        done = await self.llm.agenerate([self._chat(rows[i]) for i in todo for _ in range(n)], params)
        return await asyncio.to_thread(self._verify, rows, todo, done, self.tally.batch(batch_id))

    def _verify(self, rows: list[dict], todo: list[int], done: list, counts: dict) -> pl.DataFrame:
        n, live = self.cfg.n, set(todo)
        out = [r for i, r in enumerate(rows) if i not in live]
        for k, i in enumerate(todo):
            out += self._resolve(rows[i], [self._judge(rows[i], c, counts) for c in done[k * n:(k + 1) * n]], counts)
        return make_batch(out)

    def _resolve(self, row: dict, samples: list[Sample], counts: dict) -> list[dict]:
        n_pass = sum(s.status == "passed" for s in samples)
        bump(counts, "rows")
        bump(counts, "samples", n=len(samples))
        bump(counts, "passed_samples", n=n_pass)
        rate = n_pass / len(samples)

        def as_row(s: Sample, reason: str | None) -> dict:
            return {**row, "response": s.text, "messages": None, "model": self.llm.name, "drop_reason": reason,
                    "scores": {**(row["scores"] or {}), "pass_rate": rate, "verified": s.verified,
                               "verified_all": None if s.verified is None else s.status == "passed"}}

        reason = {"passed": "not_selected", "failed_check": "failed_check", "truncated": "truncated", "empty": "empty_response",
                  "generation_error": "generation_error"}
        best = next((s for s in samples if s.status == "passed"), None)
        dropped = [as_row(s, reason[s.status]) for s in samples if s is not best]
        if best is not None:
            bump(counts, "rows_kept")
            return [as_row(best, None)] + dropped
        checked = [k for k, r in enumerate(dropped) if r["drop_reason"] == "failed_check"]
        if checked:
            # The instruction itself is dropped once, on the sample that followed the most constraints.
            top = max(checked, key=lambda k: (dropped[k]["scores"]["verified"], -k))
            dropped[top]["drop_reason"] = "no_passing_sample"
        return dropped


@register("stage", "rejection_sampling", RejectionConfig)
def build(cfg: RejectionConfig, ctx: Context) -> RejectionSampling:
    return RejectionSampling(cfg, ctx)

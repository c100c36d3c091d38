"""Evol-Instruct (Xu et al., 2023) as a stage: rewrite tasks into harder (in-depth) or rarer
(in-breadth) ones, answer them, and eliminate the failed evolutions.

For each incoming batch a seeded share (`fraction`) of rows is evolved: each generation draws one
operation per row from the weighted mix `ops` (add_constraints, deepen, concretize,
increase_reasoning, complicate_input, breadth; prompt texts in evol_prompts.py), asks the `role`
model for the rewrite, runs the cheap checks of eliminate.py, asks the `judge_role` model whether
parent and child ask the same thing, and has the `answer_role` model answer the survivors (the
answer is needed to eliminate refusals and empty answers). Survivors are evolved again in the next
generation, up to `generations`; as in the paper, a row whose evolution failed tries again from its
parent.

The stage yields the incoming rows unchanged plus every child, eliminated ones with their
`drop_reason`. Lineage: ``method = "evol:<op>"``, ``parent_id`` = the row it was rewritten from,
``generation`` = parent's + 1, ``round`` = the run's round, ``model`` = the model that wrote the
response (as for every answered row). The evolved task is one text: a parent's `input` is folded
into it and the child's `input` is empty.

Per-batch RNGs derive from the run seed, the stage name and the batch id, so a resumed run sends
the same requests and hits the request cache, and batches may be evolved concurrently. State: a
per-operation table, ``{"ops": {"deepen": {"proposed": n, "kept": k, "dropped": {reason: c}}},
"judge": {...}}`` (a `Tally`, exact for the committed batches), which the executor stores in
manifest.json under ``state/<stage name>``.

Example::

    [[stages]]
    type = "evol"
    fraction = 0.5
    generations = 2
    ops = { add_constraints = 2, deepen = 1, breadth = 1 }
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import polars as pl

from synthloop.generator.eliminate import answer_reason, task_reason
from synthloop.generator.evol_prompts import (CLOSE_TAGS, OPS, evolve_request, parse_evolved, parse_same,
                                              same_request)
from synthloop.core.registry import Context, register
from synthloop.core.schema import make_batch, record_id, to_messages
from synthloop.core.stages import Tally, bump


@dataclass
class EvolConfig:
    role: str = "generator"           # [llm.<role>] that rewrites the tasks
    answer_role: str = ""             # answers the evolved tasks; "" = the rewriting role
    judge_role: str = "judge"         # "same or different" judge (falls back to the generator); "" = cheap check only
    generations: int = 1              # depth M: evolve a row up to M times in a chain
    fraction: float = 1.0             # share of incoming rows that are evolved
    ops: dict = field(default_factory=lambda: {op: 1.0 for op in OPS})   # operation mix (weights)
    extra_words: int = 30             # in-depth prompts ask to add at most about this many words
    jaccard: float = 0.9              # near-identity: token-set Jaccard above this = no gain
    min_growth: float = 1.0           # in-depth child must be longer than this x parent (chars)
    max_growth: float = 6.0           # any child longer than this x parent is "overgrown"
    refusal_max_words: int = 80       # apologetic answers shorter than this are refusals
    evolve_sampling: dict = field(default_factory=lambda: {
        "temperature": 0.7, "top_p": 0.95, "max_tokens": 256, "stop": list(CLOSE_TAGS)})
    answer_sampling: dict = field(default_factory=lambda: {"temperature": 0.7, "top_p": 0.9, "max_tokens": 320})
    judge_sampling: dict = field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 8})


def _task_text(row: dict) -> str:
    return row["instruction"] if not row["input"] else f"{row['instruction']}\n\n{row['input']}"


class Evol:
    """The evol stage (one batch out per batch in); `state()` holds the per-operation table."""

    ordered = False

    def __init__(self, cfg: EvolConfig, ctx: Context):
        unknown = set(cfg.ops) - set(OPS)
        if unknown:
            raise ValueError(f"evol: unknown operations {sorted(unknown)} (known: {', '.join(OPS)})")
        self.op_names = [op for op in OPS if float(cfg.ops.get(op, 0)) > 0]
        if any(float(w) < 0 for w in cfg.ops.values()) or not self.op_names:
            raise ValueError("evol: ops weights must be >= 0 with at least one > 0")
        if cfg.generations < 1 or not 0 < cfg.fraction <= 1:
            raise ValueError("evol: generations must be >= 1 and fraction in (0, 1]")
        if cfg.min_growth < 0 or cfg.max_growth <= cfg.min_growth:
            raise ValueError("evol: need 0 <= min_growth < max_growth")
        self.cfg, self.ctx = cfg, ctx
        self.weights = [float(cfg.ops[op]) for op in self.op_names]
        self.llm = ctx.llm(cfg.role)
        self.answerer = ctx.llm(cfg.answer_role or cfg.role)
        self.judge = ctx.llm(cfg.judge_role) if cfg.judge_role else None
        self.name = "evol"      # the registry sets the configured name; it also keys the RNG stream
        self.tally = Tally({"ops": {op: {"proposed": 0, "kept": 0, "dropped": {}} for op in self.op_names},
                            "judge": {"asked": 0, "same": 0, "different": 0, "unclear": 0, "errors": 0}})

    def state(self) -> dict:
        return self.tally.totals

    def restore(self, state: dict, committed) -> None:
        self.tally.restore(state)

    def fold(self, batch_id: int) -> None:
        self.tally.fold(batch_id)

    async def process(self, batch: pl.DataFrame, batch_id: int) -> pl.DataFrame:
        """The incoming rows unchanged, followed by their evolved children."""
        # One RNG per batch from the run seed: a resumed run sends the same requests (cache hits).
        rng = random.Random(f"{self.ctx.seed}:{self.name}:{batch_id}")
        counts = self.tally.batch(batch_id)
        rows = batch.to_dicts()
        picks = [rng.random() < self.cfg.fraction for _ in rows]
        pool = [r for r, p in zip(rows, picks) if p and r["drop_reason"] is None and r["instruction"].strip()]
        children: list[dict] = []
        for _ in range(self.cfg.generations):
            if not pool:
                break
            ops = rng.choices(self.op_names, self.weights, k=len(pool))
            seeds = [rng.randrange(2**31) for _ in pool]
            kids = await self._generation(pool, ops, seeds, counts)
            children += kids
            pool = [k if k["drop_reason"] is None else p for p, k in zip(pool, kids)]
        if not children:
            return batch
        return pl.concat([batch, make_batch(children)])

    async def _generation(self, pool: list[dict], ops: list[str], seeds: list[int], counts: dict) -> list[dict]:
        cfg = self.cfg
        texts = [_task_text(p) for p in pool]
        done = await self.llm.agenerate([evolve_request(op, t, extra_words=cfg.extra_words) for op, t in zip(ops, texts)],
                                 [dict(cfg.evolve_sampling, seed=s) for s in seeds])
        kids = []
        for parent, op, text, c in zip(pool, ops, texts, done):
            task = parse_evolved(op, c.text) if c.ok else ""
            if not c.ok:
                reason = "generation_error"
            elif c.finish_reason == "length":
                reason = "truncated"
            else:
                reason = task_reason(text, task, op, min_growth=cfg.min_growth, max_growth=cfg.max_growth,
                                     jaccard_threshold=cfg.jaccard)
            kids.append({"id": record_id(task), "instruction": task, "input": "", "response": "", "method": f"evol:{op}",
                         "parent_id": parent["id"], "generation": parent["generation"] + 1,
                         "round": self.ctx.round, "model": self.llm.name, "drop_reason": reason})
        await self._judge([k for k, t in zip(kids, texts) if k["drop_reason"] is None],
                          [t for k, t in zip(kids, texts) if k["drop_reason"] is None], counts)
        await self._answer([(k, s) for k, s in zip(kids, seeds) if k["drop_reason"] is None])
        for op, k in zip(ops, kids):
            bump(counts, "ops", op, "proposed")
            if k["drop_reason"] is None:
                bump(counts, "ops", op, "kept")
            else:
                bump(counts, "ops", op, "dropped", k["drop_reason"])
        return kids

    async def _judge(self, kids: list[dict], parents: list[str], counts: dict) -> None:
        """The LLM half of the information-gain check; an unclear verdict keeps the child."""
        if self.judge is None or not kids:
            return
        done = await self.judge.agenerate([same_request(p, k["instruction"]) for p, k in zip(parents, kids)],
                                          self.cfg.judge_sampling)
        for k, c in zip(kids, done):
            bump(counts, "judge", "asked")
            verdict = parse_same(c.text) if c.ok else None
            bump(counts, "judge", "errors" if not c.ok else {True: "same", False: "different", None: "unclear"}[verdict])
            if verdict:
                k["drop_reason"] = "no_information_gain"

    async def _answer(self, todo: list[tuple[dict, int]]) -> None:
        if not todo:
            return
        done = await self.answerer.agenerate([to_messages(k["instruction"], "", "") for k, _ in todo],
                                      [dict(self.cfg.answer_sampling, seed=s + 1) for _, s in todo])
        for (k, _), c in zip(todo, done):
            k["response"] = c.text.strip() if c.ok else ""
            k["model"] = self.answerer.name
            if not c.ok:
                k["drop_reason"] = "generation_error"
            elif c.finish_reason == "length":
                k["drop_reason"] = "truncated"
            else:
                k["drop_reason"] = answer_reason(k["response"], refusal_max_words=self.cfg.refusal_max_words)


@register("stage", "evol", EvolConfig)
def build(cfg: EvolConfig, ctx: Context) -> Evol:
    return Evol(cfg, ctx)

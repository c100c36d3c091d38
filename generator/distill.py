"""Teacher distillation as a stage: a stronger model writes the response to each row's task.

Each row's instruction (+ input) goes to the ``teacher`` role (falls back to the generator when
there is no ``[llm.teacher]``) `n` times, as n separate requests with seeds base..base+n-1. A
candidate is usable when the request succeeded, did not hit the token limit and is not empty.
With n > 1 and a judge configured (``[llm.<judge_role>]`` exists) every usable candidate is
scored 1-10 with our own grading prompt and the best is kept (ties: the earliest); without a
judge the first usable candidate is kept. A row with no usable candidate is dropped as
``truncated`` (some candidate hit the limit), else ``empty_response``, else ``generation_error``.

Lineage: the task is unchanged, so `id`, `method`, `parent_id`, `generation` and `round` stay as
they were (``method`` says where the *instruction* came from: a distilled self-instruct row stays
``self_instruct``); ``model`` names the teacher, as it does for every row's response writer.
Per-batch RNGs derive from the run seed, the stage name and the batch id, so batches may be
answered concurrently. State: counts of samples, judged rows and how often best-of-n picked a
candidate other than the first (a `Tally`, exact for the committed batches).

Example::

    [llm.teacher]
    backend = "vllm"
    model = "/models/bigger-instruct"

    [[stages]]
    type = "distill"
    n = 4
    system = "You are a careful, concise expert."
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import polars as pl

from synthloop.filters.scoring import parse_score
from synthloop.core.registry import Context, register
from synthloop.core.schema import make_batch, to_messages
from synthloop.core.stages import Tally, bump

GRADE_PROMPT = """Below is a task for an AI assistant and one answer to it. Grade the answer from 1 to 10.

A 10 solves the task fully and correctly and is easy to follow; a 5 is partly right or leaves out
something that was asked for; a 1 is wrong, off the subject, empty or a refusal.

[Task]
{task}

[Answer]
{answer}

Give a one-sentence reason, then finish with "Score: N" (N a whole number from 1 to 10)."""


@dataclass
class DistillConfig:
    role: str = "teacher"             # [llm.<role>] that answers; falls back to the generator
    n: int = 1                        # samples per instruction
    judge_role: str = "judge"         # best-of-n grader, used when n > 1 and [llm.<judge_role>] exists; "" = never
    system: str = ""                  # system prompt for the teacher; "" = none (the template's default)
    only_missing: bool = False        # answer only rows whose response is empty
    sampling: dict = field(default_factory=lambda: {"temperature": 0.7, "top_p": 0.9, "max_tokens": 512})
    judge_sampling: dict = field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 160})


def grade_request(task: str, answer: str) -> list[dict]:
    """The grading chat for one candidate.

    >>> grade_request("Add 2 and 3.", "5")[0]["content"].endswith('(N a whole number from 1 to 10).')
    True
    """
    return [{"role": "user", "content": GRADE_PROMPT.format(task=task.strip(), answer=answer.strip())}]


def failure_reason(finish_reasons: list[str], texts: list[str]) -> str:
    """Why no candidate was usable: truncated beats empty_response beats generation_error.

    >>> failure_reason(["error", "length"], ["", "half an ans"]), failure_reason(["stop"], [" "])
    ('truncated', 'empty_response')
    """
    if "length" in finish_reasons:
        return "truncated"
    if any(fr == "stop" and not t.strip() for fr, t in zip(finish_reasons, texts)):
        return "empty_response"
    return "generation_error"


class Distill:
    """The distill stage (one batch out per batch in)."""

    ordered = False

    def __init__(self, cfg: DistillConfig, ctx: Context):
        if cfg.n < 1:
            raise ValueError("distill: n must be >= 1")
        self.cfg, self.ctx = cfg, ctx
        self.teacher = ctx.llm(cfg.role)
        use_judge = cfg.n > 1 and cfg.judge_role and cfg.judge_role in ctx.config.llm
        self.judge = ctx.llm(cfg.judge_role) if use_judge else None
        self.name = "distill"      # the registry sets the configured name; it also keys the RNG stream
        self.tally = Tally({"samples": 0, "judged_rows": 0, "unscored": 0, "best_not_first": 0})

    def state(self) -> dict:
        return self.tally.totals

    def restore(self, state: dict, committed) -> None:
        self.tally.restore(state)

    def fold(self, batch_id: int) -> None:
        self.tally.fold(batch_id)

    def _chat(self, row: dict) -> list[dict]:
        msgs = to_messages(row["instruction"], row["input"], "")
        return ([{"role": "system", "content": self.cfg.system}] if self.cfg.system else []) + msgs

    async def process(self, batch: pl.DataFrame, batch_id: int) -> pl.DataFrame:
        """The batch with teacher responses (rows without a usable one get a drop_reason)."""
        rng = random.Random(f"{self.ctx.seed}:{self.name}:{batch_id}")
        counts = self.tally.batch(batch_id)
        rows = batch.to_dicts()
        base = [rng.randrange(2**31) for _ in rows]
        todo = [i for i, r in enumerate(rows) if r["drop_reason"] is None
                and not (self.cfg.only_missing and r["response"].strip())]
        if not todo:
            return batch
        n = self.cfg.n
        done = await self.teacher.agenerate([self._chat(rows[i]) for i in todo for _ in range(n)],
                                            [dict(self.cfg.sampling, seed=base[i] + j) for i in todo for j in range(n)])
        bump(counts, "samples", n=len(done))
        cands = {i: done[k * n:(k + 1) * n] for k, i in enumerate(todo)}
        usable = {i: [c.text.strip() for c in cs if c.ok and c.finish_reason == "stop" and c.text.strip()]
                  for i, cs in cands.items()}
        best = await self._pick(rows, usable, counts)
        for i in todo:
            r = rows[i]
            if i in best:
                r["response"], r["model"] = best[i], self.teacher.name
                r["messages"] = None       # rebuilt from the new response by make_batch
            else:
                r["drop_reason"] = failure_reason([c.finish_reason for c in cands[i]], [c.text for c in cands[i]])
        return make_batch(rows)

    async def _pick(self, rows: list[dict], usable: dict[int, list[str]], counts: dict) -> dict[int, str]:
        """The chosen answer per row: the judge's best of several, else the first."""
        best = {i: texts[0] for i, texts in usable.items() if texts}
        multi = [i for i, texts in usable.items() if len(texts) > 1]
        if self.judge is None or not multi:
            return best
        pairs = [(i, t) for i in multi for t in usable[i]]
        task = {i: rows[i]["instruction"] if not rows[i]["input"] else f"{rows[i]['instruction']}\n\n{rows[i]['input']}"
                for i in multi}
        done = await self.judge.agenerate([grade_request(task[i], t) for i, t in pairs], self.cfg.judge_sampling)
        scores: dict[int, list[float]] = {i: [] for i in multi}
        for (i, _), c in zip(pairs, done):
            s = parse_score(c.text, 1, 10) if c.ok else None
            bump(counts, "unscored", n=int(s is None))
            scores[i].append(float("-inf") if s is None else s)
        for i in multi:
            bump(counts, "judged_rows")
            k = max(range(len(scores[i])), key=lambda j: (scores[i][j], -j))
            bump(counts, "best_not_first", n=int(k > 0))
            best[i] = usable[i][k]
        return best


@register("stage", "distill", DistillConfig)
def build(cfg: DistillConfig, ctx: Context) -> Distill:
    return Distill(cfg, ctx)

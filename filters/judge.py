"""LLM-as-judge: our own 1-10 rubric, a forgiving score parser, optional averaging over k samples.

Writes ``scores.judge`` and ``scores.quality`` as the rating / 10 (so 0.7 means "7/10"); rows whose
judgements cannot be parsed keep null scores and are counted in `JudgeScorer.stats`, never
dropped for that. With ``min_score`` set, rows rated below it get drop_reason ``low_quality``.

Stage type ``judge`` (uses the ``[llm.judge]`` backend, else the generator)::

    [[stages]]
    type = "judge"
    k = 3
    temperature = 0.7
    min_score = 0.6
"""
from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from synthloop.filters.scoring import RatingStats, rate, set_scores, spread, to_score, user_text
from synthloop.core.registry import scorer
from synthloop.core.stages import drop_where

SYSTEM = "You are a strict, fair grader of answers written by AI assistants."

RUBRIC = """Grade the response to the task below on a scale from 1 to 10.

Rubric:
- 9-10: correct, complete, follows every part of the instruction, clear and well organised.
- 7-8: correct and helpful, with small omissions or style problems.
- 5-6: partly correct or incomplete; usable but with clear problems.
- 3-4: mostly wrong, off-topic, or hard to use.
- 1-2: wrong, harmful, empty, a refusal, or nonsense.

### Task
{task}

### Response
{response}

Write one or two sentences explaining your grade, then end with a line "Score: N" where N is a \
whole number from 1 to 10."""


@dataclass
class JudgeConfig:
    k: int = 1                    # judgements per row, averaged (k > 1 needs temperature > 0)
    temperature: float = 0.0
    max_tokens: int = 192
    min_score: float = 0.0        # drop below this normalised score (0.6 = "6/10"); 0 keeps all
    seed: int = 0
    params: dict = field(default_factory=dict)   # extra backend sampling settings


def judge_chat(instruction: str, input: str, response: str) -> list[dict]:
    """The judge request for one row.

    >>> judge_chat("Add 2 and 3.", "", "5")[1]["content"].count("Score: N")
    1
    """
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": RUBRIC.format(task=user_text(instruction, input),
                                                      response=response)}]


class JudgeScorer:
    """Per-batch judge; `stats` counts requests, parsed ratings, unparsable outputs and errors.

    >>> scorer = JudgeScorer(llm, JudgeConfig(min_score=0.5))     # doctest: +SKIP
    >>> scorer(batch)["scores"].struct.field("judge")              # doctest: +SKIP
    """

    def __init__(self, llm, cfg: JudgeConfig | None = None):
        self.llm, self.cfg = llm, cfg or JudgeConfig()
        if self.cfg.k < 1:
            raise ValueError("judge: k must be >= 1")
        if self.cfg.k > 1 and self.cfg.temperature <= 0:
            raise ValueError("judge: k > 1 needs temperature > 0, or the k judgements are identical")
        self.stats = RatingStats()
        self.outputs: list[str] | None = None     # set to [] to keep raw judge texts (debugging)

    def state(self) -> dict:
        """Parse counts, persisted in the manifest so failures are visible per run."""
        return {"ratings": self.stats.as_dict()}

    def restore(self, state: dict, committed) -> None:
        self.stats = RatingStats(**state.get("ratings", {}))

    def __call__(self, batch: pl.DataFrame) -> pl.DataFrame:
        todo = to_score(batch)
        rows = batch.filter(todo).select("instruction", "input", "response").rows()
        params = {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens,
                  **self.cfg.params}
        raw = rate(self.llm, [judge_chat(*r) for r in rows], lo=0, hi=10, k=self.cfg.k,
                   params=params, seed=self.cfg.seed, stats=self.stats, outputs=self.outputs)
        norm = spread(todo, [None if v is None else v / 10 for v in raw])
        out = set_scores(batch, judge=norm, quality=norm)
        if self.cfg.min_score > 0:
            out = drop_where(out, pl.col("scores").struct.field("judge") < self.cfg.min_score,
                             "low_quality")
        return out


@scorer("judge", JudgeConfig)
def build(cfg: JudgeConfig, llm) -> JudgeScorer:
    return JudgeScorer(llm("judge"), cfg)

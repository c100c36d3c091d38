"""DEITA-style complexity and quality scores, asked of the judge LLM.

DEITA (Liu et al., 2024) scores instruction complexity and response quality with two *trained*
LLaMA scorers and takes the expected value over the score tokens 1-6. We have no such scorers:
this stage prompts the judge LLM with our own 1-6 prompts and parses the number it writes, so
its scores are only as good as the judge. Written normalised to [0, 1] as (score - 1) / 5:
``scores.complexity`` and ``scores.quality``. Optional minimums drop rows with
``low_complexity`` / ``low_quality``.

Stage type ``deita``::

    [[stages]]
    type = "deita"
    min_quality = 0.4
"""
from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from synthloop.filters.scoring import RatingStats, rate, set_scores, spread, to_score, user_text
from synthloop.core.registry import scorer
from synthloop.core.stages import drop_where

COMPLEXITY = """How complex is the following instruction? Rate it from 1 to 6.

1 = trivial: one short step, no constraints.
2 = easy: a familiar task with a single requirement.
3 = moderate: a few steps or one constraint to respect.
4 = demanding: several steps, constraints or specialised knowledge.
5 = hard: multi-step reasoning with several interacting constraints.
6 = very hard: expert knowledge, deep reasoning and many constraints at once.

### Instruction
{task}

Reply with a line "Score: N" (N from 1 to 6), then at most one sentence why."""

QUALITY = """How good is the response to the instruction below? Rate it from 1 to 6.

1 = useless: wrong, empty, off-topic or a refusal.
2 = poor: mostly wrong or missing most of what was asked.
3 = fair: partly right, with clear gaps or errors.
4 = good: right and helpful, with small gaps.
5 = very good: right, complete and clear.
6 = excellent: right, complete, clear and insightful; nothing to improve.

### Instruction
{task}

### Response
{response}

Reply with a line "Score: N" (N from 1 to 6), then at most one sentence why."""


@dataclass
class DeitaConfig:
    complexity: bool = True
    quality: bool = True
    k: int = 1
    temperature: float = 0.0
    max_tokens: int = 96
    min_complexity: float = 0.0   # normalised; 0 keeps all
    min_quality: float = 0.0
    seed: int = 0
    params: dict = field(default_factory=dict)


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class DeitaScorer:
    """Complexity of the instruction and quality of the response, both 1-6 from the judge.

    >>> DeitaScorer(llm, DeitaConfig(quality=False))(batch)["scores"]    # doctest: +SKIP
    """

    def __init__(self, llm, cfg: DeitaConfig | None = None):
        self.llm, self.cfg = llm, cfg or DeitaConfig()
        if self.cfg.k > 1 and self.cfg.temperature <= 0:
            raise ValueError("deita: k > 1 needs temperature > 0, or the k ratings are identical")
        self.stats = {"complexity": RatingStats(), "quality": RatingStats()}

    def state(self) -> dict:
        """Parse counts per score, persisted in the manifest so failures are visible per run."""
        return {"ratings": {k: v.as_dict() for k, v in self.stats.items()}}

    def restore(self, state: dict, committed) -> None:
        for k, v in state.get("ratings", {}).items():
            self.stats[k] = RatingStats(**v)

    def _rate(self, what: str, chats: list[list[dict]]) -> list[float | None]:
        params = {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens,
                  **self.cfg.params}
        raw = rate(self.llm, chats, lo=1, hi=6, k=self.cfg.k, params=params, seed=self.cfg.seed,
                   stats=self.stats[what])
        return [None if v is None else (v - 1) / 5 for v in raw]

    def __call__(self, batch: pl.DataFrame) -> pl.DataFrame:
        values = {}
        if self.cfg.complexity:
            # Complexity needs only the instruction, so rows without a response are rated too.
            todo = batch["drop_reason"].is_null()
            rows = batch.filter(todo).select("instruction", "input").rows()
            chats = [_chat(COMPLEXITY.format(task=user_text(*r))) for r in rows]
            values["complexity"] = spread(todo, self._rate("complexity", chats))
        if self.cfg.quality:
            todo = to_score(batch)
            rows = batch.filter(todo).select("instruction", "input", "response").rows()
            chats = [_chat(QUALITY.format(task=user_text(i, x), response=r)) for i, x, r in rows]
            values["quality"] = spread(todo, self._rate("quality", chats))
        out = set_scores(batch, **values)
        field_ = pl.col("scores").struct.field
        if self.cfg.complexity and self.cfg.min_complexity > 0:
            out = drop_where(out, field_("complexity") < self.cfg.min_complexity, "low_complexity")
        if self.cfg.quality and self.cfg.min_quality > 0:
            out = drop_where(out, field_("quality") < self.cfg.min_quality, "low_quality")
        return out


@scorer("deita", DeitaConfig)
def build(cfg: DeitaConfig, llm) -> DeitaScorer:
    return DeitaScorer(llm("judge"), cfg)

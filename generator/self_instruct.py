"""Self-instruct (Wang et al., 2022) as a source: new instructions from in-context examples.

Each prompt shows 8 numbered tasks (6 seed tasks + 2 machine-generated ones once there are
some) and lets the model continue the list. Candidates are parsed from the numbered list and
kept only if they pass the paper's filters, each drop counted by reason:

- ``too_short`` / ``too_long``: fewer than 3 or more than 150 words (`word_count`: a Han or kana
  character is a word)
- ``unsupported_modality``: names image, graph, picture, file, map, draw, plot, go to, video,
  audio, music, flowchart or diagram (whole words, as the paper does)
- ``starts_with_punctuation``, ``non_ascii_start`` (a non-ASCII character that is not a letter or
  digit: the paper drops every non-ASCII start, which would drop "Übersetze ...", "Écris ..."),
  ``write_a_program``
- ``truncated``: the last item of a completion that hit the token limit
- ``too_similar``: ROUGE-L > 0.7 against any instruction kept so far, seeds included (exact
  ROUGE-L, indexed so the check stays cheap at 50,000 instructions: generator/rouge.py)

Kept instructions leave with an empty response; the `instances` stage answers them.

Staleness: `steps_in_flight` steps are generated at once, so the pool a prompt draws its two
machine-generated examples from is a little behind. Step k's prompts draw from the instructions
kept by steps <= k - steps_in_flight; with 1, the pool after the previous step, as in the paper's
batched generation (its prompts of one batch do not see each other's output either). The novelty
check is unaffected: every candidate is compared with every instruction kept before it, seeds
included, in step order. What changes with more steps in flight is only which machine examples
the prompts show (a few steps' worth of the newest instructions are not shown yet); the rows
are a deterministic function of the config, never of timing.
"""
from __future__ import annotations

import random
import re
import string
import sys
from collections import deque
from dataclasses import dataclass, field

import polars as pl

from synthloop.core.registry import Context, register
from synthloop.generator.rouge import CJK, NoveltyIndex
from synthloop.core.schema import make_batch
from synthloop.core.stages import run_steps

BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
             "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]
_BLACK_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.IGNORECASE)
_ITEM_RE = re.compile(r"\n\s*\d+\s*[.)]\s*")
_CJK_RE = re.compile(f"[{CJK}]")
OWN_REASONS = ("too_short", "too_long", "unsupported_modality", "starts_with_punctuation",
               "non_ascii_start", "write_a_program", "truncated", "too_similar")

PROMPT_HEAD = ("Below is a numbered list of tasks that people ask a capable assistant to do. "
               "Each task is a single, self-contained instruction. The tasks are varied: they cover "
               "different topics, skills and formats, and some come with an input to work on.\n\n")


@dataclass
class SelfInstructConfig:
    role: str = "generator"                  # which [llm.<role>] writes the instructions
    prompts_per_step: int = 16               # prompts sent to the model together
    seed_examples: int = 6                   # in-context tasks drawn from the seeds ...
    machine_examples: int = 2                # ... and from earlier machine-generated tasks
    threshold: float = 0.7                   # keep only ROUGE-L <= threshold against all kept
    min_words: int = 3
    max_words: int = 150
    max_steps: int = 0                       # 0: until the run's limit
    patience: int = 10                       # stop after this many steps in a row keep nothing
    steps_in_flight: int = 2                 # step k's machine examples come from steps <= k - this
    # The paper sampled GPT-3 at top_p 0.5; a 135M model then repeats one item down the list
    # (measured: 12 new instructions per 1k tokens vs 50 at temperature 1.0, top_p 0.9).
    sampling: dict = field(default_factory=lambda: {
        "temperature": 1.0, "top_p": 0.9, "max_tokens": 256, "stop": ["\n\n", "\n17."]})


def build_prompt(examples: list[str]) -> str:
    """The list prompt: numbered examples, then the next number for the model to continue.

    >>> build_prompt(["Add two numbers.", "Name a bird."]).endswith("1. Add two numbers.\\n2. Name a bird.\\n3.")
    True
    """
    items = "\n".join(f"{i}. {' '.join(t.split())}" for i, t in enumerate(examples, 1))
    return f"{PROMPT_HEAD}{items}\n{len(examples) + 1}."


def parse_list(completion: str) -> list[str]:
    """Instructions from a completion that continues a numbered list after "N.".

    >>> parse_list(" Sort a list.\\n10. Name three rivers in Asia.\\n11.")
    ['Sort a list.', 'Name three rivers in Asia.']
    """
    parts = _ITEM_RE.split("\n" + "0." + completion)
    return [re.sub(r"\s+", " ", p).strip() for p in parts if p.strip()]


def word_count(text: str) -> int:
    """Words as the length rules count them: whitespace-separated words, except that each Han or
    kana character counts as one (those scripts put no spaces between words).

    >>> word_count("Name three rivers."), word_count("请写一首短诗。"), word_count("Übersetze 日本語 bitte")
    (3, 6, 5)
    """
    return sum(1 for w in text.split() if not _CJK_RE.search(w)) + len(_CJK_RE.findall(text))


def rule_reason(inst: str, *, min_words: int = 3, max_words: int = 150) -> str | None:
    """The paper's rule-based drop reason for an instruction, or None if it passes.

    >>> rule_reason("Draw a cat for me please."), rule_reason("Übersetze den Satz ins Englische."), rule_reason("→ Sort a list.")
    ('unsupported_modality', None, 'non_ascii_start')
    """
    words = word_count(inst)
    if words < min_words:
        return "too_short"
    if words > max_words:
        return "too_long"
    if _BLACK_RE.search(inst):
        return "unsupported_modality"
    if inst.startswith("Write a program"):
        return "write_a_program"
    if inst[0] in string.punctuation:
        return "starts_with_punctuation"
    if not inst[0].isascii() and not inst[0].isalnum():
        return "non_ascii_start"
    return None


class SelfInstruct:
    """The self-instruct source. State: the step counter and the instructions the newest steps
    kept (too new for the next prompts); the pool itself is rebuilt from committed rows."""

    def __init__(self, cfg: SelfInstructConfig, ctx: Context):
        if cfg.steps_in_flight < 1:
            raise ValueError("self_instruct: steps_in_flight must be >= 1")
        self.cfg, self.ctx = cfg, ctx
        self.llm = ctx.llm(cfg.role)
        self.seed_tasks = list(dict.fromkeys(ctx.seeds.records["instruction"].to_list()))
        self.machine: list[str] = []
        self.index = NoveltyIndex(threshold=cfg.threshold)
        for t in self.seed_tasks:
            self.index.add(t)
        self.step = 0                         # steps finished
        # (step, instructions it kept) for the last steps_in_flight - 1 finished steps
        self.recent: deque = deque(maxlen=cfg.steps_in_flight - 1)
        self.name = "self_instruct"

    def state(self) -> dict:
        return {"step": self.step, "machine_tasks": len(self.machine),
                "recent": [[step, list(kept)] for step, kept in self.recent]}

    def restore(self, state: dict, committed) -> None:
        """Refill the pool with every instruction this source accepted in earlier processes."""
        self.step = state.get("step", 0)
        self.recent.extend((step, kept) for step, kept in state.get("recent", []))
        mine = committed.passed().filter(pl.col("method") == "self_instruct").select("instruction")
        for t in mine.collect()["instruction"].to_list():
            self.machine.append(t)
            self.index.add(t)

    def _pool(self, step: int) -> list[str]:
        """Machine instructions step `step` may show: those kept by steps <= step - steps_in_flight,
        in a canonical order (a resumed run rebuilds the pool from shards in another order, and
        must still draw exactly the examples an uninterrupted run would)."""
        too_new = {t for s, kept in self.recent if s > step - self.cfg.steps_in_flight for t in kept}
        return sorted(t for t in self.machine if t not in too_new)

    def _examples(self, rng: random.Random, pool: list[str]) -> list[str]:
        n_machine = min(self.cfg.machine_examples, len(pool))
        picked = rng.sample(self.seed_tasks, self.cfg.seed_examples + self.cfg.machine_examples - n_machine)
        picked += rng.sample(pool, n_machine)
        rng.shuffle(picked)
        return picked

    def launch(self, step: int):
        """The step's prompts, fixed now, and the awaitable of their completions."""
        # One RNG per step, derived from the run seed: a resumed run sends the same prompts.
        rng = random.Random(f"{self.ctx.seed}:self_instruct:{step}")
        pool = self._pool(step)
        prompts = [build_prompt(self._examples(rng, pool)) for _ in range(self.cfg.prompts_per_step)]
        params = [dict(self.cfg.sampling, seed=rng.randrange(2**31)) for _ in prompts]
        return self.llm.agenerate(prompts, params)

    async def finish(self, step: int, done: list) -> pl.DataFrame:
        """Parse and filter a step's completions (in step order: novelty is checked against all before)."""
        rows, kept = [], []
        for c in done:
            if not c.ok:
                continue
            items = parse_list(c.text)
            for k, inst in enumerate(items):
                reason = rule_reason(inst, min_words=self.cfg.min_words, max_words=self.cfg.max_words)
                if reason is None and c.finish_reason == "length" and k == len(items) - 1:
                    reason = "truncated"
                if reason is None:
                    novel, _ = self.index.add_if_novel(inst)
                    if novel:
                        kept.append(inst)
                    else:
                        reason = "too_similar"
                rows.append({"instruction": inst, "method": "self_instruct", "model": self.llm.name,
                             "round": self.ctx.round, "drop_reason": reason})
        self.machine += kept
        self.recent.append((step, kept))
        self.step = step + 1
        errors = sum(not c.ok for c in done)
        if errors:
            print(f"self_instruct: {errors} of {len(done)} requests failed this step", file=sys.stderr)
        return make_batch(rows)

    def __call__(self):
        return run_steps(self, "self_instruct", max_steps=self.cfg.max_steps, patience=self.cfg.patience,
                         ahead=self.cfg.steps_in_flight, speculate=self.ctx.speculate)


@register("source", "self_instruct", SelfInstructConfig)
def build(cfg: SelfInstructConfig, ctx: Context) -> SelfInstruct:
    return SelfInstruct(cfg, ctx)

"""Magpie (Xu et al., 2024) as a source: an aligned chat model, shown only the start of a user
turn, writes a user's instruction by itself; the same model then answers it.

The pre-query prefix is derived from the chat template: a conversation whose user message is a
sentinel is rendered and cut where the sentinel starts, so the prefix is exactly what precedes a
user's words (`pre_query`). Templates that add a default system prompt when there is none (SmolLM2's
does) keep it: with ``system = ""`` the prefix is what the model saw in training; a non-empty
``system`` replaces it. The end-of-turn text that follows the sentinel is the stop string.

The prefix goes to the backend as a raw prompt string. The transformers and vllm backends send it
as-is; the openai backend sends it to /v1/completions, which some servers (several hosted APIs) do
not offer: their rows fail, and when every request of a step fails this source stops with a one-line
`MagpieError` naming the cause. With openai set `tokenizer` (a local model folder whose template
matches the served model) or a literal `pre_query`, since the template is not visible over HTTP.

Drop reasons: ``generation_error``, ``truncated`` (the instruction hit `max_tokens`),
``empty_instruction``, self-instruct's rule reasons (``too_short``, ``too_long``,
``unsupported_modality``, ``starts_with_punctuation``, ``non_ascii_start``, ``write_a_program``),
``duplicate_instruction`` (seen before in this run), then for the answer ``generation_error``,
``truncated`` and ``empty_response``. State: the step counter (per-step RNGs derive from the run
seed and it, so a resumed run sends the same requests and hits the cache). The instruction
requests of the next `steps_in_flight` steps go out early: they do not depend on earlier steps,
so this changes no output; filtering and answering stay in step order.

Example::

    [source]
    type = "magpie"
    requests_per_step = 32
    max_steps = 10
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import polars as pl

from synthloop.core.registry import Context, register
from synthloop.core.schema import make_batch, record_id
from synthloop.core.stages import run_steps
from synthloop.generator.self_instruct import rule_reason

SENTINEL = "SYNTHLOOPUSERSENTINEL"


class MagpieError(RuntimeError):
    """Magpie cannot run with this backend; the message is one line."""


@dataclass
class MagpieConfig:
    role: str = "generator"          # [llm.<role>] that writes (and by default answers) the instructions
    answer_role: str = ""            # answers the instructions; "" = the same role
    system: str = ""                 # system prompt; "" = whatever the template does without one
    pre_query: str = ""              # literal prefix, overriding the template (e.g. for openai)
    end_of_turn: str = ""            # stop text for the instruction; "" = derived from the template
    tokenizer: str = ""              # model whose chat template to use; "" = the backend's own
    requests_per_step: int = 16      # raw prompts sent together
    max_steps: int = 0               # 0: until the run's limit
    patience: int = 10               # stop after this many steps in a row keep nothing
    steps_in_flight: int = 2         # steps whose instruction requests are out at once
    min_words: int = 3
    max_words: int = 150
    instruction_sampling: dict = field(default_factory=lambda: {"temperature": 1.0, "top_p": 1.0, "max_tokens": 128})
    answer_sampling: dict = field(default_factory=lambda: {"temperature": 0.7, "top_p": 0.9, "max_tokens": 320})


def pre_query(tokenizer, system: str = "") -> tuple[str, str]:
    """(prefix before a user's words, end-of-turn text after them) from a chat template.

    >>> pre_query(smollm2_tokenizer)      # doctest: +SKIP
    ('<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\\n<|im_start|>user\\n', '<|im_end|>')
    """
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": SENTINEL}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    at = text.find(SENTINEL)
    if at < 0:
        raise MagpieError("magpie: the chat template does not show the user's message verbatim; set pre_query")
    after = text[at + len(SENTINEL):].strip()
    # The end-of-turn text is what directly follows the user's words, up to the next line.
    end = after.split("\n")[0].strip() if after else ""
    return text[:at], end or (getattr(tokenizer, "eos_token", "") or "")


def backend_tokenizer(llm):
    """The tokenizer of a local backend (through the request cache wrapper), or None."""
    return getattr(getattr(llm, "inner", llm), "tokenizer", None)


class Magpie:
    """The magpie source. State: the step counter; seen instructions are rebuilt from committed rows."""

    def __init__(self, cfg: MagpieConfig, ctx: Context):
        if cfg.requests_per_step < 1:
            raise ValueError("magpie: requests_per_step must be >= 1")
        self.cfg, self.ctx = cfg, ctx
        self.llm = ctx.llm(cfg.role)
        self.answerer = ctx.llm(cfg.answer_role or cfg.role)
        self.prefix, self.end_of_turn = self._template()
        self.seen: set[str] = set()
        self.step = 0
        self.name = "magpie"

    def _template(self) -> tuple[str, str]:
        cfg = self.cfg
        if cfg.pre_query:
            return cfg.pre_query, cfg.end_of_turn
        if cfg.tokenizer:
            from transformers import AutoTokenizer

            from synthloop.core.models import resolve_model
            tok = AutoTokenizer.from_pretrained(resolve_model(cfg.tokenizer))
        else:
            tok = backend_tokenizer(self.llm)
        if tok is None:
            raise MagpieError(f"magpie: backend '{self.llm.name}' exposes no chat template; set "
                              "tokenizer (a local model folder) or pre_query in the [source] table")
        prefix, end = pre_query(tok, cfg.system)
        return prefix, cfg.end_of_turn or end

    def state(self) -> dict:
        return {"step": self.step}

    def restore(self, state: dict, committed) -> None:
        """Refill the seen set with instructions this source passed on in earlier processes."""
        self.step = state.get("step", 0)
        mine = committed.passed().filter(pl.col("method") == "magpie").select("id")
        self.seen.update(mine.collect()["id"].to_list())

    def launch(self, step: int):
        """The step's instruction requests, fixed now, and the awaitable of (seeds, completions)."""
        cfg = self.cfg
        rng = random.Random(f"{self.ctx.seed}:{self.name}:{step}")
        seeds = [rng.randrange(2**31) for _ in range(cfg.requests_per_step)]
        stop = [s for s in (self.end_of_turn,) if s]
        return _paired(seeds, self.llm.agenerate([self.prefix] * len(seeds),
                                                 [dict(cfg.instruction_sampling, stop=stop, seed=s) for s in seeds]))

    async def finish(self, step: int, answers: tuple[list[int], list]) -> pl.DataFrame:
        """Filter a step's instructions against the ones seen before, answer the survivors."""
        cfg = self.cfg
        seeds, done = answers
        self.step = step + 1
        if all(not c.ok for c in done):
            err = next((c.error for c in done if c.error), "no error text")
            hint = (" (Magpie sends a raw prompt; this server lacks /v1/completions: use one that has it, "
                    "e.g. vllm serve or llama.cpp, or the transformers/vllm backend)"
                    if "/completions" in err else "")
            raise MagpieError(f"magpie: all {len(done)} instruction requests failed: {err.splitlines()[0][:200]}{hint}")
        rows, step_ids = [], set()
        for c, s in zip(done, seeds):
            inst = c.text.split(self.end_of_turn)[0].strip() if self.end_of_turn else c.text.strip()
            if not c.ok:
                reason = "generation_error"
            elif c.finish_reason == "length":
                reason = "truncated"
            elif not inst:
                reason = "empty_instruction"
            else:
                reason = rule_reason(inst, min_words=cfg.min_words, max_words=cfg.max_words)
            if reason is None:
                rid = record_id(inst)
                reason = "duplicate_instruction" if rid in self.seen or rid in step_ids else None
                step_ids.add(rid)
            rows.append({"instruction": inst, "method": "magpie", "model": self.llm.name,
                         "round": self.ctx.round, "drop_reason": reason, "_seed": s})
        await self._answer([r for r in rows if r["drop_reason"] is None])
        # Only rows leaving this source count as seen: exactly what restore() rebuilds.
        self.seen.update(record_id(r["instruction"]) for r in rows if r["drop_reason"] is None)
        for r in rows:
            del r["_seed"]
        return make_batch(rows)

    async def _answer(self, todo: list[dict]) -> None:
        if not todo:
            return
        sys_msg = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        done = await self.answerer.agenerate([sys_msg + [{"role": "user", "content": r["instruction"]}] for r in todo],
                                             [dict(self.cfg.answer_sampling, seed=r["_seed"] + 1) for r in todo])
        for r, c in zip(todo, done):
            r["response"], r["model"] = (c.text.strip() if c.ok else ""), self.answerer.name
            if not c.ok:
                r["drop_reason"] = "generation_error"
            elif c.finish_reason == "length":
                r["drop_reason"] = "truncated"
            elif not r["response"]:
                r["drop_reason"] = "empty_response"

    def __call__(self):
        return run_steps(self, "magpie", max_steps=self.cfg.max_steps, patience=self.cfg.patience,
                         ahead=self.cfg.steps_in_flight, speculate=self.ctx.speculate)


async def _paired(seeds: list[int], answers):
    return seeds, await answers


@register("source", "magpie", MagpieConfig)
def build(cfg: MagpieConfig, ctx: Context) -> Magpie:
    return Magpie(cfg, ctx)

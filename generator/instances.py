"""Instance generation for new instructions (self-instruct's second half).

For each row without a response:
1. *Classification or not*: a few-shot yes/no prompt built from the seed tasks.
2. *Input and output*, few-shot from seed demonstrations of the same kind:
   classification tasks are output-first (class label, then an input that fits it),
   the others input-first (an input if the task needs one, then the output).
3. With ``answer = "chat"`` (default) the output is then written by the model in chat form for
   the instruction + input, which instruct-tuned models do much better than few-shot completion;
   ``answer = "fewshot"`` keeps the paper's jointly generated output.

Drop reasons: ``generation_error`` (the backend failed the row), ``truncated`` (the answer hit
the token limit), ``unparseable_instance``, ``empty_response``.

The stage keeps no state: its random draws derive from the run seed and the batch id, so it may
work on many batches at once.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import polars as pl

from synthloop.core.registry import Context, register
from synthloop.core.schema import make_batch, to_messages

NONE = "<none>"
SEP = "\n###\n"


@dataclass
class InstancesConfig:
    role: str = "generator"
    demonstrations: int = 4                  # seed examples per few-shot prompt
    answer: str = "chat"                     # chat | fewshot
    classify_sampling: dict = field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 2})
    instance_sampling: dict = field(default_factory=lambda: {
        "temperature": 0.7, "top_p": 0.9, "max_tokens": 200, "stop": ["###", "\nTask:"]})
    answer_sampling: dict = field(default_factory=lambda: {"temperature": 0.7, "top_p": 0.9, "max_tokens": 320})


def _clean(text: str) -> str:
    return text.strip()


def classify_prompt(task: str, demos: list[tuple[str, bool]]) -> str:
    """Few-shot: can the task be answered by choosing one of a fixed set of labels?"""
    head = "Decide whether each task asks the reader to pick one label from a fixed, finite set of labels.\n\n"
    shots = "".join(f"Task: {t}\nFixed set of labels: {'Yes' if y else 'No'}\n\n" for t, y in demos)
    return f"{head}{shots}Task: {task}\nFixed set of labels:"


def input_first_prompt(task: str, demos: list[dict]) -> str:
    head = ("Each task below comes with an example input (or <none> when the task needs no input) "
            "and a correct, complete output." + SEP)
    shots = SEP.join(f"Task: {d['instruction']}\nInput: {d['input'] or NONE}\nOutput: {d['response']}"
                     for d in demos)
    return f"{head}{shots}{SEP}Task: {task}\nInput:"


def output_first_prompt(task: str, demos: list[dict]) -> str:
    head = "Each classification task below shows a class label and then an input that belongs to it." + SEP
    shots = SEP.join(f"Task: {d['instruction']}\nClass label: {d['response']}\nInput: {d['input'] or NONE}"
                     for d in demos)
    return f"{head}{shots}{SEP}Task: {task}\nClass label:"


def parse_input_first(text: str) -> tuple[str, str] | None:
    """(input, output) from a completion of ``...Input:``; None if there is no Output part.

    >>> parse_input_first(" <none>\\nOutput: Paris.")
    ('', 'Paris.')
    """
    m = re.match(r"\s*(.*?)\n\s*Output:\s*(.*)\Z", text, re.S)
    if not m:
        return None
    inp = _clean(m.group(1))
    return ("" if inp in (NONE, "None", "none", "") else inp), _clean(m.group(2))


def parse_output_first(text: str) -> tuple[str, str] | None:
    """(input, label) from a completion of ``...Class label:``.

    >>> parse_output_first(" Positive\\nInput: I loved it.")
    ('I loved it.', 'Positive')
    """
    m = re.match(r"\s*(.*?)\n\s*Input:\s*(.*)\Z", text, re.S)
    if not m:
        return None
    inp = _clean(m.group(2))
    return ("" if inp in (NONE, "None", "none") else inp), _clean(m.group(1))


class Instances:
    ordered = False

    def __init__(self, cfg: InstancesConfig, ctx: Context):
        if cfg.answer not in ("chat", "fewshot"):
            raise ValueError(f"instances.answer must be chat or fewshot, got {cfg.answer!r}")
        self.cfg, self.ctx = cfg, ctx
        self.llm = ctx.llm(cfg.role)
        seeds = ctx.seeds.records.filter(pl.col("response") != "")
        clf = pl.col("id").is_in(list(ctx.seeds.classification))
        self.clf_demos = seeds.filter(clf).to_dicts()
        self.gen_demos = seeds.filter(~clf).to_dicts()
        if not self.gen_demos:
            raise ValueError("instances: the seeds have no answered task to use as a demonstration")
        self.name = "instances"

    async def process(self, batch: pl.DataFrame, batch_id: int) -> pl.DataFrame:
        rng = random.Random(f"{self.ctx.seed}:instances:{batch_id}")
        todo = [i for i, r in enumerate(batch["response"].to_list()) if not r]
        if not todo:
            return batch
        rows = batch.to_dicts()
        n = self.cfg.demonstrations
        seed_of = {i: rng.randrange(2**31) for i in todo}
        is_clf = [False] * len(todo)
        if self.clf_demos:
            shots = [(d["instruction"], True) for d in self.clf_demos] + [(d["instruction"], False) for d in self.gen_demos]
            prompts = []
            for i in todo:
                demos = rng.sample(shots, min(2 * n, len(shots)))
                prompts.append(classify_prompt(rows[i]["instruction"], demos))
            done = await self.llm.agenerate(prompts, self.cfg.classify_sampling)
            is_clf = [c.ok and c.text.strip().lower().startswith("yes") for c in done]
        prompts = []
        for i, clf in zip(todo, is_clf):
            pool = self.clf_demos if clf else self.gen_demos
            demos = rng.sample(pool, min(n, len(pool)))
            build = output_first_prompt if clf else input_first_prompt
            prompts.append(build(rows[i]["instruction"], demos))
        done = await self.llm.agenerate(prompts, [dict(self.cfg.instance_sampling, seed=seed_of[i]) for i in todo])
        answers_for = []
        for i, clf, c in zip(todo, is_clf, done):
            row = rows[i]
            parsed = (parse_output_first if clf else parse_input_first)(c.text) if c.ok else None
            if not c.ok:
                row["drop_reason"] = "generation_error"
            elif parsed is None:
                row["drop_reason"] = "unparseable_instance"
            else:
                row["input"], row["response"] = parsed
                if self.cfg.answer == "chat" and not clf:
                    answers_for.append(i)
                elif c.finish_reason == "length":
                    row["drop_reason"] = "truncated"
        if answers_for:
            chats = [to_messages(rows[i]["instruction"], rows[i]["input"], "") for i in answers_for]
            done = await self.llm.agenerate(chats, [dict(self.cfg.answer_sampling, seed=seed_of[i] + 1) for i in answers_for])
            for i, c in zip(answers_for, done):
                rows[i]["response"] = c.text.strip() if c.ok else ""
                if not c.ok:
                    rows[i]["drop_reason"] = "generation_error"
                elif c.finish_reason == "length":
                    rows[i]["drop_reason"] = "truncated"
        for i in todo:
            r = rows[i]
            if r["drop_reason"] is None and not r["response"].strip():
                r["drop_reason"] = "empty_response"
            r["model"] = self.llm.name
            r["messages"] = None   # rebuilt from the new input/response by make_batch
            r["id"] = None         # the input is part of the task's identity
        return make_batch(rows)


@register("stage", "instances", InstancesConfig)
def build(cfg: InstancesConfig, ctx: Context) -> Instances:
    return Instances(cfg, ctx)

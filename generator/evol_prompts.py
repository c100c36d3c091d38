"""Prompt texts for Evol-Instruct, in synthloop's own wording, and their parsers.

In-depth operations ask the model to make one task harder in one specific way; the in-breadth
operation asks for a new, rarer task from the same field. The model writes its task between tags
(`<harder_task>` / `<new_task>`); `parse_evolved` takes what is between them. `MARKERS` lists the
words of these prompts that must never show up in an evolved task: a task that contains one has
copied the rewriting instructions (the ``prompt_leak`` elimination).

The "same or different" judge prompt for the information-gain check lives here too.
"""
from __future__ import annotations

import re

#: How each in-depth operation changes a task (the one line that differs between depth prompts).
DEPTH_HOW = {
    "add_constraints": (
        "Add one more requirement that a good answer has to meet, such as a limit on length, a "
        "required format, a special case to handle, or something the answer must leave out."),
    "deepen": (
        "Where the task only touches a subject on the surface, make it ask for more depth: the "
        "causes behind something, the trade-offs involved, or how it fits into a bigger picture."),
    "concretize": (
        "Swap general wording for specifics: name a concrete situation, object, number, place or "
        "audience that the task is about."),
    "increase_reasoning": (
        "Make the task need several steps of thinking, for example by asking to work something out "
        "in stages, compare options before choosing, or justify each step of the answer."),
    "complicate_input": (
        "Give the task richer material to work on: include a short piece of data it must use, such "
        "as a small table, a list of records, a JSON object, a code snippet or a paragraph of text."),
}
DEPTH_OPS = tuple(DEPTH_HOW)
BREADTH_OP = "breadth"
OPS = DEPTH_OPS + (BREADTH_OP,)

SOURCE_OPEN, SOURCE_CLOSE = "<source_task>", "</source_task>"
HARDER_OPEN, HARDER_CLOSE = "<harder_task>", "</harder_task>"
NEW_OPEN, NEW_CLOSE = "<new_task>", "</new_task>"
CLOSE_TAGS = (HARDER_CLOSE, NEW_CLOSE)   # stop strings: nothing after the task is needed

DEPTH_PROMPT = """You help build training data for AI assistants by turning easy tasks into harder ones.

Here is a task someone gave an assistant:

{source_open}
{task}
{source_close}

Make it harder in this way: {how}

Keep to these rules:
- Stay on the same topic and keep what the task asks for; a person must still be able to answer it.
- Add no more than about {extra_words} words.
- Write only the harder task itself: no greeting, no explanation, no answer.
- Do not mention the source task, these rules, or that the task was changed.

Put the harder task between {open} and {close}."""

BREADTH_PROMPT = """You help build training data for AI assistants by inventing new tasks.

Here is a task someone gave an assistant:

{source_open}
{task}
{source_close}

Invent one different task from the same field that people ask about less often. It should be about
as long and as hard as the one above and make sense on its own.

Keep to these rules:
- Write only the new task itself: no greeting, no explanation, no answer.
- Do not mention the source task or these rules.

Put the new task between {open} and {close}."""

#: Pieces of our own prompts; an evolved task containing one (any case) leaked the prompt.
MARKERS = ("source_task", "harder_task", "new_task", "source task", "harder task",
           "these rules", "make it harder", "the task was changed")

SAME_PROMPT = """Compare two tasks written for an AI assistant.

Task A:
{a}

Task B:
{b}

Do they ask for the same thing, with the same requirements, limits, depth and scope? Wording
differences alone do not count. Reply with one word: SAME or DIFFERENT."""


def evolve_request(op: str, task: str, *, extra_words: int = 30) -> list[dict]:
    """The chat request that applies operation `op` to `task`.

    >>> evolve_request("deepen", "Explain tides.")[0]["content"].count("<harder_task>")
    1
    """
    if op == BREADTH_OP:
        text = BREADTH_PROMPT.format(task=task.strip(), source_open=SOURCE_OPEN, source_close=SOURCE_CLOSE,
                                     open=NEW_OPEN, close=NEW_CLOSE)
    elif op in DEPTH_HOW:
        text = DEPTH_PROMPT.format(task=task.strip(), how=DEPTH_HOW[op], extra_words=extra_words,
                                   source_open=SOURCE_OPEN, source_close=SOURCE_CLOSE,
                                   open=HARDER_OPEN, close=HARDER_CLOSE)
    else:
        raise ValueError(f"unknown evol operation '{op}' (known: {', '.join(OPS)})")
    return [{"role": "user", "content": text}]


def parse_evolved(op: str, text: str) -> str:
    """The task the model wrote: between the answer tags when present, else the whole reply.

    Only the answer tags themselves are removed; any other marker is left for the leak check.

    >>> parse_evolved("deepen", "Sure!\\n<harder_task>\\nExplain tides and their causes.\\n</harder_task>")
    'Explain tides and their causes.'
    """
    open_, close = (NEW_OPEN, NEW_CLOSE) if op == BREADTH_OP else (HARDER_OPEN, HARDER_CLOSE)
    low = text.lower()
    start = low.find(open_)
    if start >= 0:
        text, low = text[start + len(open_):], low[start + len(open_):]
    end = low.find(close)
    if end >= 0:
        text = text[:end]
    text = text.strip()
    # Models often wrap the task in quotes or a code fence; neither belongs to the task.
    text = re.sub(r"\A```\w*\n(.*)\n```\Z", r"\1", text, flags=re.S).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def leaked_marker(task: str) -> str | None:
    """The first prompt marker found in `task` (case-insensitive), or None.

    >>> leaked_marker("Rewrite the harder task below."), leaked_marker("Explain tides.")
    ('harder task', None)
    """
    low = task.lower()
    return next((m for m in MARKERS if m in low), None)


def same_request(a: str, b: str) -> list[dict]:
    """The judge request asking whether tasks `a` and `b` ask for the same thing."""
    return [{"role": "user", "content": SAME_PROMPT.format(a=a.strip(), b=b.strip())}]


_VERDICT = re.compile(r"\b(not\s+(?:the\s+)?same|not\s+equal|different|differ\w*|distinct|"
                      r"same|equal|identical|equivalent)\b", re.I)


def parse_same(text: str) -> bool | None:
    """The judge's verdict: True (same), False (different) or None when it gave none.

    The earliest verdict word wins, so "DIFFERENT, although the same topic" is False.

    >>> parse_same("SAME"), parse_same("They are not the same."), parse_same("**Different**"), parse_same("?")
    (True, False, False, None)
    """
    m = _VERDICT.search(text or "")
    if not m:
        return None
    word = m.group(1).lower()
    return word in ("same", "equal", "identical", "equivalent")

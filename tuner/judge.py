"""Pairwise judging: which of two answers to the same instruction is better, by an LLM judge.

The two answers are shown as A and B in an order drawn from a seeded RNG, so a judge that prefers
whatever comes first (small judges do) adds noise, not bias. Verdicts are parsed leniently
(`parse_verdict`); a reply that names no winner counts as a parse failure and is left out of
the win-rate. Identical answers are a tie without asking. Ties count half.
"""
from __future__ import annotations

import random
import re
from typing import Sequence

JUDGE_PROMPT = """You are judging two answers to the same instruction.

Instruction:
{instruction}

Answer A:
{a}

Answer B:
{b}

Which answer follows the instruction better? Prefer the answer that is correct, complete and
to the point; length alone is not a merit, and the order of the answers means nothing.
Reply with a single line: "Verdict: A", "Verdict: B" or "Verdict: tie"."""

_CHOICE = r"(?:answer|response|assistant|option)?\s*\(?\[*\s*(a\s+tie|a\s+draw|a|b|tie|draw|equal|neither|both)\b"
# "Verdict: A or B" names no winner.
_VERDICT = re.compile(r"\b(?:verdict|winner)\s*(?:is)?\s*[:=\-]?\s*" + _CHOICE + r"(?!\s*(?:or|and|/|,)\s*\(?[ab]\b)", re.I)
_BRACKET = re.compile(r"\[\[\s*(a|b|tie)\s*\]\]", re.I)
_BARE = re.compile(r"^\W*(?:answer|response|option)?\s*\(?\s*(a|b|tie|draw)\s*\)?\W*$", re.I)
_PRAISE = r"\s+(?:is|was)\s+(?:clearly\s+|much\s+|slightly\s+)?(?:better|superior|stronger|more\s+\w+|preferred|preferable)"
_BETTER = re.compile(r"\b(?:answer|response|assistant|option)\s+(a|b)\b" + _PRAISE, re.I)
# A bare letter only when upper case: "a is better" is more likely English than a verdict.
_BETTER_BARE = re.compile(r"\b([AB])" + _PRAISE)
_TIE = re.compile(r"\b(?:it'?s a tie|a tie|equally (?:good|bad|helpful|correct|strong|weak)|"
                  r"(?:both|the two) (?:answers|responses) are (?:equally|equivalent|identical|the same))", re.I)
_TIES = {"tie", "draw", "equal", "neither", "both", "a tie", "a draw"}


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from a judge's reply; None when it names no single winner.

    >>> parse_verdict("**Verdict:** B"), parse_verdict("[[A]]"), parse_verdict("Both are equally good.")
    ('B', 'A', 'tie')
    """
    if not text:
        return None
    t = re.sub(r"[*`\"']", "", text).strip()      # markdown and JSON quoting: {"verdict": "A"}
    found = _VERDICT.findall(t)
    if found:   # the last explicit verdict wins: judges sometimes reason, then revise
        v = re.sub(r"\s+", " ", found[-1].lower())
        return "tie" if v in _TIES else v.upper()
    brackets = {b.lower() for b in _BRACKET.findall(t)}
    if len(brackets) == 1:
        v = brackets.pop()
        return "tie" if v == "tie" else v.upper()
    bare = _BARE.match(t)
    if bare:
        v = bare.group(1).lower()
        return "tie" if v in _TIES else v.upper()
    better = {b.upper() for b in _BETTER.findall(t) + _BETTER_BARE.findall(t)}
    if len(better) == 1:
        return better.pop()
    if _TIE.search(t):
        return "tie"
    return None


def judge_pairs(judge, instructions: Sequence[str], new: Sequence[str], old: Sequence[str], *,
                seed: int = 0, params: dict | None = None) -> dict:
    """Win-rate of `new` answers over `old` ones under `judge` (an LLM from our seam).

    >>> judge_pairs(llm, ["Add 2 and 3."], ["5"], ["6"])["win_rate"]     # doctest: +SKIP
    1.0
    """
    if not (len(instructions) == len(new) == len(old)):
        raise ValueError("instructions, new and old answers must have the same length")
    rng = random.Random(seed)
    new_is_a = [rng.random() < 0.5 for _ in instructions]
    ask, outcomes = [], [None] * len(instructions)
    for i, (ins, n, o) in enumerate(zip(instructions, new, old)):
        if n.strip() == o.strip():
            outcomes[i] = "tie"
            continue
        a, b = (n, o) if new_is_a[i] else (o, n)
        ask.append((i, [{"role": "user", "content": JUDGE_PROMPT.format(instruction=ins, a=a, b=b)}]))
    replies = judge.generate([r for _, r in ask], params or {"temperature": 0, "max_tokens": 64}) if ask else []
    failures = errors = 0
    for (i, _), reply in zip(ask, replies):
        verdict = parse_verdict(reply.text) if reply.ok else None
        errors += not reply.ok
        if verdict is None:
            failures += reply.ok
            continue
        outcomes[i] = "tie" if verdict == "tie" else ("new" if (verdict == "A") == new_is_a[i] else "old")
    wins, losses, ties = outcomes.count("new"), outcomes.count("old"), outcomes.count("tie")
    decided = wins + losses + ties
    return {"win_rate": (wins + 0.5 * ties) / decided if decided else None,
            "wins": wins, "losses": losses, "ties": ties, "parse_failures": failures,
            "judge_errors": errors, "identical": len(instructions) - len(ask), "n": len(instructions),
            "new_shown_first": sum(new_is_a)}

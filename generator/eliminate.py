"""Elimination of failed evolutions (Evol-Instruct's filter), one drop reason per failure.

Checks on the evolved task, cheapest first (`task_reason`):

- ``empty_instruction``: nothing left after parsing the model's reply
- ``prompt_leak``: the task copies words of our rewriting prompts (`evol_prompts.MARKERS`)
- ``no_information_gain``: normalised text equal to the parent's, or token-set Jaccard above
  `jaccard`; the survivors of all cheap checks then go to an LLM "same or different" judge
  (evol.py), whose SAME verdict drops them for the same reason
- ``no_growth`` / ``overgrown``: its length (characters) vs the parent's is at most
  `min_growth` (in-depth operations only: a breadth task need not be longer) or above `max_growth`

Checks on the answer to the evolved task (`answer_reason`): ``refusal`` (short and apologetic
or declining), ``stopwords_only`` (nothing but punctuation and stop words), ``empty_response``.
"""
from __future__ import annotations

import re

from synthloop.generator.evol_prompts import BREADTH_OP, leaked_marker
from synthloop.core.schema import normalize

#: A small English stop-word list of our own: function words that carry no task content.
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves yes ok okay oh well also let lets s t d ll m re ve
""".split())

#: Openings and phrases of answers that decline the task. Matched only in short answers.
REFUSAL_PHRASES = ("sorry", "i apologize", "i apologise", "my apologies", "i cannot", "i can't",
                   "i can not", "i am unable", "i'm unable", "i am not able", "i'm not able",
                   "i won't be able", "as an ai", "as a language model", "i do not have the ability",
                   "i don't have the ability", "unable to comply", "cannot fulfill", "can't help with")

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> set[str]:
    """Lower-case word tokens of `text` (apostrophes split words: "can't" -> can, t)."""
    return set(_TOKEN.findall(normalize(text)))


def jaccard(a: str, b: str) -> float:
    """Token-set Jaccard similarity.

    >>> jaccard("Name a red fruit.", "Name a red fruit please.")
    0.8
    """
    ta, tb = tokens(a), tokens(b)
    if not ta and not tb:
        return 1.0
    return len(ta & tb) / len(ta | tb)


def near_identical(parent: str, child: str, threshold: float = 0.9) -> bool:
    """The cheap no-information-gain check: same normalised text, or Jaccard above `threshold`."""
    return normalize(parent) == normalize(child) or jaccard(parent, child) > threshold


def growth_reason(parent: str, child: str, op: str, *, min_growth: float = 1.0,
                  max_growth: float = 6.0) -> str | None:
    """``no_growth`` when an in-depth child is not longer than `min_growth` x the parent,
    ``overgrown`` when any child is longer than `max_growth` x the parent.

    >>> growth_reason("Explain tides.", "Explain tides.", "deepen"), growth_reason("Hi.", "x" * 50, "breadth")
    ('no_growth', 'overgrown')
    """
    ratio = len(child.strip()) / max(1, len(parent.strip()))
    if ratio > max_growth:
        return "overgrown"
    if op != BREADTH_OP and ratio <= min_growth:
        return "no_growth"
    return None


def task_reason(parent: str, child: str, op: str, *, min_growth: float = 1.0, max_growth: float = 6.0,
                jaccard_threshold: float = 0.9) -> str | None:
    """The first cheap reason to drop an evolved task, or None (then ask the judge).

    >>> task_reason("Name a fruit.", "Name a fruit. #harder_task#", "deepen")
    'prompt_leak'
    """
    if not child.strip():
        return "empty_instruction"
    if leaked_marker(child):
        return "prompt_leak"
    if near_identical(parent, child, jaccard_threshold):
        return "no_information_gain"
    return growth_reason(parent, child, op, min_growth=min_growth, max_growth=max_growth)


def is_refusal(answer: str, *, max_words: int = 80) -> bool:
    """A short answer that apologises or declines.

    >>> is_refusal("I'm sorry, but I cannot help with that."), is_refusal("Sorry means regret. " * 30)
    (True, False)
    """
    if len(answer.split()) >= max_words:
        return False
    low = normalize(answer).replace("\u2019", "'")
    return any(p in low for p in REFUSAL_PHRASES)


def stopwords_only(answer: str) -> bool:
    """True when the answer has no word outside the stop-word list (punctuation only counts too).

    >>> stopwords_only("It is what it is..."), stopwords_only("Paris.")
    (True, False)
    """
    return tokens(answer) <= STOPWORDS


def answer_reason(answer: str, *, refusal_max_words: int = 80) -> str | None:
    """The reason to drop an evolved task because of its answer, or None.

    >>> answer_reason("  "), answer_reason("Sorry, I can't."), answer_reason("?!"), answer_reason("42 apples.")
    ('empty_response', 'refusal', 'stopwords_only', None)
    """
    if not answer.strip():
        return "empty_response"
    if is_refusal(answer, max_words=refusal_max_words):
        return "refusal"
    if stopwords_only(answer):
        return "stopwords_only"
    return None

"""Verifiable constraints on instructions: a catalogue, conflict-free drawing, phrasing, and a stage.

Each row gets 1-3 compatible constraints with IFEval's checker ids (filters/checks.py verifies
them later, e.g. in ``rejection_sampling``), written into the instruction in our own words
(generator/constraint_phrasings.py). Parts:

- `CATALOGUE`: per id, a kwargs sampler with values a small model can meet (e.g. fewer than
  40-120 words, 2-4 bullets, 2-3 paragraphs; keywords taken from the instruction's own content
  words when it has any) and a default weight.
- `draw_constraints`: a conflict-free set. Conflicts are IFEval's table closed under symmetry
  (`CONFLICTS`), our `PAIR_RULES` (pairs of (id, kwargs) that contradict or leave no room) and
  the set rules `forced_text_conflict` (a limit such as forbidden words must accept the text the
  other constraints force into every answer) and `room_conflict` (word and sentence budgets).
  `INSTRUCTION_RULES` keep ids off instructions they would clash with (code, translation, tasks
  that already fix a length). `conflict_reason` names the first rule a set breaks.
- `phrase`: the instruction with one sentence per constraint appended, order and joiner by rng.
- The stage ``constraints``: each incoming row without constraints becomes `copies` constrained
  variants (new id and instruction, ``response = ""``, ``scores`` cleared, ``parent_id`` = the
  original row, ``round`` = the run's round, ``method`` kept); with ``keep_original`` the row itself
  passes too. Rows that already carry constraints (reseeded with them), and rows already rejected,
  pass through unchanged. A row for which no k_min constraints fit (a narrow `include` on a task
  the instruction rules keep them off) is dropped as ``no_compatible_constraints``. Draws are keyed
  by (run seed, round, row id, copy, ``seed_offset``), never by arrival order.

Example::

    [[stages]]
    type = "constraints"
    k_max = 2
    copies = 2
    weights = { "detectable_format:json_format" = 0, "punctuation:no_comma" = 3 }
    custom = [{ id = "my:exclaim", check = "mypkg.checks:has_exclamation",
                phrasings = ["Use at least one exclamation mark."] }]
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import polars as pl

from synthloop.filters import checks
from synthloop.core.config import ConfigError
from synthloop.generator.constraint_phrasings import AT_LEAST, LESS, PHRASINGS
from synthloop.core.registry import register
from synthloop.core.schema import make_batch, record_id
from synthloop.core.stages import per_batch

# ---------------------------------------------------------------------------------------------
# Word lists (ours). Keywords prefer the instruction's own content words; these are fallbacks.

#: Words never taken from an instruction as a keyword: function words and task verbs/nouns.
STOPWORDS = frozenset("""
about above after again against also among another answer answers anything around asked asking
based because been before being below between both brief briefly could create describe
description detail details different does doing down during each either else enough every
example examples explain find first following from generate give given good have having here
how however identify input into itself just know least less like list make many more most much
must need next note only other output over paragraph paragraphs please point points provide
question questions rather really response sentence sentences should show since some something
such suggest summarize summarise tell than that their them then there these they thing things
this those through under until upon using very what when where whether which while will with
within without word words would write your yours also okay sure text task short long
""".split())

#: Fallback keywords that fit almost any answer.
GENERIC_KEYWORDS = ("example", "reason", "simple", "result", "detail", "practical", "benefit",
                    "approach", "summary", "common", "clear", "useful", "context", "option",
                    "future", "process", "balance", "choice")

#: Words a forbidden-words constraint bans: fillers small models lean on.
FILLER_WORDS = ("very", "really", "basically", "actually", "important", "however", "overall",
                "great", "thing", "things", "various", "crucial", "essential", "simply",
                "definitely", "significant", "just", "also")

#: End phrases for startend:end_checker (no commas: they must survive punctuation:no_comma).
END_PHRASES = ("Is there anything else you would like to know?", "I hope this helps.",
               "Let me know if you have more questions.", "That is all for now.",
               "Thanks for reading.", "Those are my thoughts on the matter.",
               "Feel free to ask a follow-up question.", "Good luck with it.")

COMMON_LETTERS = "eatoinsrl"   # "at least" targets: easy to meet in any English answer
RARE_LETTERS = "zqxjkv"        # "fewer than" targets: avoidable without contortions

_WORD_RE = re.compile(r"[A-Za-z]+")


def topic_words(instruction: str) -> list[str]:
    """Content words of an instruction, lower case, first occurrence order.

    >>> topic_words("Write a short poem about the autumn forest and its colours.")
    ['poem', 'autumn', 'forest', 'colours']
    """
    out: list[str] = []
    for w in _WORD_RE.findall(instruction):
        w = w.lower()
        if 4 <= len(w) <= 14 and w not in STOPWORDS and w not in out:
            out.append(w)
    return out


def _pick(rng: np.random.Generator, seq: Sequence) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


# ---------------------------------------------------------------------------------------------
# Samplers: numpy Generator + the instruction -> kwargs (exactly the checker's keys).

def _keywords(rng, instruction, n):
    words = topic_words(instruction)
    pool = words if words and rng.random() < 0.8 else list(GENERIC_KEYWORDS)
    n = min(n, len(pool))
    idx = rng.choice(len(pool), size=n, replace=False)
    return sorted(pool[int(i)] for i in idx)


def _relation(rng, p_at_least=0.5):
    return AT_LEAST if rng.random() < p_at_least else LESS


def _s_existence(rng, ins):
    return {"keywords": _keywords(rng, ins, _randint(rng, 1, 2))}


def _s_frequency(rng, ins):
    rel = _relation(rng, 0.75)
    freq = _randint(rng, 2, 4) if rel == AT_LEAST else _randint(rng, 2, 3)
    return {"keyword": _keywords(rng, ins, 1)[0], "frequency": freq, "relation": rel}


def _s_forbidden(rng, ins):
    words = topic_words(ins)
    n = _randint(rng, 1, 2)
    chosen = [str(_pick(rng, words))] if words and rng.random() < 0.3 else []
    while len(chosen) < n:
        w = str(_pick(rng, FILLER_WORDS))
        if w not in chosen:
            chosen.append(w)
    return {"forbidden_words": sorted(chosen)}


def _s_letter(rng, ins):
    if rng.random() < 0.5:
        return {"letter": str(_pick(rng, COMMON_LETTERS)), "let_frequency": _randint(rng, 3, 12),
                "let_relation": AT_LEAST}
    return {"letter": str(_pick(rng, RARE_LETTERS)), "let_frequency": _randint(rng, 2, 5),
            "let_relation": LESS}


def _s_sentences(rng, ins):
    rel = _relation(rng)
    return {"num_sentences": _randint(rng, 2, 5) if rel == AT_LEAST else _randint(rng, 3, 6),
            "relation": rel}


def _s_paragraphs(rng, ins):
    return {"num_paragraphs": _randint(rng, 2, 3)}


def _s_words(rng, ins):
    rel = _relation(rng)
    return {"num_words": _randint(rng, 30, 80) if rel == AT_LEAST else _randint(rng, 40, 120),
            "relation": rel}


def _s_placeholders(rng, ins):
    return {"num_placeholders": _randint(rng, 1, 3)}


def _s_postscript(rng, ins):
    return {"postscript_marker": str(_pick(rng, ("P.S.", "P.P.S")))}


def _s_bullets(rng, ins):
    return {"num_bullets": _randint(rng, 2, 4)}


def _s_highlights(rng, ins):
    return {"num_highlights": _randint(rng, 1, 3)}


def _s_sections(rng, ins):
    return {"section_spliter": str(_pick(rng, ("Section", "SECTION"))), "num_sections": _randint(rng, 2, 3)}


def _s_none(rng, ins):
    return {}


def _s_repeat(rng, ins):
    return {"prompt_to_repeat": ins.strip()}


def _s_end(rng, ins):
    return {"end_phrase": str(_pick(rng, END_PHRASES))}


def _s_capital_words(rng, ins):
    rel = _relation(rng)
    return {"capital_frequency": _randint(rng, 2, 5) if rel == AT_LEAST else _randint(rng, 3, 6),
            "capital_relation": rel}


@dataclass(frozen=True)
class Spec:
    """One drawable constraint: its id, kwargs sampler, phrasings and default weight."""

    id: str
    sample: Callable[[np.random.Generator, str], dict]
    phrasings: Any                       # list of templates, or {variant: list}
    weight: float = 1.0


def _spec(cid: str, sample, weight: float = 1.0) -> Spec:
    return Spec(cid, sample, PHRASINGS[cid], weight)


#: The built-in constraints. Weights below 1 for the ones that turn an answer into an odd text
#: (all caps, a JSON document, a copied prompt); configs override any weight.
CATALOGUE: dict[str, Spec] = {s.id: s for s in [
    _spec("keywords:existence", _s_existence),
    _spec("keywords:frequency", _s_frequency),
    _spec("keywords:forbidden_words", _s_forbidden),
    _spec("keywords:letter_frequency", _s_letter),
    _spec("length_constraints:number_sentences", _s_sentences),
    _spec("length_constraints:number_paragraphs", _s_paragraphs),
    _spec("length_constraints:number_words", _s_words),
    _spec("detectable_content:number_placeholders", _s_placeholders),
    _spec("detectable_content:postscript", _s_postscript),
    _spec("detectable_format:number_bullet_lists", _s_bullets),
    _spec("detectable_format:number_highlighted_sections", _s_highlights),
    _spec("detectable_format:multiple_sections", _s_sections),
    _spec("detectable_format:json_format", _s_none, 0.5),
    _spec("detectable_format:title", _s_none),
    _spec("combination:repeat_prompt", _s_repeat, 0.5),
    _spec("startend:end_checker", _s_end),
    _spec("startend:quotation", _s_none),
    _spec("change_case:english_lowercase", _s_none),
    _spec("change_case:english_capital", _s_none, 0.5),
    _spec("change_case:capital_word_frequency", _s_capital_words),
    _spec("punctuation:no_comma", _s_none),
]}


def custom_spec(cid: str, kwargs: Mapping | None, phrasings: Sequence[str], weight: float = 1.0) -> Spec:
    """A drawable user check with fixed kwargs (register its function with `checks.register_check`).

    >>> custom_spec("my:x", {"n": 2}, ["Use {n} exclamation marks."]).sample(None, "")
    {'n': 2}
    """
    fixed = dict(kwargs or {})
    return Spec(cid, lambda rng, ins: dict(fixed), list(phrasings), weight)


# ---------------------------------------------------------------------------------------------
# Conflicts

@functools.cache
def _conflict_table() -> dict[str, frozenset[str]]:
    # IFEval's INSTRUCTION_CONFLICTS is not symmetric as shipped (quotation lists title, title does
    # not list quotation; repeat_prompt lists nearly every id, few list it back): its own
    # `conflict_make` would close it, but nothing applies that on import. Close it here, without
    # touching the package's table.
    ids = set(checks.known_ids()) | set(CATALOGUE)
    table: dict[str, set[str]] = {i: set() for i in ids}
    for a in ids:
        for b in checks.conflicts(a):
            table.setdefault(a, set()).add(b)
            table.setdefault(b, set()).add(a)
    return {k: frozenset(v) for k, v in table.items()}


def id_conflicts(cid: str) -> frozenset[str]:
    """Ids that may never share a row with `cid`: IFEval's table, symmetric, and `cid` itself.

    >>> "detectable_format:title" in id_conflicts("startend:quotation") and \\
    ...     "startend:quotation" in id_conflicts("detectable_format:title")
    True
    """
    return _conflict_table().get(cid, frozenset()) | {cid}


def _rel(kw: Mapping, key: str = "relation") -> str:
    return kw.get(key, "")


def _count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))       # IFEval's count_words: runs of \w


@dataclass(frozen=True)
class PairRule:
    """Constraints `a` and `b` (ids) contradict when ``when(kwargs_a, kwargs_b)`` holds."""

    a: str
    b: str
    when: Callable[[Mapping, Mapping], bool]
    why: str


#: Contradictions IFEval's table misses for the values we draw; checked in both orders.
PAIR_RULES: tuple[PairRule, ...] = (
    PairRule("change_case:english_lowercase", "detectable_format:multiple_sections",
             lambda a, b: True,
             "the section checker matches 'Section'/'SECTION' case-sensitively, and both have capitals"),
    PairRule("change_case:english_capital", "detectable_format:multiple_sections",
             lambda a, b: b["section_spliter"] != b["section_spliter"].upper(),
             "'Section 1' headings are not all caps; only the 'SECTION' splitter fits"),
    PairRule("length_constraints:number_words", "length_constraints:number_sentences",
             lambda a, b: _rel(a) == AT_LEAST and _rel(b) == LESS
             and a["num_words"] > MAX_SENTENCE_WORDS * (b["num_sentences"] - 1),
             "N words in fewer than S sentences needs more than 25 words a sentence: run-on prose"),
)
MAX_SENTENCE_WORDS = 25   # longer sentences are run-on prose; the room rule budgets with this too


#: What each constraint forces into every passing answer (the least text that satisfies it).
#: A limit (forbidden words, no commas, "fewer than" counts) must accept all of it together.
FORCED_TEXT: dict[str, Callable[[Mapping], str]] = {
    "keywords:existence": lambda k: " ".join(k["keywords"]),
    "keywords:frequency": lambda k: " ".join([k["keyword"]] * k["frequency"]) if _rel(k) == AT_LEAST else "",
    "startend:end_checker": lambda k: k["end_phrase"],
    "detectable_content:postscript": lambda k: k["postscript_marker"],
    "detectable_format:multiple_sections":
        lambda k: " ".join(f"{k['section_spliter']} {i}" for i in range(1, k["num_sections"] + 1)),
    "combination:repeat_prompt": lambda k: k["prompt_to_repeat"],
}

#: Constraints that cap what an answer may contain, with the kwargs for which they do.
LIMITS: dict[str, Callable[[Mapping], bool]] = {
    "keywords:forbidden_words": lambda k: True,
    "punctuation:no_comma": lambda k: True,
    "keywords:frequency": lambda k: _rel(k) == LESS,
    "keywords:letter_frequency": lambda k: _rel(k, "let_relation") == LESS,
    "change_case:capital_word_frequency": lambda k: _rel(k, "capital_relation") == LESS,
}

#: Minimum (words, sentences) each constraint takes up in an answer, for the room rule, and
#: whether its sentences come on top of the answer's own (a postscript, an end phrase, a copied
#: prompt) or can be the answer itself (paragraphs, bullets, sections).
ROOM: dict[str, Callable[[Mapping], tuple[int, int, bool]]] = {
    "length_constraints:number_paragraphs": lambda k: (20 * k["num_paragraphs"], k["num_paragraphs"], False),
    "detectable_format:number_bullet_lists": lambda k: (6 * k["num_bullets"], k["num_bullets"], False),
    "detectable_format:multiple_sections": lambda k: (15 * k["num_sections"], k["num_sections"], False),
    "length_constraints:number_sentences":
        lambda k: (8 * k["num_sentences"], k["num_sentences"], False) if _rel(k) == AT_LEAST else (0, 0, False),
    "combination:repeat_prompt":
        lambda k: (_count_words(k["prompt_to_repeat"]) + 10, _count_sentences(k["prompt_to_repeat"]), True),
    # punkt (offline, untrained) splits "P.S." off as a sentence of its own: "P.S. Bring water." is two
    "detectable_content:postscript": lambda k: (4, 2, True),
    "startend:end_checker": lambda k: (_count_words(k["end_phrase"]), 1, True),
    "keywords:frequency": lambda k: (k["frequency"], 0, False) if _rel(k) == AT_LEAST else (0, 0, False),
    "keywords:existence": lambda k: (len(k["keywords"]), 0, False),
    "detectable_format:number_highlighted_sections": lambda k: (2 * k["num_highlights"], 0, False),
    "detectable_content:number_placeholders": lambda k: (k["num_placeholders"], 0, False),
    "detectable_format:title": lambda k: (3, 0, False),
}
BASE_ROOM = (10, 1)    # the answer itself: at least ten words and one sentence


def _count_sentences(text: str) -> int:
    from if_verifiable.ifeval import instructions_util as util

    checks.sentence_splitter()           # installs the offline tokenizer when punkt data is missing
    return util.count_sentences(text)


def _kw(c: Mapping) -> dict:
    return checks.parse_kwargs(c.get("kwargs"))


def pair_conflict(a: Mapping, b: Mapping) -> str | None:
    """Why constraints `a` and `b` ({id, kwargs}) cannot share a row, or None.

    >>> pair_conflict({"id": "detectable_format:title", "kwargs": {}}, {"id": "startend:quotation", "kwargs": {}})
    'IFEval conflict table'
    """
    if b["id"] in id_conflicts(a["id"]):
        return "IFEval conflict table" if a["id"] != b["id"] else "same id twice"
    ka, kb = _kw(a), _kw(b)
    for r in PAIR_RULES:
        if (r.a, r.b) == (a["id"], b["id"]) and r.when(ka, kb) or (r.a, r.b) == (b["id"], a["id"]) and r.when(kb, ka):
            return r.why
    return None


def forced_text_conflict(constraints: Sequence[Mapping]) -> str | None:
    """A limit that rejects the text the other constraints force into every answer, or None.

    >>> forced_text_conflict([{"id": "keywords:forbidden_words", "kwargs": {"forbidden_words": ["section"]}},
    ...     {"id": "detectable_format:multiple_sections", "kwargs": {"section_spliter": "Section", "num_sections": 2}}])
    "keywords:forbidden_words rejects the text the others force: 'Section 1 Section 2'"
    """
    for i, c in enumerate(constraints):
        kc = _kw(c)
        if c["id"] not in LIMITS or not LIMITS[c["id"]](kc):
            continue
        forced = "\n".join(t for j, o in enumerate(constraints) if j != i and o["id"] in FORCED_TEXT
                           for t in [FORCED_TEXT[o["id"]](_kw(o))] if t)
        if forced.strip() and not checks.check_one(forced, c["id"], kc).strict:
            return f"{c['id']} rejects the text the others force: {forced[:80]!r}"
    return None


def room_conflict(constraints: Sequence[Mapping]) -> str | None:
    """A word or sentence cap smaller than what the other constraints take up, or None."""
    for i, c in enumerate(constraints):
        kc = _kw(c)
        others = [ROOM[o["id"]](_kw(o)) for j, o in enumerate(constraints) if j != i and o["id"] in ROOM]
        if c["id"] == "length_constraints:number_words" and _rel(kc) == LESS:
            need = BASE_ROOM[0] + sum(w for w, _, _ in others)
            if need >= kc["num_words"]:
                return f"fewer than {kc['num_words']} words leaves no room for the others (~{need} words)"
        if c["id"] == "length_constraints:number_sentences" and _rel(kc) == LESS:
            need = (max(BASE_ROOM[1], sum(s for _, s, extra in others if not extra))
                    + sum(s for _, s, extra in others if extra))
            if need >= kc["num_sentences"]:
                return f"fewer than {kc['num_sentences']} sentences leaves no room for the others (~{need})"
            # "at least N words" must fit in the sentences the extras (P.S., end phrase) leave over
            for o in constraints:
                ko = _kw(o)
                if o["id"] == "length_constraints:number_words" and _rel(ko) == AT_LEAST:
                    free = kc["num_sentences"] - 1 - sum(s for _, s, extra in others if extra)
                    cap = MAX_SENTENCE_WORDS * free + sum(w for w, _, extra in others if extra)
                    if ko["num_words"] > cap:
                        return (f"at least {ko['num_words']} words do not fit in fewer than "
                                f"{kc['num_sentences']} sentences next to the others (~{cap} words)")
    return None


def conflict_reason(constraints: Sequence[Mapping]) -> str | None:
    """The first rule a set of constraints ({id, kwargs}) breaks, or None when it is compatible."""
    for i, a in enumerate(constraints):
        for b in constraints[i + 1:]:
            why = pair_conflict(a, b)
            if why:
                return f"{a['id']} + {b['id']}: {why}"
    return forced_text_conflict(constraints) or room_conflict(constraints)


#: Ids kept off instructions they would clash with: (pattern on instruction + input, ids, why).
INSTRUCTION_RULES: tuple[tuple[re.Pattern, frozenset[str], str], ...] = (
    (re.compile(r"(?i)\b(code|program|function|script|sql|query|regex|python|javascript|java|html|css|"
                r"json|xml|yaml|csv|spreadsheet|formula|equation)\b"),
     frozenset({"change_case:english_lowercase", "change_case:english_capital",
                "change_case:capital_word_frequency", "punctuation:no_comma", "startend:quotation",
                "detectable_format:json_format", "length_constraints:number_paragraphs"}),
     "code and data are case- and comma-sensitive and have their own format"),
    (re.compile(r"(?i)\b(translat\w*|french|spanish|german|italian|portuguese|chinese|japanese|"
                r"korean|russian|arabic|hindi|dutch|latin)\b"),
     frozenset({"change_case:english_lowercase", "change_case:english_capital",
                "keywords:existence", "keywords:frequency"}),
     "the answer may not be English (the case checkers require English) and English keywords may not fit"),
    (re.compile(r"(?i)\b(\d+|one|two|three|four|five|six|seven|eight|nine|ten|single|a few)[- ]"
                r"(words?|sentences?|paragraphs?|lines?|bullets?|points?|items?|sections?|tips|ideas|"
                r"examples|steps|reasons|ways|questions|names|facts)\b|\b(haiku|limerick|tweet|slogan|"
                r"headline|tagline|one word)\b"),
     frozenset({"length_constraints:number_words", "length_constraints:number_sentences",
                "length_constraints:number_paragraphs", "detectable_format:number_bullet_lists",
                "detectable_format:multiple_sections"}),
     "the task already fixes a length or a number of items"),
)


def instruction_excludes(instruction: str, input: str = "") -> set[str]:
    """Ids `INSTRUCTION_RULES` keep off this task.

    >>> sorted(instruction_excludes("Write three sentences about rain."))[:2]
    ['detectable_format:multiple_sections', 'detectable_format:number_bullet_lists']
    """
    text = f"{instruction}\n{input}"
    return {cid for pat, ids, _ in INSTRUCTION_RULES if pat.search(text) for cid in ids}


# ---------------------------------------------------------------------------------------------
# Drawing and phrasing

class DrawError(ValueError):
    """No compatible set of k_min constraints exists for this instruction in the configured pool."""


def _weights(specs: Mapping[str, Spec], weights: Mapping[str, float] | None) -> dict[str, float]:
    out = {cid: float(s.weight) for cid, s in specs.items()}
    for cid, w in (weights or {}).items():
        if cid not in specs:
            raise ValueError(f"constraints: unknown constraint id '{cid}' in weights "
                             f"(drawable: {', '.join(sorted(specs))})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"constraints: weight of '{cid}' must be a number >= 0, got {w!r}")
        out[cid] = float(w)
    return out


def draw_constraints(instruction: str, rng: np.random.Generator, *, k_min: int = 1, k_max: int = 3,
                     weights: Mapping[str, float] | None = None, specs: Mapping[str, Spec] | None = None,
                     input: str = "", attempts: int = 20) -> list[dict]:
    """A compatible set of k_min..k_max constraints ``{"id", "kwargs": dict}`` for one instruction.

    `specs` is the drawable pool (default `CATALOGUE`), `weights` overrides its weights (an id
    outside the pool is a ValueError naming it). Raises `DrawError` when no k_min of the pool fit
    together on this instruction. Deterministic given `rng`.

    >>> cs = draw_constraints("Describe a rainy day in the city.", np.random.default_rng(0))
    >>> 1 <= len(cs) <= 3 and conflict_reason(cs) is None
    True
    """
    if not 1 <= k_min <= k_max:
        raise ValueError(f"constraints: need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    specs = CATALOGUE if specs is None else specs
    w = _weights(specs, weights)
    off = instruction_excludes(instruction, input)
    pool = [cid for cid in sorted(specs) if w[cid] > 0 and cid not in off]
    if not instruction.strip():
        pool = [cid for cid in pool if cid != "combination:repeat_prompt"]
    for _ in range(attempts):
        k = _randint(rng, k_min, k_max)
        chosen: list[dict] = []
        failed: set[str] = set()
        while len(chosen) < k:
            taken = {c["id"] for c in chosen}
            cands = [cid for cid in pool if cid not in failed
                     and not any(cid in id_conflicts(t) for t in taken)]
            if not cands:
                break
            p = np.array([w[c] for c in cands])
            cid = cands[int(rng.choice(len(cands), p=p / p.sum()))]
            for _try in range(4):
                new = {"id": cid, "kwargs": specs[cid].sample(rng, instruction)}
                if conflict_reason(chosen + [new]) is None:
                    chosen.append(new)
                    break
            else:
                failed.add(cid)
        if len(chosen) >= k_min:
            return chosen
    raise DrawError(f"constraints: could not draw {k_min} compatible constraints from "
                     f"{', '.join(pool) or 'an empty pool'} for {instruction[:60]!r}")


def _quote_list(words: Sequence[str], joiner: str) -> str:
    q = [f'"{w}"' for w in words]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + f" {joiner} " + q[-1]


def _view(cid: str, kwargs: Mapping) -> dict:
    """The kwargs plus the display fields templates use (see constraint_phrasings.py)."""
    v = dict(kwargs)
    for key, joiner, name in (("keywords", "and", "the_words"), ("forbidden_words", "or", "the_words_or")):
        if key in kwargs:
            words = list(kwargs[key])
            v[name] = ("the word " if len(words) == 1 else "the words ") + _quote_list(words, joiner)
    if "prompt_to_repeat" in kwargs:
        words = kwargs["prompt_to_repeat"].split()
        v["tail"] = " ".join(words[-5:])
    if "section_spliter" in kwargs:
        v["example"] = f"{kwargs['section_spliter']} 1"
    return v


def _templates(spec_phrasings: Any, kwargs: Mapping) -> list[str]:
    if isinstance(spec_phrasings, Mapping):
        variant = next((kwargs[k] for k in ("relation", "let_relation", "capital_relation") if k in kwargs), None)
        return list(spec_phrasings[variant])
    return list(spec_phrasings)


def render(constraint: Mapping, rng: np.random.Generator, specs: Mapping[str, Spec] | None = None) -> str:
    """One sentence (or two) stating `constraint`, a template chosen by `rng`."""
    specs = CATALOGUE if specs is None else specs
    cid, kwargs = constraint["id"], _kw(constraint)
    if cid not in specs:
        raise ValueError(f"constraints: no phrasing for constraint id '{cid}'")
    return _pick(rng, _templates(specs[cid].phrasings, kwargs)).format(**_view(cid, kwargs))


JOINERS = ("\n", " ")


def phrase(instruction: str, constraints: Sequence[Mapping], rng: np.random.Generator,
           *, specs: Mapping[str, Spec] | None = None) -> str:
    """`instruction` with a sentence per constraint appended, in an rng-shuffled order.

    >>> cs = [{"id": "punctuation:no_comma", "kwargs": {}}]
    >>> phrase("Name a colour.", cs, np.random.default_rng(1)).startswith("Name a colour.")
    True
    """
    base = instruction.strip()
    sentences = [render(c, rng, specs) for c in constraints]
    sentences = [sentences[int(i)] for i in rng.permutation(len(sentences))]
    lead, sep = _pick(rng, JOINERS), _pick(rng, JOINERS)
    if not re.search(r"[.!?:;\"')\]]$", base):
        lead = "\n"            # "Name a colour Do not use commas." would read as one sentence
    if not sentences or not base:
        return base or sep.join(sentences)
    return base + lead + sep.join(sentences)


# ---------------------------------------------------------------------------------------------
# The stage

_CUSTOM_KEYS = {"id", "check", "kwargs", "phrasings"}


@dataclass
class ConstraintsConfig:
    k_min: int = 1                    # constraints per variant: uniform in [k_min, k_max]
    k_max: int = 3
    weights: dict = field(default_factory=dict)   # id -> relative weight (0 = never); defaults in CATALOGUE
    include: list = field(default_factory=list)   # only these ids ([] = all)
    exclude: list = field(default_factory=list)   # never these ids
    copies: int = 1                   # constrained variants per incoming row, each its own draw
    keep_original: bool = False       # also pass the unconstrained row through
    custom: list = field(default_factory=list)    # [{id, check = "module:function", kwargs = {}, phrasings = [...]}]
    seed_offset: int = 0              # shifts every draw (a second, different pass over the same rows)

    def __post_init__(self):
        if isinstance(self.k_min, bool) or isinstance(self.k_max, bool) or not 1 <= self.k_min <= self.k_max:
            raise ConfigError(f"[constraints] need 1 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")
        if self.copies < 1:
            raise ConfigError(f"[constraints] copies must be >= 1, got {self.copies}")
        custom_ids = []
        for i, c in enumerate(self.custom):
            if not isinstance(c, dict):
                raise ConfigError(f"[constraints] custom[{i}] must be a table {{id, check, kwargs, phrasings}}")
            extra = set(c) - _CUSTOM_KEYS
            if extra or "id" not in c or "check" not in c or not c.get("phrasings"):
                raise ConfigError(f"[constraints] custom[{i}] needs id, check and phrasings"
                                  + (f"; unknown keys {sorted(extra)}" if extra else ""))
            cid = c["id"]
            if not isinstance(cid, str) or not cid.strip():
                raise ConfigError(f"[constraints] custom[{i}]: id must be a non-empty string, got {cid!r}")
            if cid in CATALOGUE or cid in custom_ids:
                raise ConfigError(f"[constraints] custom id '{cid}' is already taken")
            if not isinstance(c["check"], str) or ":" not in c["check"]:
                raise ConfigError(f"[constraints] custom '{cid}': check must be 'module.path:function'")
            kwargs = c.get("kwargs", {})
            if not isinstance(kwargs, dict) or not isinstance(c["phrasings"], list):
                raise ConfigError(f"[constraints] custom '{cid}': kwargs must be a table, phrasings a list")
            for p in c["phrasings"]:
                try:
                    str(p).format(**kwargs)
                except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
                    raise ConfigError(f"[constraints] custom '{cid}': phrasing {p!r} does not format "
                                      f"with its kwargs ({e!r})") from None
            custom_ids.append(cid)
        known = set(CATALOGUE) | set(custom_ids)
        for key in ("weights", "include", "exclude"):
            for cid in getattr(self, key):
                if cid not in known:
                    raise ConfigError(f"[constraints] {key}: unknown constraint id '{cid}' "
                                      f"(drawable: {', '.join(sorted(known))})")
        for cid, w in self.weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ConfigError(f"[constraints] weights: '{cid}' must be a number >= 0, got {w!r}")
        pool = [cid for cid in known if (not self.include or cid in self.include)
                and cid not in self.exclude and self.weights.get(cid, 1) > 0]
        if len(pool) < self.k_min:
            raise ConfigError(f"[constraints] k_min={self.k_min} but only {len(pool)} constraint ids are "
                              f"drawable ({', '.join(sorted(pool)) or 'none'})")


def _id_int(row_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "big")


def row_rng(seed: int, round: int, row_id: str, copy: int, offset: int = 0) -> np.random.Generator:
    """The RNG of one constrained variant, keyed by the row and never by arrival order.

    >>> int(row_rng(0, 0, "abc", 0).integers(100)) == int(row_rng(0, 0, "abc", 0).integers(100))
    True
    """
    mask = 2**64 - 1
    return np.random.default_rng([seed & mask, round & mask, _id_int(row_id), copy, offset & mask])


class ConstraintsStage:
    """The constraints stage (one batch out per batch in); state counts the ids drawn."""

    def __init__(self, cfg: ConstraintsConfig, *, seed: int = 0, round: int = 0):
        self.cfg, self.seed, self.round = cfg, seed, round
        specs: dict[str, Spec] = dict(CATALOGUE)
        for c in cfg.custom:
            checks.register_check(c["id"], c["check"])
            specs[c["id"]] = custom_spec(c["id"], c.get("kwargs"), c["phrasings"])
        self.specs = {cid: s for cid, s in specs.items()
                      if (not cfg.include or cid in cfg.include) and cid not in cfg.exclude}
        self.weights = {cid: w for cid, w in cfg.weights.items() if cid in self.specs}
        self.name = "constraints"
        self.counts: Counter = Counter()
        self.rows = 0

    def state(self) -> dict:
        return {"rows": self.rows, "drawn": dict(sorted(self.counts.items()))}

    def restore(self, state: dict, committed) -> None:
        self.rows = state.get("rows", 0)
        self.counts = Counter(state.get("drawn", {}))

    def variant(self, row: Mapping, copy: int) -> dict:
        """One constrained variant of `row` (a record dict)."""
        rng = row_rng(self.seed, self.round, row["id"], copy, self.cfg.seed_offset)
        drawn = draw_constraints(row["instruction"], rng, k_min=self.cfg.k_min, k_max=self.cfg.k_max,
                                 weights=self.weights, specs=self.specs, input=row["input"] or "")
        for c in drawn:
            checks.validate(c["id"], c["kwargs"])      # a bad draw is our bug: fail loudly
        text = phrase(row["instruction"], drawn, rng, specs=self.specs)
        return {**row, "id": record_id(text, row["input"] or ""), "instruction": text, "response": "",
                "messages": None, "parent_id": row["id"], "round": self.round, "scores": None,
                "constraints": [{"id": c["id"], "kwargs": json.dumps(c["kwargs"], sort_keys=True)}
                                for c in drawn]}

    def apply(self, batch: pl.DataFrame) -> pl.DataFrame:
        """Each unconstrained live row replaced by `copies` constrained variants (plus itself
        with ``keep_original``); constrained or rejected rows unchanged."""
        if batch.is_empty():
            return batch
        out: list[dict] = []
        for row in batch.to_dicts():
            if row["drop_reason"] is not None or row["constraints"] or not row["instruction"].strip():
                out.append(row)
                continue
            self.rows += 1
            try:
                variants = [self.variant(row, i) for i in range(self.cfg.copies)]
            except DrawError:       # e.g. `include` names only ids this task's rules keep off it
                out.append({**row, "drop_reason": "no_compatible_constraints"})
                continue
            self.counts.update(c["id"] for v in variants for c in v["constraints"])
            if self.cfg.keep_original:
                out.append(row)
            out += variants
        return make_batch(out)


@register("stage", "constraints", ConstraintsConfig)
def build(cfg: ConstraintsConfig, ctx) -> object:
    stage = ConstraintsStage(cfg, seed=ctx.seed, round=ctx.round)
    return per_batch("constraints", stage.apply, stage)

"""Shared parts of the scorers: writing into the `scores` struct, parsing judge outputs, and
asking a judge LLM for k ratings per request.

The scorers themselves live next to this file: `judge.py` (rubric judge), `deita.py`
(complexity/quality with the judge), `ifd.py` (instruction-following difficulty with the student
model), `reward.py` (any local sequence-classification reward model).

Scales: `judge`, `quality` and `complexity` are written normalised to [0, 1] (higher is better /
more complex); `ifd` is a loss ratio (about 0-1.5, lower means the instruction helps more);
`reward` is the reward model's raw output.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Sequence

import polars as pl

from synthloop.core.schema import SCORES

SCORE_FIELDS = tuple(f.name for f in SCORES.fields)


def set_scores(batch: pl.DataFrame, **values: Sequence[float | None] | pl.Series) -> pl.DataFrame:
    """Write score fields row-aligned with `batch`; a null value keeps whatever the row had.

    >>> from synthloop.core.schema import make_batch
    >>> b = set_scores(make_batch([{"instruction": "Hi"}]), judge=[0.7])
    >>> b["scores"].struct.field("judge").to_list()
    [0.7]
    """
    unknown = set(values) - set(SCORE_FIELDS)
    if unknown:
        raise KeyError(f"unknown score fields {sorted(unknown)} (known: {', '.join(SCORE_FIELDS)})")
    old = pl.col("scores")
    fields = []
    for f in SCORE_FIELDS:
        cur = old.struct.field(f)
        if f in values:
            new = pl.Series(f"__{f}", values[f], dtype=SCORES.to_schema()[f])
            if new.len() != batch.height:
                raise ValueError(f"{f}: {new.len()} values for {batch.height} rows")
            # NaN from a degenerate loss is not a score: store it as null.
            cur = pl.coalesce(pl.lit(new).fill_nan(None) if new.dtype.is_float() else pl.lit(new), cur)
        fields.append(cur.alias(f))
    merged = pl.struct(fields)
    # Keep "never scored" as a null struct rather than a struct of nulls.
    any_set = pl.any_horizontal([f.is_not_null() for f in fields])
    return batch.with_columns(pl.when(any_set).then(merged).otherwise(None).cast(SCORES).alias("scores"))


def to_score(batch: pl.DataFrame) -> pl.Series:
    """Rows a response scorer should look at: not rejected yet and with a non-empty response."""
    return batch.select(pl.col("drop_reason").is_null()
                        & (pl.col("response").fill_null("").str.strip_chars() != "")).to_series()


def spread(mask: pl.Series, values: Sequence[float | None]) -> list[float | None]:
    """Put values computed for the rows where `mask` is true back in full-batch positions.

    >>> spread(pl.Series([True, False, True]), [1.0, 2.0])
    [1.0, None, 2.0]
    """
    it = iter(values)
    return [next(it) if m else None for m in mask]


def user_text(instruction: str, input: str) -> str:
    return instruction if not input else f"{instruction}\n\n{input}"


# ---------------------------------------------------------------- parsing judge outputs

_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
          "eight": 8, "nine": 9, "ten": 10}
# A number is all of "7", "7.5"; never a piece of "7.5.3", "1e999" or "123" (no backtracking into it).
_NUM = r"(\d+(?:\.\d+)?)(?!\.?\d|[eE][-+]?\d)"
_DEN = r"(?:\s*(?:/|out of)\s*(\d+(?:\.\d+)?)(?!\.?\d)|\s*(%))?"
# A scale description ("1-10", "1 to 10", "0–5") is never the score itself.
_SCALE = re.compile(r"\(?\b[01]\s*(?:-|–|—|to)\s*(?:5|6|10|100)\b\)?")
_EXPLICIT = re.compile(r"\b(?:(overall|final|total)\s+)?(?:score|rating|grade|verdict|result)s?"
                       r"\s*(?:is|:|=|-|–)\s*(?:an?\s+)?" + _NUM + _DEN, re.I)
_LOOSE = re.compile(r"\b(?:(overall|final|total)\b[^\d\n]{0,12}|(?:score|rat(?:e|ed|ing)|grade|"
                    r"give|gave|assign|award)\w*\b[^\d\n]{0,25}?)" + _NUM + _DEN, re.I)
_FRACTION = re.compile(r"(?<![\d.])" + _NUM + r"\s*(?:/|out of)\s*(\d+(?:\.\d+)?)\b", re.I)
_BOLD = re.compile(r"(?:\*\*|\[\[|__)\s*" + _NUM + _DEN + r"\s*(?:\*\*|\]\]|__)")
# A bare leading number counts only when it stands alone ("7", "7\n...", "7 - good"), not "1. First".
_LEADING = re.compile(r"^\W*" + _NUM + _DEN + r"[ \t]*(?:[.!]?\s*$|\n|[-–:][ \t])")


def _value(num: str, den: str | None, pct: str | None, hi: float) -> float:
    v = float(num)
    if pct:
        return v / 100 * hi
    if den:
        d = float(den)
        if not 0 < d < math.inf:
            return math.nan          # "7/0" or a 400-digit denominator says nothing
        if d != hi:
            return v / d * hi
    return v


def _negative(text: str, m: re.Match, group: int) -> bool:
    """The matched number carries a minus sign ("Score: -3"), so it is no score on a positive scale."""
    i = m.start(group)
    return i > 0 and text[i - 1] in "-\u2212" and (i < 2 or not text[i - 2].isalnum())


def _candidates(text: str, hi: float) -> list[float]:
    """Scores in order of trust: explicit "Score: N", keyworded, fractions, bold, a bare number."""
    plain = _SCALE.sub(" ", text)
    clean = re.sub(r"[*_#`\[\]]", "", plain)
    out: list[float] = []
    for rx in (_EXPLICIT, _LOOSE):
        hits = list(rx.finditer(clean))
        # "Overall/final" beats per-criterion scores; otherwise the last one is the verdict.
        ranked = [m for m in reversed(hits) if m.group(1)] + hits[::-1]
        out += [_value(m.group(2), m.group(3), m.group(4), hi) for m in ranked if not _negative(clean, m, 2)]
    out += [_value(m.group(1), m.group(2), None, hi) for m in reversed(list(_FRACTION.finditer(plain)))
            if not _negative(plain, m, 1)]
    out += [_value(m.group(1), m.group(2), m.group(3), hi) for m in reversed(list(_BOLD.finditer(plain)))
            if not _negative(plain, m, 1)]
    m = _LEADING.match(clean.strip())
    if m and not _negative(clean.strip(), m, 1):
        out.append(_value(m.group(1), m.group(2), m.group(3), hi))
    return out


def parse_score(text: str | None, lo: float = 1, hi: float = 10) -> float | None:
    """The score a judge gave, on its [lo, hi] scale, or None when there is none to trust.

    Prefers a number tied to "score"/"rating" (an "overall" one first), then fractions like
    "8/10" (rescaled when the judge used another denominator), bold numbers, and an output that
    is just a number; spelled-out numbers ("seven") are tried only when no digit qualified.

    >>> parse_score("The answer is clear. I'd rate it 6 out of 10 because of 2 typos.")
    6.0
    >>> parse_score("**Score: seven**") , parse_score("no idea")
    (7.0, None)
    """
    if not text:
        return None
    text = text.replace("\u2019", "'")
    words = re.sub(r"\b(" + "|".join(_WORDS) + r")\b", lambda m: str(_WORDS[m.group(1).lower()]),
                   text, flags=re.I)
    for variant in (text, words) if words != text else (text,):
        for v in _candidates(variant, hi):
            if lo <= v <= hi and math.isfinite(v):
                return v
    return None


# ---------------------------------------------------------------- asking a judge for ratings

@dataclass
class RatingStats:
    """Counters a rating scorer keeps: every judge output either parses or counts as a failure."""

    requests: int = 0
    parsed: int = 0
    unparsed: int = 0       # the judge answered but no score could be read from it
    errors: int = 0         # the backend returned finish_reason "error"

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def parse_rate(self) -> float:
        answered = self.parsed + self.unparsed
        return self.parsed / answered if answered else float("nan")


def rate(llm, chats: Sequence[list[dict]], *, lo: float, hi: float, k: int = 1, params: dict,
         seed: int = 0, stats: RatingStats, outputs: list | None = None) -> list[float | None]:
    """Ask `llm` to rate each chat `k` times (seeds seed..seed+k-1); mean of the parsable ratings.

    >>> rate(llm, [[{"role": "user", "content": "Rate ..."}]], lo=1, hi=10,
    ...      params={"max_tokens": 64}, stats=RatingStats())            # doctest: +SKIP
    [7.0]
    """
    if not chats:
        return []
    requests = [c for c in chats for _ in range(k)]
    plist = [{**params, "seed": seed + j} for _ in chats for j in range(k)] if k > 1 else dict(params)
    done = llm.generate(requests, plist)
    scores: list[float | None] = []
    for i in range(len(chats)):
        got = []
        for c in done[i * k:(i + 1) * k]:
            stats.requests += 1
            if outputs is not None:
                outputs.append(c.text)
            if not c.ok:
                stats.errors += 1
                continue
            v = parse_score(c.text, lo, hi)
            if v is None:
                stats.unparsed += 1
            else:
                stats.parsed += 1
                got.append(v)
        scores.append(sum(got) / len(got) if got else None)
    return scores

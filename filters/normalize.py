"""Text normalisation and token hashing for dedup, done on UTF-8 bytes inside numba kernels.

Per-row Python string work caps dedup at a few thousand records/s, and polars' Unicode
lower-casing and regex passes cost more than the whole MinHash kernel, so the text of a batch is
handed to numba as one UTF-8 buffer plus offsets and decoded there, one code point at a time.

Rules (shared by exact and near-dup dedup, so both agree on what "the same text" is):

- case: ASCII, Latin-1, Latin Extended-A, Greek and Cyrillic upper case fold to lower case, and
  fullwidth ASCII forms (U+FF01..FF5E) map to ASCII, as NFKC would;
- whitespace: any run of whitespace is one separator;
- punctuation: ASCII and Latin-1 punctuation, General Punctuation (curly quotes, dashes,
  ellipsis) and CJK punctuation count as separators; symbols (``+ = < > $ ~ ^ | ```, currency,
  math) are kept by exact dedup, so ``2+2`` and ``2 2`` stay different;
- words (MinHash word shingles): runs of letters, digits, underscore and other non-punctuation,
  non-symbol code points, like Python's ``re.findall(r"\\w+", text.lower())`` on most text.

Hashes are 64-bit FNV-1a over code points finished with murmur3's fmix64: deterministic across
processes and versions, which is what lets an index be rebuilt from shards on resume.
"""
from __future__ import annotations

from typing import Sequence

import numba as nb
import numpy as np
import polars as pl

from synthloop.filters.jit import kernel

SPACE, PUNCT, SYMBOL, WORD = 0, 1, 2, 3

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
#: Odd multipliers of token positions inside a shingle (positions past 16 reuse them, rotated).
_POSITION = np.random.default_rng(0x5EED).integers(0, 1 << 63, 16, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_FNV_PRIME = np.uint64(0x100000001B3)


@nb.njit
def fmix64(h):
    """murmur3's 64-bit finaliser: full avalanche, so hash bits can be sliced freely."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


@nb.njit
def next_cp(data, i, end):
    """Decode the UTF-8 code point at data[i]; return (code point, next index). Bad bytes pass as-is."""
    c = np.int64(data[i])
    if c < 0x80:
        return c, i + 1
    if c >= 0xF0 and i + 3 < end:
        return ((c & 0x07) << 18) | ((np.int64(data[i + 1]) & 0x3F) << 12) | \
            ((np.int64(data[i + 2]) & 0x3F) << 6) | (np.int64(data[i + 3]) & 0x3F), i + 4
    if c >= 0xE0 and i + 2 < end:
        return ((c & 0x0F) << 12) | ((np.int64(data[i + 1]) & 0x3F) << 6) | \
            (np.int64(data[i + 2]) & 0x3F), i + 3
    if c >= 0xC0 and i + 1 < end:
        return ((c & 0x1F) << 6) | (np.int64(data[i + 1]) & 0x3F), i + 2
    return c, i + 1  # stray continuation byte or truncated sequence: keep the byte value


def _latin1_tables() -> tuple[np.ndarray, np.ndarray]:
    """Lower-case map and class of every code point below 256, as lookup tables for the kernels."""
    lower = np.arange(256, dtype=np.int64)
    lower[65:91] += 32
    lower[0xC0:0xDF] += 32
    lower[0xD7] = 0xD7
    cls = np.full(256, WORD, np.int64)
    cls[:33] = SPACE   # controls count as whitespace, as Python's str.split treats \x1c-\x1f
    cls[127] = SPACE
    cls[[0x85, 0xA0]] = SPACE
    for c in range(33, 127):
        if not chr(c).isalnum():
            cls[c] = PUNCT
    cls[[36, 43, 60, 61, 62, 94, 96, 124, 126]] = SYMBOL   # $ + < = > ^ ` | ~
    for c in range(0xA1, 0xC0):
        cls[c] = SYMBOL
    cls[[0xA1, 0xA7, 0xAB, 0xB6, 0xB7, 0xBB, 0xBF]] = PUNCT
    cls[[0xAA, 0xB2, 0xB3, 0xB5, 0xB9, 0xBA, 0xBC, 0xBD, 0xBE]] = WORD   # ª ² ³ µ ¹ º ¼ ½ ¾
    cls[[0xD7, 0xF7]] = SYMBOL
    return lower, cls


_LOWER, _CLASS = _latin1_tables()
#: ASCII word character (letters, digits, '_' as in Python's \w) -> lower case; -1 otherwise.
_WORD_LOWER = np.where((_CLASS[:128] == WORD) | (np.arange(128) == 95), _LOWER[:128], -1)


@nb.njit
def fold_case(cp):
    """Lower-case (and fullwidth -> ASCII) for the scripts named in the module docstring."""
    if cp < 0x100:
        return _LOWER[cp]
    if 0xFF01 <= cp <= 0xFF5E:  # fullwidth ASCII, as NFKC maps it
        return _LOWER[cp - 0xFEE0]
    if cp <= 0x17F:
        if (0x100 <= cp <= 0x137) or (0x14A <= cp <= 0x177):
            return cp | 1
        if (0x139 <= cp <= 0x148) or (0x179 <= cp <= 0x17E):
            return cp + 1 if cp & 1 else cp
        if cp == 0x178:
            return 0xFF
        return cp
    if 0x391 <= cp <= 0x3A9 and cp != 0x3A2:
        return cp + 32
    if 0x410 <= cp <= 0x42F:
        return cp + 32
    if 0x400 <= cp <= 0x40F:
        return cp + 80
    return cp


@nb.njit
def char_class(cp):
    """SPACE, PUNCT, SYMBOL or WORD for a case-folded code point ('_' is PUNCT: connector)."""
    if cp < 0x100:
        return _CLASS[cp]
    if 0x2000 <= cp <= 0x206F:
        if cp <= 0x200F or 0x2028 <= cp <= 0x202F or cp >= 0x205F:
            return SPACE  # spaces, zero-width and bidi controls: invisible, never part of a word
        if cp == 0x2044 or cp == 0x2052:
            return SYMBOL
        return PUNCT
    if cp == 0x1680 or cp == 0x3000 or cp == 0xFEFF:
        return SPACE
    if 0x3001 <= cp <= 0x3003 or 0x3008 <= cp <= 0x3011 or 0x3014 <= cp <= 0x301F:
        return PUNCT
    if 0x20A0 <= cp <= 0x20CF or 0x2100 <= cp <= 0x2BFF or 0x1F000 <= cp <= 0x1FAFF:
        return SYMBOL  # currency, letterlike/arrows/math/box drawing, emoji
    return WORD


@nb.njit
def _fnv_step(h, cp):
    return (h ^ np.uint64(cp)) * _FNV_PRIME


@nb.njit
def word_tokens(data, start, end, out):
    """Hash each word of data[start:end] into `out`; return how many words.

    Characters below 256 are packed 8 at a time into `acc`, and only full chunks (or code points
    above 255, tagged with the top bit, which no packed chunk can have as its first char is a word
    character, not U+0080) go through the FNV multiply: an eighth of a multiply chain per character.
    """
    n = 0
    h = _FNV_OFFSET
    acc = np.uint64(0)
    k = 0          # characters in the word
    packed = 0     # characters in acc
    i = start
    while i < end:
        c = data[i]
        if c < 0x80:  # ASCII: one table lookup gives both the class and the lower case
            cp = _WORD_LOWER[c]
            i += 1
        else:
            cp, i = next_cp(data, i, end)
            cp = fold_case(cp)
            if char_class(cp) != WORD:
                cp = -1
        if cp < 0:
            if k:
                out[n] = fmix64(((h ^ acc) * _FNV_PRIME) ^ np.uint64(k))
                n += 1
                h, acc, k, packed = _FNV_OFFSET, np.uint64(0), 0, 0
            continue
        k += 1
        if cp < 256 and packed < 8:
            acc = (acc << np.uint64(8)) | np.uint64(cp)
            packed += 1
            continue
        if packed:
            h = (h ^ acc) * _FNV_PRIME
        if cp < 256:
            acc, packed = np.uint64(cp), 1
        else:
            h = (h ^ (np.uint64(cp) | np.uint64(1 << 63))) * _FNV_PRIME
            acc, packed = np.uint64(0), 0
    if k:
        out[n] = fmix64(((h ^ acc) * _FNV_PRIME) ^ np.uint64(k))
        n += 1
    return n


@nb.njit
def char_tokens(data, start, end, out):
    """Hash each case-folded code point into `out`, whitespace runs as one space, ends stripped."""
    n = 0
    pending_space = False
    i = start
    while i < end:
        cp, i = next_cp(data, i, end)
        cp = fold_case(cp)
        if char_class(cp) == SPACE:
            pending_space = n > 0
            continue
        if pending_space:
            out[n] = fmix64(_fnv_step(_FNV_OFFSET, 32))
            n += 1
            pending_space = False
        out[n] = fmix64(_fnv_step(_FNV_OFFSET, cp))
        n += 1
    return n


@nb.njit
def shingle_hash(toks, i, n):
    """Order-sensitive 64-bit hash of toks[i:i+n]: a sum with one odd multiplier per position.

    The products are independent (no multiply chain), which keeps the per-shingle latency low;
    the token hashes are already avalanched, and fmix64 mixes the sum.
    """
    h = np.uint64(n)
    for j in range(n):
        t = toks[i + j]
        if j >= 16:   # positions 16 apart share a multiplier: rotate so a swap still changes h
            r = np.uint64(j >> 4)
            t = (t << r) | (t >> (np.uint64(64) - r))
        h += t * _POSITION[j & 15]
    return fmix64(h)


@nb.njit
def n_shingles(n_tokens, ngram):
    """A text shorter than one n-gram is one shingle of all its tokens; an empty text has none."""
    if n_tokens >= ngram:
        return n_tokens - ngram + 1
    return 1 if n_tokens > 0 else 0


@kernel(parallel=True)
def _exact_keys(data, offsets):
    n = offsets.size - 1
    out = np.empty(n, np.uint64)
    for d in nb.prange(n):
        h = _FNV_OFFSET
        pending_space = False
        started = False
        i, end = offsets[d], offsets[d + 1]
        while i < end:
            cp, i = next_cp(data, i, end)
            cp = fold_case(cp)
            cls = char_class(cp)
            if cls == SPACE or cls == PUNCT:
                pending_space = started
                continue
            if pending_space:
                h = _fnv_step(h, 32)
                pending_space = False
            h = _fnv_step(h, cp)
            started = True
        out[d] = fmix64(h)
    return out


def joined_text(df: pl.DataFrame, columns: Sequence[str]) -> pl.Series:
    """The text columns of each row joined by a space (null counts as empty).

    >>> joined_text(pl.DataFrame({"a": ["x"], "b": [None]}), ["a", "b"]).to_list()
    ['x ']
    """
    return df.select(pl.concat_str([pl.col(c).fill_null("") for c in columns], separator=" ")
                     .alias("text")).to_series()


def utf8_buffer(texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, offsets) of a string Series, one copy out of polars' string views.

    >>> data, off = utf8_buffer(pl.Series(["ab", "c"]))
    >>> bytes(data[off[1]:off[2]])
    b'c'
    """
    arr = texts.fill_null("").rechunk().to_arrow(compat_level=pl.CompatLevel.oldest())
    if not str(arr.type).startswith("large_string"):
        arr = arr.cast("large_string")
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return data, offsets


def exact_keys(df: pl.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """64-bit key per row of the normalised text columns; equal keys mean equal normalised text.

    Columns are hashed separately and combined, so ("a b", "") and ("a", "b") differ.

    >>> k = exact_keys(pl.DataFrame({"t": ["Hello,  World!", "hello world", "hello world 2"]}), ["t"])
    >>> bool(k[0] == k[1]), bool(k[1] == k[2])
    (True, False)
    """
    key = np.full(df.height, 0x84222325CBF29CE4, np.uint64)
    for c in columns:
        h = _exact_keys(*utf8_buffer(df[c]))
        with np.errstate(over="ignore"):
            key = (key ^ h) * np.uint64(0x9E3779B97F4A7C15)
            key ^= key >> np.uint64(31)
    return key

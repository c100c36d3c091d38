"""MinHash-LSH near-duplicate dedup: a streaming keep-first stage, also within a batch.

Per batch, one parallel numba kernel tokenises the UTF-8 text (filters/normalize.py rules),
hashes word or character n-grams to 64 bits, folds each to 32 bits and applies `num_perm`
universal hashes ``h_p(x) = (a_p * x + b_p) mod 2**32`` (odd a_p; 8 lanes per AVX2 instruction,
and on pre-mixed input as accurate as ideal permutations, see tests), takes the minima and hashes
each band of the signature into a 64-bit key. The keys then go through an `LSHIndex` serially,
which makes "first seen wins" exact, also inside a batch. Candidates are checked (signature
estimate by default, exact shingle Jaccard with ``verify = true``), see filters/lsh.py.

TOML::

    [[stages]]
    type = "minhash_dedup"
    text_columns = ["instruction", "input", "response"]
    threshold = 0.7
    preload = ["runs/round-00/data/*.parquet"]   # never re-emit what earlier rounds kept
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numba as nb
import numpy as np
import polars as pl

from synthloop.filters.hashtable import nonzero
from synthloop.filters.jit import kernel
from synthloop.filters.lsh import LSHIndex, optimal_bands_rows
from synthloop.filters.preload import PreloadedIndex
from synthloop.filters.normalize import (char_tokens, fmix64, joined_text, n_shingles,
                                         shingle_hash, utf8_buffer, word_tokens)
from synthloop.core.registry import register
from synthloop.core.stages import drop_where, per_batch

REASON = "near_duplicate"


@kernel(parallel=True)
def _signatures(data, offsets, ngram, char_mode, a, b, bands, rows, want_sets):
    """Signatures, band keys and shingle counts; with `want_sets` also the sorted distinct
    shingle hashes of every document (flat, offsets), from the same tokenisation pass."""
    n = offsets.size - 1
    num_perm = a.size
    sig = np.empty((n, num_perm), np.uint32)
    keys = np.empty((n, bands), np.uint64)
    counts = np.empty(n, np.int64)
    # room for a document's shingles: one per token at most; a word takes a byte and a separator
    room = np.zeros(n + 1, np.int64)
    if want_sets:
        for d in range(n):
            span = offsets[d + 1] - offsets[d]
            room[d + 1] = room[d] + (span if char_mode else span // 2 + 1)
    buf = np.empty(room[n], np.uint64)
    sizes = np.zeros(n, np.int64)
    for d in nb.prange(n):
        s, e = offsets[d], offsets[d + 1]
        toks = np.empty(e - s + 1, np.uint64)
        nt = char_tokens(data, s, e, toks) if char_mode else word_tokens(data, s, e, toks)
        m = n_shingles(nt, ngram)
        w = min(ngram, nt)
        r0 = room[d]
        cur = np.full(num_perm, 0xFFFFFFFF, np.uint32)   # a local row: no aliasing, so it vectorises
        for i in range(m):
            h = shingle_hash(toks, i, w)
            if want_sets:
                buf[r0 + i] = h
            x = np.uint32((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF))
            for p in range(num_perm):
                cur[p] = min(cur[p], np.uint32(a[p] * x + b[p]))
        sig[d, :] = cur
        for k in range(bands):
            h = np.uint64(0x9E3779B97F4A7C15) * np.uint64(k + 1)
            for p in range(k * rows, (k + 1) * rows):
                h = (h ^ np.uint64(cur[p])) * np.uint64(0x100000001B3)
            keys[d, k] = nonzero(fmix64(h))
        counts[d] = m
        if want_sets and m:
            part = buf[r0:r0 + m]
            part.sort()
            k = 1
            for i in range(1, m):
                if part[i] != part[k - 1]:
                    part[k] = part[i]
                    k += 1
            sizes[d] = k
    off = np.zeros(n + 1, np.int64)
    off[1:] = np.cumsum(sizes)
    flat = np.empty(off[n], np.uint64)
    for d in nb.prange(n):
        flat[off[d]:off[d + 1]] = buf[room[d]:room[d] + sizes[d]]
    return sig, keys, counts, flat, off


class MinHasher:
    """MinHash signatures and LSH band keys of texts.

    >>> mh = MinHasher(num_perm=64, ngram=2)
    >>> sig, keys, n, (flat, off) = mh.hash(pl.Series(["the cat sat on the mat", "The cat sat on the mat!"]), sets=True)
    >>> bool((sig[0] == sig[1]).all()), n.tolist(), off.tolist()
    (True, [5, 5], [0, 5, 10])
    """

    def __init__(self, *, num_perm: int = 128, ngram: int = 5, shingle: str = "word",
                 bands: int = 0, rows: int = 0, seed: int = 1):
        if shingle not in ("word", "char"):
            raise ValueError(f"shingle must be 'word' or 'char', got {shingle!r}")
        if ngram < 1 or num_perm < 2:
            raise ValueError("ngram must be >= 1 and num_perm >= 2")
        if bands * rows > num_perm:
            raise ValueError(f"bands * rows = {bands * rows} exceeds num_perm = {num_perm}")
        self.num_perm, self.ngram, self.shingle = num_perm, ngram, shingle
        self.bands, self.rows = bands, rows
        rng = np.random.default_rng(seed)
        self.a = (rng.integers(0, 1 << 31, num_perm, dtype=np.uint32) << np.uint32(1)) | np.uint32(1)
        self.b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint32)

    def hash(self, texts: pl.Series, *, sets: bool = False):
        """(signatures uint32 n x num_perm, band keys uint64 n x bands, shingle counts), plus with
        `sets` the sorted distinct 64-bit shingle hashes per text: (flat, offsets), text i's being
        flat[off[i]:off[i+1]] (what the exact check compares)."""
        data, offsets = utf8_buffer(texts)
        sig, keys, counts, flat, off = _signatures(data, offsets, self.ngram, self.shingle == "char",
                                                   self.a, self.b, self.bands, self.rows, sets)
        return (sig, keys, counts, (flat, off)) if sets else (sig, keys, counts)


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal signature values: an unbiased estimate of the Jaccard similarity.

    >>> jaccard_estimate(np.array([1, 2, 3, 4]), np.array([1, 2, 3, 9]))
    0.75
    """
    return float(np.mean(sig_a == sig_b))


@dataclass
class MinHashConfig:
    text_columns: list = field(default_factory=lambda: ["instruction", "input", "response"])
    threshold: float = 0.7
    num_perm: int = 128
    ngram: int = 5
    shingle: str = "word"       # word | char n-grams
    bands: int = 0              # 0 (with rows = 0): chosen from threshold and the weights below
    rows: int = 0
    # Weights of the bands/rows choice (20 x 6 at 0.7/128). They favour recall: every LSH
    # candidate is checked afterwards, which removes the false positives a low S-curve lets in.
    fp_weight: float = 0.1
    fn_weight: float = 0.9
    check_margin: float = 0.02  # verify = false: a candidate counts if its estimate >= threshold - this
    # Exact-Jaccard check of candidates (stores each kept row's shingle hashes, ~4 bytes a word).
    # The default: the signature estimate (1 byte per permutation) has sd 0.04 at 0.7/128, so it
    # misses pairs just over the threshold (recall 0.96 against 0.98 exact, bench/dedup_minhash.py).
    verify: bool = True
    seed: int = 1
    preload: list = field(default_factory=list)   # Parquet paths/globs indexed before the stream


class MinHashDedup(PreloadedIndex):
    """Streaming keep-first near-duplicate filter; rows it drops get drop_reason "near_duplicate".

    >>> from synthloop.core.schema import make_batch
    >>> dd = MinHashDedup(MinHashConfig(ngram=2, text_columns=["instruction"]))
    >>> b = make_batch([{"instruction": "a b c d e f g h"}, {"instruction": "A b c d e f g h!"}])
    >>> dd.mark(b)["drop_reason"].to_list()
    [None, 'near_duplicate']
    """

    def __init__(self, cfg: MinHashConfig | None = None):
        cfg = cfg or MinHashConfig()
        if not cfg.text_columns:
            raise ValueError("text_columns must name at least one column")
        if (cfg.bands > 0) != (cfg.rows > 0):
            raise ValueError("set both bands and rows, or neither (then threshold chooses them)")
        if not 0.0 < cfg.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {cfg.threshold}")
        bands, rows = (cfg.bands, cfg.rows) if cfg.bands else optimal_bands_rows(
            cfg.threshold, cfg.num_perm, fp_weight=cfg.fp_weight, fn_weight=cfg.fn_weight)
        self.cfg = cfg
        self.hasher = MinHasher(num_perm=cfg.num_perm, ngram=cfg.ngram, shingle=cfg.shingle,
                                bands=bands, rows=rows, seed=cfg.seed)
        self.bands, self.rows = bands, rows
        self.reset()
        if cfg.preload:
            self.preload(cfg.preload)

    def reset(self) -> None:
        self.index = LSHIndex(self.bands, self.cfg.num_perm, self.cfg.threshold,
                              check="exact" if self.cfg.verify else "signature",
                              margin=self.cfg.check_margin)

    def _run(self, batch: pl.DataFrame, live: np.ndarray, insert_only: bool) -> np.ndarray:
        texts = joined_text(batch, self.cfg.text_columns)
        sig, keys, counts, *rest = self.hasher.hash(texts, sets=self.cfg.verify)
        live = live & (counts > 0)   # no shingles (no words): nothing to compare, never a near-dup
        shingles = rest[0] if rest else None
        return self.index.query_insert(keys, live, sig=sig, shingles=shingles, insert_only=insert_only)

    def mark(self, batch: pl.DataFrame) -> pl.DataFrame:
        """Set drop_reason on rows near-duplicating a kept row (earlier batches or this one)."""
        if batch.height == 0:
            return batch
        live = batch["drop_reason"].is_null().to_numpy()
        dup = self._run(batch, live, insert_only=False)
        return drop_where(batch, pl.Series(dup), REASON) if dup.any() else batch

    def add(self, frames: Iterable[pl.DataFrame]) -> int:
        """Index rows without querying (earlier data that must not be re-emitted); returns rows."""
        n = 0
        for df in frames:
            if df.height:
                self._run(df, np.ones(df.height, bool), insert_only=True)
                n += df.height
        return n


    # -- stage protocol ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"indexed_docs": self.index.docs}



@register("stage", "minhash_dedup", MinHashConfig, tags=("dedup",))
def build(cfg: MinHashConfig, ctx) -> object:
    dd = MinHashDedup(cfg)
    return per_batch("minhash_dedup", dd.mark, owner=dd)

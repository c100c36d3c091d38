"""Exact ROUGE-L novelty filtering for self-instruct, without the quadratic scan.

Self-instruct keeps a generated instruction only if its ROUGE-L F-measure
against every instruction kept so far is <= 0.7 (reference code:
``rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)``).  Scanning the
whole kept set for every new instruction is quadratic; :class:`NoveltyIndex`
gives the *same decisions* while computing LCS for only a handful of
candidates per query.

Why the pruning is safe (m = query tokens, n = kept-text tokens, L = LCS):

* ROUGE-L F = 2PR/(P+R) with P = L/n, R = L/m, i.e. exactly 2L/(m+n).
* L <= O, the *multiset* token overlap (an LCS is a common sub-multiset), so
  F > t needs O >= need(m, n) = floor(t*(m+n)/2) + 1, and O <= min(m, n).
* Multisets become sets by turning the k-th occurrence of token w into the
  element (w, k); then O is a plain set intersection size.
* Prefix filter: if |X & Y| >= a, the first shared element (under any total
  order) lies among the first |X| - a + 1 elements of X in that order.  Every
  kept text is indexed under *all* of its elements, so only the query needs
  an order, and it may differ from query to query: we probe the query's
  currently rarest elements.  a = the smallest need(m, n) over feasible n.
* Count filter: a kept text found in `hits` of the p probed elements shares
  at most hits + (k - p) of the query's k known elements, so it is dropped
  when that is below need(m, n).  Probing past the minimal prefix makes this
  bound tight; hits are counted with numpy, ~ns per posting.
* Survivors get their exact overlap o and are LCS-checked in decreasing order
  of 2o/(m+n); once that bound drops below the best F found (minus eps), no
  later survivor can beat or tie it.
* Float safety: rouge_score computes F in floating point, so a pair whose
  exact ratio equals the threshold can land on either side (L=7, m=8, n=12
  gives 0.7000000000000001 > 0.7: rejected; m=n=10 gives 0.7: kept).  Bounds
  use ``t - 1e-9`` and every pair that survives them is scored with
  rouge_score's own float formula, so borderline pairs are decided exactly as
  the scan would decide them.

Cost per check: numpy work proportional to the postings probed (capped near
len(index) entries) plus a few exact LCS; see bench/rouge_novelty.py.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

__all__ = ["tokenize", "rouge_l", "NoveltyIndex"]

# Han, kana and CJK compatibility ideographs are one token per character (those scripts put no
# spaces between words); any other run of letters and digits, in any script, is a token.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(f"[{CJK}]|[^\\W_{CJK}]+")

# Bounds are evaluated against threshold - _EPS.  F is computed by rouge_score
# with a few roundings (relative error ~1e-15), so any pair whose exact 2L/(m+n)
# is below t - _EPS cannot float-compare above t; pairs in between get scored.
_EPS = 1e-9


def tokenize(text: str) -> list[str]:
    """Tokenize like rouge_score's DefaultTokenizer(use_stemmer=False), in every script.

    Lowercase (Python's ``str.lower``, so e.g. the Kelvin sign becomes "k"), then take runs of
    letters and digits. On ASCII text this is exactly rouge_score's [a-z0-9] runs; rouge_score
    drops every other letter, which cuts "Übersetze" to "bersetze" and leaves a Russian or
    Chinese instruction with no tokens at all (so nothing in it could ever be too similar).
    Han and kana characters are one token each.

    >>> tokenize("Write a 3-line poem, ÉTÉ!"), tokenize("日本語 text")
    (['write', 'a', '3', 'line', 'poem', 'été'], ['日', '本', '語', 'text'])
    """
    return _TOKEN.findall(text.lower())


def _lcs_len(a: Sequence, b: Iterable) -> int:
    """Length of the LCS of a and b (bit-parallel, Hyyrö 2004).

    One Python big-int step per token of ``b``; bit i of ``v`` tracks row i of
    the DP over ``a``.  Exact; much faster than the O(len(a)*len(b)) table.
    """
    masks: dict = {}
    bit = 1
    for tok in a:
        masks[tok] = masks.get(tok, 0) | bit
        bit <<= 1
    full = bit - 1
    v = full
    get = masks.get
    for tok in b:
        u = v & get(tok, 0)
        if u:  # u == 0 leaves v unchanged
            v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _fmeasure(lcs: int, m: int, n: int) -> float:
    # Same float operations, in the same order, as rouge_score's _score_lcs
    # with target = the m-token text and prediction = the n-token text.
    # (The result is symmetric: 2*p*r is exact-scaling of p*r.)
    if lcs == 0:
        return 0.0
    precision = lcs / n
    recall = lcs / m
    return 2 * precision * recall / (precision + recall)


def rouge_l(a_tokens: Sequence[str], b_tokens: Sequence[str]) -> float:
    """Exact ROUGE-L F-measure of two token lists, bit-identical to rouge_score.

    >>> rouge_l(tokenize("the cat sat"), tokenize("the cat sat down"))
    0.8571428571428571
    """
    if not a_tokens or not b_tokens:
        return 0.0
    return _fmeasure(_lcs_len(a_tokens, b_tokens), len(a_tokens), len(b_tokens))


def _masks(ids: Sequence) -> tuple[dict, int]:
    # Per-token bit masks of the query, built once and reused for every LCS.
    masks: dict = {}
    bit = 1
    for tok in ids:
        masks[tok] = masks.get(tok, 0) | bit
        bit <<= 1
    return masks, bit - 1


class NoveltyIndex:
    """Kept-instruction set answering "is ROUGE-L <= threshold to all of them?".

    Decisions are exactly those of scanning every kept text with
    :func:`rouge_l`; pairs are skipped only via the provable bounds described
    in the module docstring.  Kept texts are numbered 0, 1, ... in the order
    they were added.

    >>> idx = NoveltyIndex(threshold=0.7)
    >>> idx.add("Write a poem about the sea.")
    >>> idx.add_if_novel("Write a poem about the ocean.")
    (False, 0.8333333333333334)
    >>> idx.add_if_novel("List three uses of baking soda.")
    (True, 0.0)
    >>> len(idx)
    2
    """

    # After the minimal prefix, keep probing the query's next-rarest element
    # while its posting list is at most _EXTEND x everything probed so far and
    # the total stays under _EXTEND_MAX x len(self).  Each extra element
    # tightens the count filter by one; counting costs ~ns per posting while a
    # candidate left for the Python checks costs ~us.  Pure speed knobs (any
    # values are exact); these were the fastest on bench/rouge_novelty.py.
    _EXTEND = 1.0
    _EXTEND_MAX = 1.0

    def __init__(self, *, threshold: float = 0.7) -> None:
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold
        self._half_t = (threshold - _EPS) / 2.0
        self._vocab: dict[str, int] = {}
        # Element = (token id, k) for the k-th occurrence of a token, so that
        # multiset overlap is a set intersection of element ids.
        self._elem: dict[tuple[int, int], int] = {}
        self._parr: list[np.ndarray] = []  # element id -> kept ids (int32, capacity-doubled)
        self._plen: list[int] = []  # element id -> used length of _parr[e]
        self._toks: list[tuple[int, ...]] = []  # kept id -> token ids (for LCS)
        self._elems: list[tuple[int, ...]] = []  # kept id -> element ids (for overlap)
        self._lens = np.zeros(1024, dtype=np.int32)  # kept id -> token count
        self._alpha_cache: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._toks)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _alpha_for(m: int, half_t: float) -> int:
        """Smallest overlap any kept text needs to beat the threshold vs m tokens.

        need(m, n) = floor((t - eps)(m + n)/2) + 1 grows with n, and a pair is
        only feasible when need(m, n) <= n (overlap <= n), so the minimum is at
        the smallest feasible n, which is <= m.  Returns m + 1 if none is.
        """
        for n in range(1, m + 1):
            # int() truncates toward zero: with threshold 0 this gives 1.
            nd = int(half_t * (m + n)) + 1
            if nd <= n:
                return nd
        return m + 1

    def _alpha(self, m: int) -> int:
        a = self._alpha_cache.get(m)
        if a is None:
            a = self._alpha_cache[m] = self._alpha_for(m, self._half_t)
        return a

    def _query_elems(self, toks: Sequence[str]) -> tuple[list[int], list[int]]:
        """Token ids (unknown -> -1, which matches nothing) and known element ids."""
        vocab_get = self._vocab.get
        elem_get = self._elem.get
        ids = [vocab_get(t, -1) for t in toks]
        occ: dict[int, int] = {}
        elems = []
        for i in ids:
            if i < 0:
                continue
            k = occ.get(i, 0) + 1
            occ[i] = k
            e = elem_get((i, k))
            if e is not None:
                elems.append(e)
        return ids, elems

    def _postings(self, elems: Sequence[int]) -> np.ndarray:
        parr, plen = self._parr, self._plen
        if len(elems) == 1:
            e = elems[0]
            return parr[e][: plen[e]]
        return np.concatenate([parr[e][: plen[e]] for e in elems])

    def _scan(
        self,
        ids: list[int],
        elems: list[int],
        *,
        stop_above: bool,
        tau: float | None = None,
        best: tuple[float, int | None] = (0.0, None),
        probe_all: bool = False,
    ) -> tuple[float, int | None]:
        """Score every kept text that could reach F > tau - eps (tau: threshold).

        Returns the best (F, id) among ``best`` and the verified texts (ties ->
        lowest id), or the first text found with F > tau when ``stop_above``.
        Every kept text with exact 2*LCS/(m+n) > tau - eps is verified (unless
        stopped early), so a best >= tau is the true maximum.  Sorts ``elems``.
        """
        m = len(ids)
        k = len(elems)
        best_f, best_d = best
        if m == 0 or k == 0:
            return best_f, best_d
        if tau is None:
            tau = self.threshold
            half_t = self._half_t
            alpha = self._alpha(m)
        else:
            half_t = (tau - _EPS) / 2.0
            alpha = self._alpha_for(m, half_t)
        if alpha > k:  # too few known tokens to reach the threshold with anyone
            return best_f, best_d
        plen = self._plen
        # Rarest first under the *current* frequencies.  Legal because kept
        # texts are indexed under all their elements: only the query's prefix
        # needs an order, and any order works for the lemma.
        elems.sort(key=plen.__getitem__)
        p = k - alpha + 1
        tot = 0
        for e in elems[:p]:
            tot += plen[e]
        # probe_all (exact max): counting every posting makes hits the exact
        # overlap, so the whole ranking below stays vectorised.
        cap = float("inf") if probe_all else self._EXTEND_MAX * len(self._toks)
        while p < k and plen[elems[p]] <= self._EXTEND * tot and tot + plen[elems[p]] <= cap:
            tot += plen[elems[p]]
            p += 1
        if tot == 0:
            return best_f, best_d
        # An unprobed element adds at most one to the overlap: a candidate with
        # `hits` among the probed ones has overlap <= hits + slack.
        slack = k - p
        cat = self._postings(elems[:p])
        n_docs = len(self._toks)
        if p == 1:
            cand = cat
            hits = 1
        else:
            if cat.shape[0] * 16 < n_docs:
                cand, hits = np.unique(cat, return_counts=True)
            else:
                cnt = np.bincount(cat, minlength=n_docs)
                cand = np.flatnonzero(cnt >= alpha - slack)
                hits = cnt[cand]
        kq = k if k < m else m
        n = self._lens[cand]
        # Same float formula as the scalar need(m, n); astype truncates like int().
        nd = (half_t * (m + n)).astype(np.int64) + 1
        ok = (nd <= n) & (nd <= kq) & (hits + slack >= nd)
        # Exact multiset overlap o bounds the LCS, so F <= 2o/(m+n) =: ub.
        # Verify in decreasing ub: the best F rises fast, and once ub drops
        # below it (minus eps) no later text can beat or tie it.
        if slack == 0:  # hits is already the exact overlap
            cand = cand[ok]
            if cand.shape[0] == 0:
                return best_f, best_d
            ub = 2.0 * (hits[ok] if p > 1 else 1) / (m + n[ok])
            order = np.lexsort((cand, -ub))  # ub descending, then lowest id
            ranked = zip(ub[order].tolist(), cand[order].tolist())
        else:
            qset = frozenset(elems)
            d_elems = self._elems
            scored = []
            for d in cand[ok].tolist():
                de = d_elems[d]
                nn = len(de)
                o = len(qset.intersection(de))
                if o >= int(half_t * (m + nn)) + 1:
                    scored.append((-2.0 * o / (m + nn), d))
            if not scored:
                return best_f, best_d
            scored.sort()
            ranked = ((-neg_ub, d) for neg_ub, d in scored)
        toks = self._toks
        masks, full = _masks(ids)
        get = masks.get
        for u_b, d in ranked:
            if u_b < best_f - _EPS:
                break
            tb = toks[d]
            v = full
            for tok in tb:
                u = v & get(tok, 0)
                if u:
                    v = ((v + u) | (v - u)) & full
            f = _fmeasure(m - v.bit_count(), m, len(tb))
            if f > best_f or (f == best_f and (best_d is None or d < best_d)):
                best_f, best_d = f, d
                if stop_above and f > tau:
                    break
        return best_f, best_d

    def _lower_bound(self, ids: list[int], elems: list[int]) -> tuple[float, int | None]:
        """Exact F of a few promising kept texts: a cheap lower bound of the max.

        Takes the kept texts sharing the most of the query's rarest elements
        (at least ~256 postings' worth) and scores the best 8 by 2*hits/(m+n).
        """
        m = len(ids)
        plen = self._plen
        rare = sorted(elems, key=plen.__getitem__)
        j, tot = 0, 0
        while j < len(rare) and (j == 0 or tot < 256):
            tot += plen[rare[j]]
            j += 1
        cand, hits = np.unique(self._postings(rare[:j]), return_counts=True)
        if cand.shape[0] > 8:
            top = np.argpartition(-hits / (m + self._lens[cand]), 8)[:8]
            cand = cand[top]
        best_f, best_d = 0.0, None
        toks = self._toks
        for d in sorted(cand.tolist()):
            tb = toks[d]
            f = _fmeasure(_lcs_len(ids, tb), m, len(tb))
            if f > best_f:
                best_f, best_d = f, d
        return best_f, best_d

    def _add_tokens(self, toks: list[str]) -> None:
        vocab = self._vocab
        elem = self._elem
        parr, plen = self._parr, self._plen
        d = len(self._toks)
        ids = []
        els = []
        occ: dict[int, int] = {}
        for t in toks:
            i = vocab.get(t)
            if i is None:
                i = vocab[t] = len(vocab)
            ids.append(i)
            c = occ.get(i, 0) + 1
            occ[i] = c
            e = elem.get((i, c))
            if e is None:
                e = elem[(i, c)] = len(plen)
                parr.append(np.empty(4, dtype=np.int32))
                plen.append(0)
            used = plen[e]
            arr = parr[e]
            if used == arr.shape[0]:  # amortised O(1) append
                arr = np.concatenate([arr, np.empty(used, dtype=np.int32)])
                parr[e] = arr
            arr[used] = d
            plen[e] = used + 1
            els.append(e)
        if d == self._lens.shape[0]:
            self._lens = np.concatenate([self._lens, np.zeros(d, dtype=np.int32)])
        self._lens[d] = len(ids)
        self._toks.append(tuple(ids))
        self._elems.append(tuple(els))

    def _max_from_ids(self, ids: list[int], elems: list[int]) -> tuple[float, int | None]:
        if not ids or not elems:
            return 0.0, None
        best_f, best_d = self._scan(ids, list(elems), stop_above=False)
        if best_d is not None and best_f >= self.threshold:
            # Every text with float F >= threshold has exact F > threshold - eps
            # and was verified by _scan, so this is the global maximum.
            return best_f, best_d
        # The max is <= threshold.  Any exact F found is a lower bound lb of
        # the max, and a scan with tau = lb verifies every text with exact
        # F > lb - eps, so it cannot miss the max (or a tie with a lower id).
        lb_f, lb_d = self._lower_bound(ids, elems)
        if lb_d is not None and (best_d is None or lb_f > best_f or (lb_f == best_f and lb_d < best_d)):
            best_f, best_d = lb_f, lb_d
        if best_d is None:  # unreachable: a known element belongs to some kept text
            return 0.0, None
        return self._scan(
            ids, list(elems), stop_above=False, tau=best_f, best=(best_f, best_d), probe_all=True
        )

    # ------------------------------------------------------------------ public API
    def add(self, text: str) -> None:
        """Add ``text`` to the kept set unconditionally (e.g. seed tasks).

        >>> idx = NoveltyIndex(); idx.add("Name a color."); len(idx)
        1
        """
        self._add_tokens(tokenize(text))

    def max_similarity(self, text: str) -> tuple[float, int | None]:
        """Exact max ROUGE-L F of ``text`` against the kept set, and its id.

        Ties go to the lowest id; (0.0, None) if no kept text shares a token.
        Fast when the maximum exceeds the threshold; otherwise it scores a few
        promising texts and reruns the filter with their best F as the
        threshold (still exact, but lower thresholds prune less).

        >>> idx = NoveltyIndex(); idx.add("Name a color."); idx.add("Name a fruit.")
        >>> idx.max_similarity("name a fruit please")
        (0.8571428571428571, 1)
        """
        return self._max_from_ids(*self._query_elems(tokenize(text)))

    def is_novel(self, text: str) -> bool:
        """True iff ROUGE-L F of ``text`` against every kept text is <= threshold.

        >>> idx = NoveltyIndex(); idx.add("Name a color.")
        >>> idx.is_novel("Name a colour."), idx.is_novel("Name a primary color.")
        (True, False)
        """
        ids, elems = self._query_elems(tokenize(text))
        best_f, _ = self._scan(ids, elems, stop_above=True)
        return not best_f > self.threshold

    def add_if_novel(self, text: str, *, exact_score: bool = False) -> tuple[bool, float]:
        """The self-instruct filter step: keep ``text`` iff it is novel.

        Returns (kept, score).  When rejected, ``score`` is the exact maximum
        ROUGE-L F (> threshold).  When kept, ``score`` is the largest F among
        the texts that had to be verified: a lower bound of the true maximum,
        which is itself <= threshold.  ``exact_score=True`` makes it the exact
        maximum for kept texts too (slower: see :meth:`max_similarity`).

        >>> idx = NoveltyIndex(); idx.add("Name a color.")
        >>> idx.add_if_novel("Name a color!"), len(idx)
        ((False, 1.0), 1)
        """
        toks = tokenize(text)
        ids, elems = self._query_elems(toks)
        if exact_score:
            best_f, _ = self._max_from_ids(ids, elems)
        else:
            # No early exit: verifying every survivor makes a rejection's score
            # the true maximum, and survivors are few.
            best_f, _ = self._scan(ids, elems, stop_above=False)
        kept = not best_f > self.threshold
        if kept:
            self._add_tokens(toks)
        return kept, best_f

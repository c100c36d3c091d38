"""LSH banding: choosing bands x rows for a Jaccard threshold, and the streaming band index.

A MinHash signature of ``bands * rows`` values is cut into bands; two documents are candidates
when any band is identical, which happens with probability ``1 - (1 - s**rows)**bands`` at
Jaccard ``s``. Low-similarity pairs are many, so on a large stream the S-curve's tail alone
drops originals (0.5-1.6% of them on the reference corpus at threshold 0.7). Every candidate is
therefore checked before it counts:

- ``"signature"`` (default): the Jaccard estimated from the two full signatures must reach
  ``threshold - margin`` (default margin 0.02). The margin is small on purpose: pairs just under
  the threshold are far more numerous than those just over it and their count per record grows
  with the stream, so a margin of 2 sd (0.08 at 0.7/128) dropped 0.2% of originals at 300k
  records and more after. Kept signatures keep only the low 8 bits of each value (b-bit MinHash:
  unequal values collide with probability 1/256, which the cut allows for), 1 byte per
  permutation per kept document.
- ``"exact"``: the exact Jaccard of the two shingle sets must reach the threshold; sorted 64-bit
  shingle hashes of kept documents are stored (8 bytes per shingle).
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

from synthloop.filters.hashtable import BandTable, band_add, fingerprint, next_slot, slot_of
from synthloop.filters.jit import kernel


def lsh_probability(s, bands: int, rows: int):
    """Probability that two documents with Jaccard `s` share at least one band.

    >>> round(float(lsh_probability(0.7, 16, 8)), 3)
    0.613
    """
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


def optimal_bands_rows(threshold: float, num_perm: int, *, fp_weight: float = 0.5,
                       fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted error areas.

    False positives: the area under the S-curve below `threshold`; false negatives: the area above
    it, as datasketch defines them. The integrands are polynomials of degree <= num_perm, so
    Gauss-Legendre with num_perm/2 + 1 nodes integrates them exactly.

    >>> optimal_bands_rows(0.7, 128)
    (14, 9)
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if num_perm < 2:
        raise ValueError(f"num_perm must be >= 2, got {num_perm}")
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)
    lo_s = (nodes + 1) * threshold / 2                     # nodes mapped onto [0, t]
    hi_s = threshold + (nodes + 1) * (1 - threshold) / 2   # and onto [t, 1]
    best, best_err = (1, 1), np.inf
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1)[:, None]
        fp = (lsh_probability(lo_s[None, :], b, r) @ weights) * threshold / 2
        fn = ((1 - lsh_probability(hi_s[None, :], b, r)) @ weights) * (1 - threshold) / 2
        err = fp_weight * fp + fn_weight * fn
        i = int(np.argmin(err))
        if err[i] < best_err:  # strict: on ties the fewest bands win, as in datasketch
            best, best_err = (b, i + 1), err[i]
    return best


def signature_cut(threshold: float, num_perm: int, margin: float = 0.02) -> int:
    """Fewest equal signature values a candidate needs under the "signature" check.

    >>> signature_cut(0.7, 128)
    88
    """
    low = max(0.0, threshold - margin)
    return max(1, math.ceil((low + (1 - low) / 256) * num_perm))   # 8-bit values: 1/256 collide


def _grown(a: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((max(rows, a.shape[0] * 3 // 2),) + a.shape[1:], a.dtype)
    out[:a.shape[0]] = a
    return out


@nb.njit
def _jaccard(a, b):
    i = j = inter = 0
    while i < a.size and j < b.size:
        if a[i] == b[j]:
            inter += 1
            i += 1
            j += 1
        elif a[i] < b[j]:
            i += 1
        else:
            j += 1
    union = a.size + b.size - inter
    return inter / union if union else 1.0


@kernel()
def jaccard_pairs(flat, off, ia, ib):
    """Exact Jaccard of sorted distinct sets number ia[i] and ib[i] (set k: flat[off[k]:off[k+1]])."""
    out = np.empty(ia.size)
    for i in range(ia.size):
        a, b = ia[i], ib[i]
        out[i] = _jaccard(flat[off[a]:off[a + 1]], flat[off[b]:off[b + 1]])
    return out


@nb.njit
def _sig_matches(store, j, sig, d):
    m = 0
    for p in range(sig.shape[1]):
        m += store[j, p] == np.uint8(sig[d, p] & np.uint32(0xFF))
    return m


@kernel()
def _query_insert(band_keys, live, insert_only, entries, exact, sig, sig_store, cut,
                  sh_flat, sh_off, st_flat, st_off, meta, threshold):
    """Keep-first over one batch: query each live document, insert it unless it is a duplicate.

    meta = [kept documents, stored shingle hashes]; stores have room reserved by the caller.
    """
    n, bands = band_keys.shape
    dup = np.zeros(n, np.bool_)
    cap = entries.size
    seen = np.empty(64, np.int64)  # candidates already checked for this document
    for d in range(n):
        if not live[d]:
            continue
        mine = sh_flat[sh_off[d]:sh_off[d + 1]] if exact else sh_flat[:0]
        if not insert_only:
            n_seen = 0
            for k in range(bands):
                fp = fingerprint(band_keys[d, k])
                i = slot_of(fp, cap)
                while entries[i] != 0:
                    e = entries[i]
                    i = next_slot(i, cap)
                    if (e >> np.uint64(32)) != fp:
                        continue
                    j = np.int64(e & np.uint64(0xFFFFFFFF))
                    again = False
                    for x in range(min(n_seen, 64)):
                        if seen[x] == j:
                            again = True
                            break
                    if again:
                        continue
                    seen[n_seen % 64] = j
                    n_seen += 1
                    if exact:
                        ok = _jaccard(mine, st_flat[st_off[j]:st_off[j + 1]]) >= threshold
                    else:
                        ok = _sig_matches(sig_store, j, sig, d) >= cut
                    if ok:
                        dup[d] = True
                        break
                if dup[d]:
                    break
        if dup[d]:
            continue
        j = meta[0]
        meta[0] = j + 1
        if exact:
            h = meta[1]
            st_flat[h:h + mine.size] = mine
            st_off[j + 1] = h + mine.size
            meta[1] = h + mine.size
        else:
            for p in range(sig.shape[1]):
                sig_store[j, p] = np.uint8(sig[d, p] & np.uint32(0xFF))
        for k in range(bands):
            band_add(entries, fingerprint(band_keys[d, k]), j)
    return dup


class LSHIndex:
    """Band keys of kept documents plus what the candidate check needs; keep-first per batch.

    >>> idx = LSHIndex(bands=2, num_perm=4, threshold=0.7)
    >>> sig = np.array([[1, 2, 3, 4], [1, 2, 3, 5], [9, 9, 9, 9]], np.uint32)
    >>> keys = np.array([[11, 12], [11, 13], [14, 15]], np.uint64) << np.uint64(32)
    >>> idx.query_insert(keys, np.ones(3, bool), sig=sig).tolist()
    [False, True, False]
    """

    def __init__(self, bands: int, num_perm: int, threshold: float, *, check: str = "signature",
                 margin: float = 0.02):
        if check not in ("signature", "exact"):
            raise ValueError(f"check must be 'signature' or 'exact', got {check!r}")
        self.bands, self.num_perm, self.threshold, self.check = bands, num_perm, threshold, check
        self.cut = signature_cut(threshold, num_perm, margin)
        self.table = BandTable()
        self.meta = np.zeros(2, np.int64)   # kept documents, stored shingle hashes
        self.sigs = np.zeros((1024 if check == "signature" else 0, num_perm), np.uint8)
        self.sh_flat = np.zeros(1 << 16 if check == "exact" else 0, np.uint64)
        self.sh_off = np.zeros(1024 if check == "exact" else 1, np.int64)

    @property
    def docs(self) -> int:
        return int(self.meta[0])

    def query_insert(self, band_keys: np.ndarray, live: np.ndarray, *, sig: np.ndarray | None = None,
                     shingles: tuple[np.ndarray, np.ndarray] | None = None,
                     insert_only: bool = False) -> np.ndarray:
        """Duplicate flags for the live rows of `band_keys` (n x bands); the others are inserted.

        Needs `sig` (n x num_perm uint32) for the signature check, `shingles` = (flat, offsets)
        from `MinHasher.hash(texts, sets=True)` for the exact one. `insert_only` indexes every live row unchecked
        (earlier data that must not be re-emitted).
        """
        n = int(live.sum())
        if self.docs + n >= 1 << 32:
            raise OverflowError("LSHIndex holds at most 2**32 documents")
        self.table.reserve(n * self.bands)
        self.table.count += n * self.bands   # upper bound: duplicates are not inserted
        exact = self.check == "exact"
        if exact:
            flat, off = shingles
            if self.docs + n + 1 > self.sh_off.size:
                self.sh_off = _grown(self.sh_off, self.docs + n + 1)
            if int(self.meta[1]) + flat.size > self.sh_flat.size:
                self.sh_flat = _grown(self.sh_flat, int(self.meta[1]) + flat.size)
            sig = np.zeros((band_keys.shape[0], 0), np.uint32)
        else:
            flat, off = np.zeros(0, np.uint64), np.zeros(band_keys.shape[0] + 1, np.int64)
            if self.docs + n > self.sigs.shape[0]:
                self.sigs = _grown(self.sigs, self.docs + n)
        dup = _query_insert(band_keys, live, insert_only, self.table.entries, exact, sig,
                            self.sigs, self.cut, flat, off, self.sh_flat, self.sh_off, self.meta,
                            float(self.threshold))
        self.table.count -= int(dup.sum()) * self.bands
        return dup

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + self.sigs.nbytes + self.sh_flat.nbytes + self.sh_off.nbytes

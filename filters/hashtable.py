"""Compact hash tables for dedup indexes: open addressing over numpy arrays, probed in numba.

A Python set or dict entry costs ~100 bytes; here an entry is one 8-byte word, so an index of
millions of records stays small, and a whole batch is queried and inserted inside one kernel.

- `U64Set`: nonzero 64-bit keys (exact-dedup content hashes).
- `BandTable`: a multimap from LSH band keys to 32-bit document ordinals, packed into one word:
  the band key's high 32 bits (its fingerprint, which also picks the slot) above the ordinal.
  Two different band keys can share a fingerprint (~entries / 2**32 per lookup); that only makes
  a candidate, and every candidate is checked against the document's signature or shingles.

Slot value 0 means empty; keys and fingerprints are forced nonzero. Capacities are not powers of
two (a slot is ``(hash32 * capacity) >> 32``), so a table grows by 1.5x and stays at >= 47% load:
at most ~17 bytes per entry, where power-of-two doubling may sit at 35% load (~23 bytes).
"""
from __future__ import annotations

import numba as nb
import numpy as np

from synthloop.filters.jit import kernel

_MAX_LOAD = 0.7  # linear probing: an unsuccessful lookup probes ~6 slots on average below this
_MAX_SLOTS = (1 << 32) - 1


@nb.njit
def slot_of(key, cap):
    """Home slot in [0, cap): a multiplicative hash's high 32 bits scaled to cap (no modulo)."""
    h = (key * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    return (h * np.uint64(cap)) >> np.uint64(32)


@nb.njit
def next_slot(i, cap):
    i += np.uint64(1)
    return i if i < np.uint64(cap) else np.uint64(0)


@nb.njit
def nonzero(key):
    """Keys are hashes; the one value 0 (the empty marker) is folded onto 1."""
    return key if key != np.uint64(0) else np.uint64(1)


@nb.njit
def fingerprint(key):
    """The 32-bit fingerprint of a band key that the table stores (nonzero)."""
    fp = key >> np.uint64(32)
    return fp if fp != np.uint64(0) else np.uint64(1)


@nb.njit
def set_contains(keys, key):
    i = slot_of(key, keys.size)
    while True:
        k = keys[i]
        if k == key:
            return True
        if k == 0:
            return False
        i = next_slot(i, keys.size)


@nb.njit
def set_add(keys, key):
    """Insert nonzero `key`; return True if it was new."""
    i = slot_of(key, keys.size)
    while True:
        k = keys[i]
        if k == key:
            return False
        if k == 0:
            keys[i] = key
            return True
        i = next_slot(i, keys.size)


@nb.njit
def band_add(entries, fp, doc):
    """Add (fingerprint -> doc) even if the fingerprint is present (a multimap)."""
    i = slot_of(fp, entries.size)
    while entries[i] != 0:
        i = next_slot(i, entries.size)
    entries[i] = (fp << np.uint64(32)) | np.uint64(doc)


@kernel()
def _rehash_set(keys, new_cap):
    out = np.zeros(new_cap, np.uint64)
    for k in keys:
        if k != 0:
            set_add(out, k)
    return out


@kernel()
def _rehash_bands(entries, new_cap):
    out = np.zeros(new_cap, np.uint64)
    for e in entries:
        if e != 0:
            band_add(out, e >> np.uint64(32), e & np.uint64(0xFFFFFFFF))
    return out


@kernel()
def set_query_insert(keys, new, live):
    """Keep-first over a batch: True where a live key is already present (or seen earlier in it)."""
    dup = np.zeros(new.size, np.bool_)
    added = 0
    for d in range(new.size):
        if live[d]:
            if set_add(keys, nonzero(new[d])):
                added += 1
            else:
                dup[d] = True
    return dup, added


def _capacity(need: int, cap: int) -> int:
    while need > cap * _MAX_LOAD:
        cap = cap * 3 // 2
    if cap > _MAX_SLOTS:
        raise OverflowError(f"a dedup hash table cannot hold {need:,} entries")
    return cap


class U64Set:
    """A growable set of uint64 keys (0 is folded onto 1).

    >>> s = U64Set()
    >>> s.query_insert(np.array([5, 7, 5], np.uint64)).tolist()
    [False, False, True]
    """

    def __init__(self, capacity: int = 1 << 12):
        self.keys = np.zeros(max(16, capacity), np.uint64)
        self.count = 0

    def reserve(self, extra: int) -> None:
        """Grow (by 1.5x steps) so `extra` more keys keep the load under the limit."""
        cap = _capacity(self.count + extra, self.keys.size)
        if cap != self.keys.size:
            self.keys = _rehash_set(self.keys, cap)

    def query_insert(self, keys: np.ndarray, live: np.ndarray | None = None) -> np.ndarray:
        """Duplicate flags for `keys` in order (keep-first); the new ones are inserted."""
        live = np.ones(keys.size, bool) if live is None else live
        self.reserve(int(live.sum()))
        dup, added = set_query_insert(self.keys, keys, live)
        self.count += int(added)
        return dup

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes


class BandTable:
    """LSH band fingerprint -> document ordinal multimap; kernels use ``.entries`` after `reserve`."""

    def __init__(self, capacity: int = 1 << 12):
        self.entries = np.zeros(max(16, capacity), np.uint64)
        self.count = 0

    def reserve(self, extra: int) -> None:
        cap = _capacity(self.count + extra, self.entries.size)
        if cap != self.entries.size:
            self.entries = _rehash_bands(self.entries, cap)

    @property
    def nbytes(self) -> int:
        return self.entries.nbytes

"""numba kernels with an on-disk cache that notices edits to the helpers they call.

Compiling the dedup kernels takes ~10 s of CPU; `warm_up` (``python -m synthloop.filters.jit``,
which ``make install`` runs) does it once at install time so no user command pays for it.

numba's cache (``cache=True``) saves compiling (seconds per kernel) in every new process, but it
checks only the file that defines a kernel: a kernel in minhash.py that calls a tokeniser in
normalize.py keeps running the old tokeniser after normalize.py changes. `kernel` hashes all the
dedup kernel sources once per process and drops our cached machine code when that hash changed.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numba as nb

#: Files whose numba functions call each other; an edit to any of them invalidates all.
KERNEL_FILES = ("jit.py", "hashtable.py", "normalize.py", "lsh.py", "minhash.py")

_HERE = Path(__file__).resolve().parent
_checked = False
#: Every kernel made by `kernel` (a test checks that `warm_up` compiles them all).
KERNELS: list = []


def _sources_digest() -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in KERNEL_FILES:
        path = _HERE / name
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()


def _drop_stale_cache() -> None:
    global _checked
    if _checked:
        return
    _checked = True
    cache = _HERE / "__pycache__"
    stamp = cache / "dedup-kernels.digest"
    digest = _sources_digest()
    try:
        if stamp.exists() and stamp.read_text() == digest:
            return
        for name in KERNEL_FILES:
            for f in cache.glob(f"{Path(name).stem}.*.nb[ic]"):
                f.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:
        pass  # read-only install: numba then caches under the user's cache dir, files never change


def kernel(**options):
    """``numba.njit(cache=True, **options)`` whose cache is dropped when any kernel file changed.

    Example (in one of KERNEL_FILES)::

        @kernel(parallel=True)
        def _exact_keys(data, offsets): ...
    """
    # numba keys its cache by source file, but the cached code re-imports its module by name: a
    # kernel cached while its file was imported under another name (``pytest --doctest-modules
    # filters/`` imports ``filters.minhash``) breaks every later ``synthloop.filters`` process.
    caller = sys._getframe(1).f_globals.get("__name__", "")
    if caller.startswith("synthloop.filters."):
        _drop_stale_cache()
        options = {"cache": True, **options}

    def compiled(fn):
        dispatcher = nb.njit(**options)(fn)
        KERNELS.append(dispatcher)
        return dispatcher
    return compiled


def warm_up() -> float:
    """Compile (or load from the cache) every dedup kernel on tiny inputs; returns seconds.

    >>> warm_up() >= 0
    True
    """
    import time

    import numpy as np
    import polars as pl

    from synthloop.filters.exact import ExactConfig, ExactDedup
    from synthloop.filters.lsh import jaccard_pairs
    from synthloop.filters.minhash import MinHashConfig, MinHashDedup

    t0 = time.perf_counter()
    rows = pl.DataFrame({"t": ["warm up the dedup kernels", "Warm up the dedup kernels!", "x"] * 1000,
                         "drop_reason": [None] * 3000}, schema_overrides={"drop_reason": pl.String})
    for verify in (True, False):   # 3000 rows: the hash tables grow, which compiles its rehash
        MinHashDedup(MinHashConfig(text_columns=["t"], verify=verify, ngram=2)).mark(rows)
    MinHashDedup(MinHashConfig(text_columns=["t"], shingle="char")).mark(rows.head(3))
    ExactDedup(ExactConfig(text_columns=["t"])).mark(rows)
    first = np.zeros(1, np.int64)
    jaccard_pairs(np.ones(1, np.uint64), np.array([0, 1]), first, first)   # the Ray executor's check
    return time.perf_counter() - t0


if __name__ == "__main__":
    print(f"dedup kernels ready in {warm_up():.1f}s", file=sys.stderr)

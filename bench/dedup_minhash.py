"""MinHash-LSH dedup benchmark: synthloop vs rensa and datasketch, in one process run.

    python bench/dedup_minhash.py --n 200000                 # make a corpus, run everything
    python bench/dedup_minhash.py --corpus c.parquet         # reuse a corpus (make_corpus.py format)
    python bench/dedup_minhash.py --n 1000000 --datasketch-n 20000

The corpus comes from shared/bench/make_corpus.py (planted exact and near duplicates with their
true word 5-gram Jaccard). Settings as shared/bench/baselines.py: word 5-grams, num_perm 128,
threshold 0.7; the baselines are that file's own functions. Recall counts planted duplicates
with Jaccard >= 0.7 that were dropped; false drops count originals that were dropped.
datasketch runs on the first --datasketch-n records and its rate is extrapolated (it is ~10x
slower than the others). Peak RSS of synthloop is measured in a separate subprocess that streams
the corpus from Parquet and runs nothing else, so the baselines' memory cannot pollute it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = ROOT.parent / "shared" / "bench"
THRESHOLD, NUM_PERM, NGRAM = 0.7, 128, 5
COLUMNS = ["instruction", "response"]


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss into a
    child across fork + exec, so a subprocess started by a big parent would report the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load_baselines():
    spec = importlib.util.spec_from_file_location("baselines", SHARED_BENCH / "baselines.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dedup(batches) -> tuple[np.ndarray, float, object]:
    """Run synthloop's stage over DataFrame batches; (keep flags, seconds, the dedup object)."""
    from synthloop.filters.minhash import MinHashConfig, MinHashDedup

    dd = MinHashDedup(MinHashConfig(text_columns=COLUMNS, threshold=THRESHOLD, num_perm=NUM_PERM,
                                    ngram=NGRAM))
    warm = pl.DataFrame({"instruction": ["warm up the kernels"], "response": ["once"],
                         "drop_reason": [None]}, schema_overrides={"drop_reason": pl.String})
    t0 = time.perf_counter()
    dd.mark(warm)   # compile / load cached machine code outside the timing
    dd.reset()
    dd.warmup_seconds = time.perf_counter() - t0
    keep, t0 = [], time.perf_counter()
    for b in batches:
        b = b.with_columns(pl.lit(None, pl.String).alias("drop_reason"))
        keep.append(dd.mark(b)["drop_reason"].is_null().to_numpy())
    return np.concatenate(keep), time.perf_counter() - t0, dd


def _score(keep: np.ndarray, truth: pl.DataFrame) -> tuple[float, float]:
    planted = (truth["dup_of"].is_not_null() & (truth["jaccard"] >= THRESHOLD)).to_numpy()
    orig = truth["dup_of"].is_null().to_numpy()
    keep = np.asarray(keep, bool)
    return float((~keep & planted).sum() / max(planted.sum(), 1)), float((~keep & orig).sum() / max(orig.sum(), 1))


def ours_only(corpus: str, batch_rows: int) -> None:
    """Subprocess mode: stream the corpus from Parquet through our stage, print JSON with peak RSS."""
    lf = pl.scan_parquet(corpus).select(COLUMNS)
    keep, secs, dd = _dedup(lf.collect_batches(chunk_size=batch_rows))   # batches read lazily
    rss = peak_rss_mb()
    np.save(Path(corpus).with_suffix(".keep.npy"), keep)
    print(json.dumps({"n": int(keep.size), "seconds": secs, "warmup": dd.warmup_seconds, "maxrss_mb": rss,
                      "index_mb": dd.index.nbytes / 2**20, "bands": dd.bands, "rows": dd.rows}))


def make_corpus(n: int, out: Path, seed: int) -> None:
    script = SHARED_BENCH / "make_corpus.py"
    if not script.exists():
        sys.exit(f"error: {script} not found; pass --corpus")
    subprocess.run([sys.executable, str(script), str(n), str(out), "--seed", str(seed)], check=True)
    # smaller row groups so the streaming reader holds ~50k rows at a time, not 262k
    tmp = out.with_suffix(".tmp.parquet")
    pl.read_parquet(out).write_parquet(tmp, row_group_size=50_000)
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="corpus size to generate")
    ap.add_argument("--corpus", help="existing corpus Parquet (make_corpus.py columns)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-rows", type=int, default=50_000)
    ap.add_argument("--datasketch-n", type=int, default=20_000)
    ap.add_argument("--skip-rensa", action="store_true")
    ap.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ours_only:
        return ours_only(a.corpus, a.batch_rows)

    tmp = tempfile.TemporaryDirectory(prefix="dedup-bench-")
    corpus = Path(a.corpus) if a.corpus else Path(tmp.name) / f"corpus-{a.n}.parquet"
    if not a.corpus:
        t = time.perf_counter()
        make_corpus(a.n, corpus, a.seed)
        print(f"corpus: {a.n:,} records from make_corpus.py in {time.perf_counter() - t:.1f}s -> {corpus}")
    df = pl.read_parquet(corpus)
    n = df.height
    words = df.select((pl.col("instruction") + " " + pl.col("response")).str.split(" ").list.len().mean()).item()
    print(f"records={n:,} mean words={words:.0f} planted near/exact={df['dup_of'].is_not_null().sum():,} "
          f"(J>=0.7: {((df['jaccard'] >= THRESHOLD).fill_null(False)).sum():,})")

    rows = []
    keep, secs, dd = _dedup(df.select(COLUMNS).iter_slices(a.batch_rows))
    rec, fd = _score(keep, df)
    rows.append(("synthloop", n, secs, rec, fd))
    print(f"synthloop: bands={dd.bands} rows={dd.rows} index={dd.index.nbytes / 2**20:.0f} MiB")

    base = _load_baselines()
    texts = (df["instruction"] + " " + df["response"]).to_list()
    if not a.skip_rensa:
        t = time.perf_counter()
        k = base.run_rensa(texts)
        rows.append(("rensa", n, time.perf_counter() - t, *_score(np.array(k), df)))
    m = min(a.datasketch_n, n)
    t = time.perf_counter()
    k = base.run_datasketch(texts[:m])
    rows.append(("datasketch", m, time.perf_counter() - t, *_score(np.array(k), df.head(m))))
    sub_keep, sub_secs, _ = _dedup(df.select(COLUMNS).head(m).iter_slices(a.batch_rows))
    rows.append(("synthloop (same subsample)", m, sub_secs, *_score(sub_keep, df.head(m))))

    print(f"\n{'impl':<28}{'records':>10}{'seconds':>9}{'rec/s':>11}{'recall':>8}{'false_drop':>12}")
    for name, cnt, s, r, f in rows:
        print(f"{name:<28}{cnt:>10,}{s:>9.2f}{cnt / s:>11,.0f}{r:>8.4f}{f:>12.5f}")
    ours = n / secs
    for name, cnt, s, *_ in (r for r in rows if r[0] in ("rensa", "datasketch")):
        print(f"ratio synthloop/{name}: {ours / (cnt / s):.1f}x records/s"
              + (" (datasketch rate extrapolated from its subsample)" if name == "datasketch" else ""))

    proc = subprocess.run([sys.executable, __file__, "--ours-only", "--corpus", str(corpus),
                           "--batch-rows", str(a.batch_rows)], capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    sub = np.load(corpus.with_suffix(".keep.npy"))
    r2, f2 = _score(sub, df)
    print(f"\nsynthloop alone in a subprocess, streaming {res['n']:,} records from Parquet: "
          f"peak RSS {res['maxrss_mb']:.0f} MiB (index {res['index_mb']:.0f} MiB), "
          f"{res['n'] / res['seconds']:,.0f} rec/s including the Parquet reads (kernel load/compile "
          f"before it: {res['warmup']:.1f}s), recall={r2:.4f} false_drop={f2:.5f}")
    print(f"main process peak RSS (corpus, baselines and all): {peak_rss_mb():.0f} MiB")
    corpus.with_suffix(".keep.npy").unlink(missing_ok=True)


if __name__ == "__main__":
    main()

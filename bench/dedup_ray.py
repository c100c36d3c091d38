"""MinHash dedup on a local Ray cluster against the local executor, in one bench run.

    python bench/dedup_ray.py --n 1000000            # corpus from shared/bench/make_corpus.py
    python bench/dedup_ray.py --corpus c.parquet --cpus 1,2

Each run is `synthloop dedup CORPUS --method minhash` (defaults: threshold 0.7, 128 permutations,
word 5-grams, exact verification) in a fresh subprocess: the local executor, then Ray with a new
local cluster of 1 and 2 CPUs (``ray.init(num_cpus=N)``; its start-up is timed apart). Every run
must keep exactly the local executor's rows; recall and false drops are scored on the corpus's
planted duplicates. Ratios are Ray's dedup time over the local executor's, measured in this run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from dedup_minhash import THRESHOLD, make_corpus  # noqa: E402


def one(corpus: str, out: str, executor: str, cpus: int, batch: int) -> None:
    """Subprocess mode: one dedup run; prints JSON (seconds, cluster start, summary)."""
    from synthloop.filters.dedup_cli import main as dedup_main

    start = 0.0
    if executor == "ray":
        import ray
        t = time.perf_counter()
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        start = time.perf_counter() - t
    t = time.perf_counter()
    rc = dedup_main([corpus, "--out", out, "--quiet", "--method", "minhash", "--text-columns",
                     "instruction,response", "--executor", executor, "--batch-size", str(batch)])
    secs = time.perf_counter() - t
    summary = json.loads((Path(out) / "summary.json").read_text())
    print(json.dumps({"rc": rc, "seconds": secs, "cluster_start": start, "summary": summary}))


def _kept_rows(out: Path) -> np.ndarray:
    return np.sort(pl.read_parquet(out / "kept-*.parquet", columns=["row"])["row"].to_numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--corpus")
    ap.add_argument("--seed", type=int, default=20261202, help="corpus seed (not one the other benches use)")
    ap.add_argument("--cpus", default="1,2", help="Ray cluster sizes to run")
    ap.add_argument("--batch-rows", type=int, default=50_000, help="rows per piece / batch")
    ap.add_argument("--one", nargs=4, metavar=("CORPUS", "OUT", "EXECUTOR", "CPUS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(a.one[0], a.one[1], a.one[2], int(a.one[3]), a.batch_rows)

    tmp = Path(tempfile.mkdtemp(prefix="dedup-ray-bench-"))
    corpus = Path(a.corpus) if a.corpus else tmp / f"corpus-{a.n}.parquet"
    if not a.corpus:
        make_corpus(a.n, corpus, a.seed)
    truth = pl.read_parquet(corpus, columns=["row", "dup_of", "jaccard"])
    planted = (truth["dup_of"].is_not_null() & (truth["jaccard"] >= THRESHOLD)).to_numpy()
    orig = truth["dup_of"].is_null().to_numpy()
    print(f"corpus: {truth.height:,} records, {planted.sum():,} planted duplicates with J >= {THRESHOLD}")

    runs = [("local", 0)] + [("ray", int(c)) for c in a.cpus.split(",")]
    rows, ref = [], None
    for executor, cpus in runs:
        out = tmp / f"out-{executor}-{cpus}"
        proc = subprocess.run([sys.executable, __file__, "--batch-rows", str(a.batch_rows), "--one",
                               str(corpus), str(out), executor, str(cpus)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{executor} {cpus}: failed\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        kept = _kept_rows(out)
        keep = np.isin(truth["row"].to_numpy(), kept)
        same = "reference" if ref is None else ("same" if np.array_equal(kept, ref) else "DIFFERENT")
        ref = kept if ref is None else ref
        rec = float((~keep & planted).sum() / planted.sum())
        fd = float((~keep & orig).sum() / orig.sum())
        rows.append((executor, cpus, res, rec, fd, same))
        print(f"{executor} cpus={cpus or '-'}: {res['seconds']:.1f}s {json.dumps(res['summary'].get('ray', {}))}",
              flush=True)

    base = rows[0][2]["seconds"]
    n = truth.height
    print(f"\n{'executor':<10}{'cpus':>5}{'seconds':>9}{'rec/s':>10}{'vs local':>10}{'cluster start':>15}"
          f"{'recall':>8}{'false_drop':>12}  kept rows")
    for executor, cpus, res, rec, fd, same in rows:
        print(f"{executor:<10}{cpus or '':>5}{res['seconds']:>9.1f}{n / res['seconds']:>10,.0f}"
              f"{res['seconds'] / base:>9.2f}x{res['cluster_start']:>14.1f}s{rec:>8.4f}{fd:>12.5f}  {same}")
    ray_rows = {r[1]: r[2]["seconds"] for r in rows if r[0] == "ray"}
    if 1 in ray_rows and 2 in ray_rows:
        print(f"ray scaling 1 -> 2 cpus: {ray_rows[1] / ray_rows[2]:.2f}x faster")


if __name__ == "__main__":
    main()

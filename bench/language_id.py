"""Language ID overhead: what filling `language` at commit adds to a heuristics-only pipeline.

    python bench/language_id.py --n 10000 --repeat 3

Records: the bundled seed tasks and the German + English test seeds (instruction + worked answer),
repeated with a numbered suffix until there are --n distinct ones. The pipeline is a real run:
`seeds` source -> `heuristics` -> commit (shards, rejects, manifest), sequential executor.
Measured in the same process, alternating, best of --repeat:

- with language ID: the records arrive without a language; the commit step detects every one;
- baseline: the same records already carrying a language (read back from the first run's
  shards), so the commit step has nothing to detect. Everything else is the same code path.

Printed: process CPU seconds of both (all threads), the overhead ratio (goal: <= 10%), and the
commit step's added work alone (`fill_language` on the same records, best of --repeat) against
the baseline: the pipeline difference is the difference of two noisy totals, this one is not.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
[run]
name = "langid-bench"
limit = 0
shard_rows = 2000
cache = "off"
executor = "sequential"

[llm.generator]
backend = "transformers"

[seeds]
path = "{seeds}"

[source]
type = "seeds"
batch_size = 500

[[stages]]
type = "heuristics"
"""


def records(n: int) -> pl.DataFrame:
    from synthloop.core.schema import make_batch
    from synthloop.seeds.loaders import load_seeds
    base = pl.concat([load_seeds("bundled").records, load_seeds(ROOT / "tests/data/seeds_en_de.jsonl").records])
    base = base.select("instruction", "input", "response").rows()
    rows = []
    for i in range(n):
        ins, inp, resp = base[i % len(base)]
        rows.append({"instruction": f"{ins} ({i // len(base) + 1})", "input": inp, "response": resp})
    return make_batch(rows)


def run_once(seeds: Path, out: Path) -> float:
    from synthloop.core.config import parse_config
    from synthloop.engine.runner import execute
    cfg = parse_config(CONFIG.format(seeds=seeds), path="bench.toml")
    start = time.process_time()
    m = execute(cfg, out=out, show_progress=False)
    cpu = time.process_time() - start
    assert m["complete"], m
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()

    from synthloop.filters.language import fill_language
    from synthloop.outputs.run_reader import read_kept

    with tempfile.TemporaryDirectory(prefix="langid-bench-") as tmp:
        tmp = Path(tmp)
        recs = records(a.n)
        plain = tmp / "plain.parquet"
        recs.write_parquet(plain)
        # Warm-up: imports, the fastText model, the heuristics' regexes; gives the detected languages.
        run_once(plain, tmp / "warm")
        detected = read_kept(tmp / "warm")
        assert detected["language"].null_count() == 0 and detected.height == recs.height
        tagged = tmp / "tagged.parquet"          # the same rows in the same order, labelled
        recs.with_columns(recs.select("id").join(detected.select("id", "language"), on="id", how="left",
                                                 maintain_order="left")["language"]).write_parquet(tagged)
        run_once(tagged, tmp / "warm-tagged")

        with_lid, base = [], []
        for r in range(a.repeat):
            with_lid.append(run_once(plain, tmp / f"lid-{r}"))
            base.append(run_once(tagged, tmp / f"base-{r}"))
        alone = []
        for _ in range(a.repeat):
            start = time.process_time()
            fill_language(recs)
            alone.append(time.process_time() - start)
        alone = min(alone)

    kept = detected.height
    langs = detected["language"].struct.field("code").value_counts().sort("count", descending=True).rows()
    t_lid, t_base = min(with_lid), min(base)
    print(f"records {a.n:,} (kept by heuristics {kept:,}; languages {dict(langs)}), cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print(f"{'pipeline':34s} {'cpu s (best of ' + str(a.repeat) + ')':>22s}  runs")
    print(f"{'heuristics only (baseline)':34s} {t_base:22.3f}  {' '.join(f'{x:.3f}' for x in base)}")
    print(f"{'heuristics + language ID at commit':34s} {t_lid:22.3f}  {' '.join(f'{x:.3f}' for x in with_lid)}")
    print(f"language ID alone (fill_language) on the same {a.n:,} records: {alone:.3f} cpu s "
          f"({alone / a.n * 1e6:.1f} us/record)")
    print(f"ratio language ID / baseline: +{(t_lid - t_base) / t_base:.1%} "
          f"(language ID alone: +{alone / t_base:.1%}; goal <= 10%)")


if __name__ == "__main__":
    main()

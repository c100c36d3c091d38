"""Embedding dedup overhead: streaming semantic dedup vs the raw `encode` of the same texts.

    python bench/embed_dedup.py --n 600 --batch-rows 300 --repeat 2

Texts are the first --n records of a make_corpus.py corpus (generated if --corpus is not given),
instruction + response as the stage joins them. Both sides use the same process-wide encoder and
encode batch size. Raw encode is timed twice: as one `model.encode(texts)` call (it sorts a call's
texts by length, so this is the best case) and as one call per stage batch (what the stage itself
must do, so the difference to the stage is the dedup's own overhead). Reported: seconds, texts/s
and the overhead % of the stage (stream and semdedup modes) over both.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = ROOT.parent / "shared" / "bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--corpus", help="existing make_corpus.py Parquet")
    ap.add_argument("--batch-rows", type=int, default=300, help="rows per stage batch")
    ap.add_argument("--encode-batch-size", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()

    from synthloop.filters.embed_dedup import SemanticConfig, SemanticDedup, embed, encoder
    from synthloop.filters.normalize import joined_text

    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        corpus = a.corpus
        if not corpus:
            corpus = str(Path(tmp) / "corpus.parquet")
            subprocess.run([sys.executable, str(SHARED_BENCH / "make_corpus.py"), str(a.n), corpus], check=True)
        df = pl.read_parquet(corpus).head(a.n).select("instruction", "response")
    df = df.with_columns(pl.lit(None, pl.String).alias("drop_reason"))
    texts = joined_text(df, ["instruction", "response"]).to_list()
    t = time.perf_counter()
    model = encoder()
    print(f"encoder loaded once in {time.perf_counter() - t:.1f}s; {len(texts):,} texts, "
          f"threads={__import__('torch').get_num_threads()}")
    embed(texts[:64], model=model, batch_size=a.encode_batch_size)   # warm-up outside the timings

    batches = list(df.iter_slices(a.batch_rows))
    runs: dict[str, list[float]] = {}
    dropped: dict[str, int] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        runs.setdefault(name, []).append(time.perf_counter() - t)
        return out

    def stage(mode):
        dd = SemanticDedup(SemanticConfig(text_columns=["instruction", "response"], threshold=a.threshold,
                                          mode=mode, encode_batch_size=a.encode_batch_size))
        return sum(int(dd.mark(b)["drop_reason"].is_not_null().sum()) for b in batches)

    # alternate the sides and keep each one's best time: a shared machine's load drifts
    for _ in range(a.repeat):
        timed("encode, one call", lambda: embed(texts, model=model, batch_size=a.encode_batch_size))
        timed("encode, per stage batch", lambda: [embed(joined_text(b, ["instruction", "response"]).to_list(),
                                                         model=model, batch_size=a.encode_batch_size)
                                                   for b in batches])
        dropped["stream"] = timed("semantic_dedup stream", lambda: stage("stream"))
        dropped["semdedup"] = timed("semantic_dedup semdedup", lambda: stage("semdedup"))
    best = {k: min(v) for k, v in runs.items()}
    raw, raw_b = best["encode, one call"], best["encode, per stage batch"]
    print(f"{len(texts):,} texts in stage batches of {a.batch_rows}; best of {a.repeat} alternating runs")
    for name, secs in best.items():
        line = f"{name:<26}{secs:8.2f}s {len(texts) / secs:7.1f} texts/s"
        if name.startswith("semantic"):
            mode = name.split()[-1]
            line += (f"  dropped {dropped[mode]:>4}  overhead vs encode one call {100 * (secs - raw) / raw:+.1f}%"
                     f", vs encode per batch {100 * (secs - raw_b) / raw_b:+.1f}%")
        print(line)

if __name__ == "__main__":
    main()

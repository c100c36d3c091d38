"""`synthloop export`: a run's committed data in the shapes other trainers read.

    synthloop export --format sft|dpo|alpaca|sharegpt RUN_DIR --out DIR

RUN_DIR is a run directory or a rounds directory (every round's data). Formats:

| format | file | columns / shape |
|---|---|---|
| sft | ``sft-00000.parquet`` | ``messages`` (user + assistant turns), ``id`` |
| dpo | ``pairs-00000.parquet`` | ``prompt``, ``chosen``, ``rejected`` as chat messages (TRL's conversational preference format), ``id``, ``chosen_verified``, ``rejected_verified`` |
| alpaca | ``alpaca.json`` | ``[{instruction, input, output}]`` |
| sharegpt | ``sharegpt.json`` | ``[{conversations: [{from: human, value}, {from: gpt, value}]}]`` |

Preference pairs come from rejection sampling (generator/rejection.py): the chosen answer is a
kept row that passed every constraint; the rejected one is a sample of the same task (same ``id``)
dropped as ``failed_check``, the one that followed the most constraints (a near miss teaches the
constraint, not a style; ties: the first sampled). Tasks without a failed sample give no pair.

Every file is written under a temporary name and renamed, so an interrupted export leaves either
the old file or the new one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl

from synthloop.core.schema import MESSAGE
from synthloop.outputs.run_reader import read_kept, read_rejects, run_dirs
from synthloop.outputs.shards import write_bytes_atomic, write_parquet_atomic

FORMATS = ("sft", "dpo", "alpaca", "sharegpt")
CHAT = pl.List(MESSAGE)
PAIRS = pl.Schema({"id": pl.String, "prompt": CHAT, "chosen": CHAT, "rejected": CHAT,
                   "chosen_verified": pl.Float64, "rejected_verified": pl.Float64})


def _kept(run_dir: Path) -> pl.DataFrame:
    return pl.concat([read_kept(d) for _, d in run_dirs(run_dir)], how="vertical")


def preference_pairs(run_dir: str | Path) -> pl.DataFrame:
    """One (prompt, chosen, rejected) row per kept task that also has a failed sample.

    >>> preference_pairs("runs/verified/round-00").columns       # doctest: +SKIP
    ['id', 'prompt', 'chosen', 'rejected', 'chosen_verified', 'rejected_verified']
    """
    frames = []
    for _, d in run_dirs(Path(run_dir)):
        kept = read_kept(d).filter(pl.col("scores").struct.field("verified_all").fill_null(False))
        rej = (read_rejects(d).filter(pl.col("drop_reason") == "failed_check")
               .with_row_index("order")
               .with_columns(pl.col("scores").struct.field("verified").fill_null(0.0).alias("v"))
               .sort(["id", "v", "order"], descending=[False, True, False])
               .unique(subset="id", keep="first", maintain_order=True))
        frames.append(kept.join(rej.select("id", pl.col("response").alias("rej"), "v"), on="id", how="inner"))
    joined = pl.concat(frames, how="vertical") if frames else pl.DataFrame()
    if joined.is_empty():
        return pl.DataFrame(schema=PAIRS)
    rows = [{"id": r["id"], "prompt": r["messages"][:1],
             "chosen": [{"role": "assistant", "content": r["response"]}],
             "rejected": [{"role": "assistant", "content": r["rej"]}],
             "chosen_verified": r["scores"]["verified"], "rejected_verified": r["v"]}
            for r in joined.iter_rows(named=True)]
    return pl.DataFrame(rows, schema=PAIRS)


def _write_json(items: list, path: Path) -> None:
    write_bytes_atomic(json.dumps(items, ensure_ascii=False, indent=1).encode("utf-8"), path)


def export(run_dir: str | Path, fmt: str, out: str | Path) -> dict:
    """Write `run_dir`'s data as `fmt` into folder `out`; returns {"format", "path", "rows"}.

    >>> export("runs/quickstart", "alpaca", "exports/quickstart")     # doctest: +SKIP
    {'format': 'alpaca', 'path': 'exports/quickstart/alpaca.json', 'rows': 69}
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}' (one of {', '.join(FORMATS)})")
    run_dir, out = Path(run_dir), Path(out)
    if fmt == "dpo":
        frame = preference_pairs(run_dir)
    else:
        frame = _kept(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "dpo":
        path = out / "pairs-00000.parquet"
        write_parquet_atomic(frame, path)
    elif fmt == "sft":
        path = out / "sft-00000.parquet"
        write_parquet_atomic(frame.select("id", "messages"), path)
    elif fmt == "alpaca":
        path = out / "alpaca.json"
        _write_json([{"instruction": i, "input": x, "output": y}
                     for i, x, y in frame.select("instruction", "input", "response").iter_rows()], path)
    else:
        path = out / "sharegpt.json"
        _write_json([{"conversations": [{"from": "human", "value": m[0]["content"]},
                                        {"from": "gpt", "value": m[1]["content"]}]}
                     for m in frame["messages"].to_list() if len(m) >= 2], path)
    return {"format": fmt, "path": str(path), "rows": frame.height}


def _export(args) -> int:
    try:
        res = export(args.run_dir, args.format, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


def add_parser(subparsers) -> None:
    """Register `export` on the main parser's subparsers.

    >>> import argparse; sub = argparse.ArgumentParser().add_subparsers(); add_parser(sub)
    """
    p = subparsers.add_parser("export", help="write a run's data as SFT, DPO pairs, Alpaca or ShareGPT")
    p.add_argument("run_dir", help="a run directory, or a rounds directory with round-NN/ run directories")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="folder to write into")
    p.set_defaults(fn=_export)

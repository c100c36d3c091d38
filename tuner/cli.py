"""The `synthloop train` and `synthloop eval` subcommands (wired in through SUBCOMMAND_MODULES).

    synthloop train DATA... --out ADAPTER [--config train.toml] [--max-steps N] [--lr X] ...
    synthloop eval --adapter ADAPTER [--previous ADAPTER] [--heldout FILE] [--judge BACKEND:MODEL]

DATA are run directories (committed shards), rounds directories, folders of Parquet shards or
Parquet files. Both print one JSON object.
"""
from __future__ import annotations

import dataclasses
import json
import sys

#: command-line flag -> TrainConfig field (flags override the --config file).
OVERRIDES = {"base_model": str, "init_adapter": str, "max_steps": int, "epochs": float, "learning_rate": float,
             "batch_size": int, "grad_accum": int, "max_length": int, "lora_r": int, "lora_alpha": int,
             "seed": int}


def _train(args) -> int:
    from synthloop.tuner.sft import TrainConfig, load_train_config, summarize, train

    try:
        cfg = load_train_config(args.config) if args.config else TrainConfig()
        changes = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
        cfg = dataclasses.replace(cfg, **changes)   # replace() re-runs the validation
        metrics = train(cfg, args.data, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"adapter": args.out, **summarize(metrics)}))
    return 0


def _eval(args) -> int:
    from synthloop.generator.llm import BackendSpec
    from synthloop.tuner.evaluate import evaluate

    judge = None
    if args.judge:
        backend, _, model = args.judge.partition(":")
        options = {"base_url": args.judge_base_url} if args.judge_base_url else {}
        judge = BackendSpec(backend=backend, model=model or "embedded", options=options)
    try:
        res = evaluate(base_model=args.base_model, adapter=args.adapter, previous_adapter=args.previous,
                       heldout=args.heldout, judge=judge, limit=args.limit, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


def add_parser(subparsers) -> None:
    """Register `train` and `eval`.

    >>> import argparse; sub = argparse.ArgumentParser().add_subparsers(); add_parser(sub)
    """
    t = subparsers.add_parser("train", help="LoRA-train the student on curated shards")
    t.add_argument("data", nargs="+", help="run directories, rounds directories, Parquet folders or files")
    t.add_argument("--out", required=True, help="adapter folder to write (atomically)")
    t.add_argument("--config", help="TOML file with a [train] table (TrainConfig fields)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing adapter folder")
    for name, typ in OVERRIDES.items():
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None)
    t.set_defaults(fn=_train)
    e = subparsers.add_parser("eval", help="held-out loss (and judged win-rate) of a student")
    e.add_argument("--base-model", default="embedded")
    e.add_argument("--adapter", help="the new student's adapter (default: the base model)")
    e.add_argument("--previous", help="the previous student's adapter (default: the base model)")
    e.add_argument("--heldout", help="JSONL of instruction/input/output (default: the bundled set)")
    e.add_argument("--judge", help="BACKEND:MODEL of the judge, e.g. openai:my-judge (no judge: loss only)")
    e.add_argument("--judge-base-url", help="server URL for an openai judge")
    e.add_argument("--limit", type=int, help="use only the first N held-out pairs")
    e.add_argument("--seed", type=int, default=0, help="seed of the A/B order")
    e.set_defaults(fn=_eval)

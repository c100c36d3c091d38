"""The `synthloop train` and `synthloop eval` subcommands (wired in through SUBCOMMAND_MODULES).

    synthloop train DATA... --out ADAPTER [--config train.toml] [--max-steps N] [--lr X] ...
    synthloop eval --adapter ADAPTER [--previous ADAPTER] [--heldout FILE] [--judge BACKEND:MODEL]
    synthloop eval --benchmark ifeval [FILE.jsonl] [--adapter ADAPTER] [--backend vllm] [--limit N]
                   [--check ID=module:function ...] [--responses OUT.jsonl]

DATA are run directories (committed shards), rounds directories, folders of Parquet shards or
Parquet files. All print one JSON object; `eval --benchmark` also prints its per-instruction
table to stderr.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

#: command-line flag -> TrainConfig field (flags override the --config file).
OVERRIDES = {"base_model": str, "init_adapter": str, "max_steps": int, "epochs": float, "learning_rate": float,
             "batch_size": int, "grad_accum": int, "max_length": int, "lora_r": int, "lora_alpha": int,
             "seed": int, "method": str, "beta": float}


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


#: eval flags that only mean something with --benchmark, and those that mean nothing with it.
BENCHMARK_ONLY = ("check", "responses", "backend", "base_url")
HELDOUT_ONLY = ("previous", "heldout", "judge", "judge_base_url")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_backend() -> str:
    """vllm where it is installed (find_spec imports nothing), else transformers."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


def _benchmark(args) -> int:
    """`eval --benchmark ifeval [FILE]`: IFEval-style accuracies of base + adapter."""
    from synthloop.filters.checks import register_check
    from synthloop.core.llm import BackendSpec
    from synthloop.tuner.benchmark import evaluate_benchmark, format_table, write_responses

    name, *rest = args.benchmark
    try:
        if name != "ifeval" or len(rest) > 1:
            raise ValueError(f"--benchmark takes 'ifeval' and an optional file, got {' '.join(args.benchmark)}")
        if args.responses and not Path(args.responses).resolve().parent.is_dir():
            raise ValueError(f"--responses: folder {Path(args.responses).parent} does not exist")
        for spec in args.check or []:
            cid, eq, target = spec.partition("=")
            if not eq or not cid or not target:
                raise ValueError(f"--check '{spec}' must be ID=module:function")
            register_check(cid, target)
        options = {"base_url": args.base_url} if args.base_url else {}
        student = BackendSpec(backend=args.backend or _default_backend(), model=args.base_model, options=options)
        res = evaluate_benchmark(path=rest[0] if rest else None, base_model=args.base_model, adapter=args.adapter,
                                 student=student, limit=args.limit)
    except (ValueError, FileNotFoundError) as e:     # BenchmarkError and CheckError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    per_prompt = res.pop("per_prompt")
    print(format_table(res), file=sys.stderr)
    if args.responses:
        write_responses(args.responses, per_prompt)
    print(json.dumps({**res, "backend": student.backend}))
    return 0


def _eval(args) -> int:
    from synthloop.core.llm import BackendSpec

    wrong = [_flag(k) for k in (HELDOUT_ONLY if args.benchmark else BENCHMARK_ONLY) if getattr(args, k)]
    if wrong:
        print(f"error: {', '.join(wrong)} " + ("cannot be used with --benchmark" if args.benchmark
                                               else "only with --benchmark"), file=sys.stderr)
        return 2
    if args.benchmark:
        return _benchmark(args)
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
    e = subparsers.add_parser("eval", help="held-out loss (and judged win-rate), or a benchmark, of a student")
    e.add_argument("--base-model", default="embedded")
    e.add_argument("--adapter", help="the new student's adapter (default: the base model)")
    e.add_argument("--previous", help="the previous student's adapter (default: the base model)")
    e.add_argument("--heldout", help="JSONL of instruction/input/output (default: the bundled set)")
    e.add_argument("--judge", help="BACKEND:MODEL of the judge, e.g. openai:my-judge (no judge: loss only)")
    e.add_argument("--judge-base-url", help="server URL for an openai judge")
    e.add_argument("--limit", type=int, help="use only the first N held-out pairs (or benchmark prompts)")
    e.add_argument("--seed", type=int, default=0, help="seed of the A/B order")
    e.add_argument("--benchmark", nargs="+", metavar=("ifeval", "FILE.jsonl"),
                   help="'ifeval' [FILE.jsonl in IFEval's input format] (default: the bundled prompts)")
    e.add_argument("--backend", choices=("transformers", "vllm", "openai"),
                   help="how the student answers the benchmark (default: vllm if installed, else transformers)")
    e.add_argument("--base-url", help="server URL for an openai student")
    e.add_argument("--check", action="append", metavar="ID=module:function",
                   help="register a custom check fn(response, **kwargs) -> bool (repeatable)")
    e.add_argument("--responses", metavar="OUT.jsonl",
                   help="write one JSON line per benchmark prompt: key, prompt, response, strict, loose")
    e.set_defaults(fn=_eval)

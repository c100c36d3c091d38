"""The `synthloop` command.

    synthloop run CONFIG.toml [--out DIR] [--limit N]   grow a dataset (resumes if DIR has a run)
    synthloop rounds CONFIG.toml [--out DIR]            self-improvement rounds (engine/rounds.py)
      (both: [--executor pipelined|sequential|ray] [--address HEAD:PORT])
    synthloop models prepare [--force]                 write the embedded model to the local cache
    synthloop seeds check PATH [--format F]            validate a seed file
    synthloop dedup | score | select IN... --out DIR   filters on your own data (filters/*_cli.py)
    synthloop report RUN_DIR                           HTML report and dataset card
    synthloop export --format F RUN_DIR --out DIR      SFT / DPO pairs / Alpaca / ShareGPT files

Bad input exits 2 with one line naming the file, line and field; an interrupted run exits 130
after committing what it had.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import signal
import sys

#: Modules that add their own subcommands through `add_parser(subparsers)`.
SUBCOMMAND_MODULES: list[str] = [
    "synthloop.filters.dedup_cli",     # synthloop dedup
    "synthloop.filters.score_cli",     # synthloop score, synthloop select
    "synthloop.outputs.report_cli",    # synthloop report
    "synthloop.outputs.export",        # synthloop export
    "synthloop.tuner.cli",             # synthloop train, synthloop eval
]


def _run(args) -> int:
    from synthloop.core.config import load_config
    from synthloop.engine.logs import engine_logs
    from synthloop.engine.runner import execute

    cfg = load_config(args.config)
    _place(cfg.run, args)
    run_dir = args.out or cfg.run.out or f"runs/{cfg.run.name}"
    with engine_logs(run_dir, verbose=args.verbose):
        manifest = execute(cfg, out=args.out, limit=args.limit, show_progress=not args.quiet)
    kept = manifest["stages"][-1]["kept"] if manifest.get("stages") else 0
    print(json.dumps({"run_dir": str(run_dir), "records": kept,
                      "shards": len(manifest["shards"]), "rejected": sum(s["dropped_total"] for s in manifest["stages"]),
                      "complete": manifest["complete"]}))
    return 0


def _rounds(args) -> int:
    from synthloop.engine.logs import engine_logs
    from synthloop.engine.rounds import load_rounds_config, run_rounds

    cfg = load_rounds_config(args.config)
    _place(cfg.run.run, args)
    with engine_logs(args.out or cfg.run.run.out or f"runs/{cfg.run.run.name}", verbose=args.verbose):
        entries = run_rounds(cfg, args.out, show_progress=not args.quiet)
    print(json.dumps([{"round": e["round"], "records": e.get("records"), "loss": e["eval"].get("loss"),
                       "previous_loss": e["eval"].get("previous_loss"), "win_rate": e["eval"].get("win_rate")}
                      for e in entries]))
    return 0


def _place(run, args) -> None:
    """--executor and --address override the config's [run] executor and [run.ray] address."""
    if args.executor:
        run.executor = args.executor
    if args.address:
        run.ray = {**run.ray, "address": args.address}


def _executor_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=["pipelined", "sequential", "ray"],
                   help="where the work runs (default: [run] executor, else pipelined)")
    p.add_argument("--address", help="with --executor ray: the cluster to join, e.g. HEAD_IP:6379 "
                                     "(default: [run.ray] address, $RAY_ADDRESS, a cluster on this machine, else a new one)")


def _models(args) -> int:
    from synthloop.core.models import prepare_embedded

    print(prepare_embedded(force=args.force))
    return 0


def _seeds(args) -> int:
    from synthloop.seeds.loaders import load_seeds

    seeds = load_seeds(args.path, format=args.format)
    print(f"{args.path}: {len(seeds)} seed records ({len(seeds.classification)} classification)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synthloop", description="Grow seed tasks into curated instruction data.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) a pipeline config")
    r.add_argument("config")
    r.add_argument("--out", help="run directory (default: [run] out, else runs/<name>)")
    r.add_argument("--limit", type=int, help="stop once this many records are kept")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--verbose", action="store_true", help="also show engine logs (always in RUN_DIR/engine.log)")
    _executor_flags(r)
    r.set_defaults(fn=_run)
    rr = sub.add_parser("rounds", help="self-improvement rounds: generate, curate, LoRA-train, evaluate")
    rr.add_argument("config")
    rr.add_argument("--out", help="rounds directory (default: [run] out, else runs/<name>)")
    rr.add_argument("--quiet", action="store_true")
    rr.add_argument("--verbose", action="store_true", help="also show engine logs (always in OUT/engine.log)")
    _executor_flags(rr)
    rr.set_defaults(fn=_rounds)
    m = sub.add_parser("models", help="manage the embedded model")
    msub = m.add_subparsers(dest="action", required=True)
    mp = msub.add_parser("prepare", help="convert the bundled SmolLM2 GGUF to a local HF folder")
    mp.add_argument("--force", action="store_true")
    mp.set_defaults(fn=_models)
    s = sub.add_parser("seeds", help="seed files")
    ssub = s.add_subparsers(dest="action", required=True)
    sc = ssub.add_parser("check", help="load and validate a seed file")
    sc.add_argument("path")
    sc.add_argument("--format", default="auto")
    sc.set_defaults(fn=_seeds)
    for mod in SUBCOMMAND_MODULES:
        importlib.import_module(mod).add_parser(sub)
    return p


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from synthloop.core.config import ConfigError
    from synthloop.outputs.paths import UnsafePath
    from synthloop.outputs.run_store import ConfigMismatch
    from synthloop.seeds.loaders import SeedError

    args = parser().parse_args(argv)
    # SIGTERM commits like Ctrl-C does; SIGKILL loses at most the work since the last commit.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.fn(args)
    except (ConfigError, SeedError, ConfigMismatch, UnsafePath) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # The failed write was never committed: the last commit stands, and so does the cache.
        print(f"error: {e.filename or ''}: {e.strerror}; free space and rerun the same command "
              f"to continue from the last commit", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

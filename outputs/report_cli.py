"""The `synthloop report` subcommand (wired in through engine/cli.py's SUBCOMMAND_MODULES).

    synthloop report RUN_DIR [--no-card]    RUN_DIR/report/index.html (+ PNGs) and RUN_DIR/README.md
"""
from __future__ import annotations

import json
import sys


def _report(args) -> int:
    from synthloop.outputs.card import write_card
    from synthloop.outputs.report import write_report

    try:
        out = {"report": str(write_report(args.run_dir))}
        if not args.no_card:
            out["card"] = str(write_card(args.run_dir))
    except (FileNotFoundError, ValueError) as e:   # not a run directory, or a broken manifest
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


def add_parser(subparsers) -> None:
    """Register `report` on the main parser's subparsers.

    >>> import argparse; sub = argparse.ArgumentParser().add_subparsers(); add_parser(sub)
    """
    p = subparsers.add_parser("report", help="write an HTML report with plots (and a dataset card) for a run")
    p.add_argument("run_dir", help="a run directory, or a rounds directory with round-NN/ run directories")
    p.add_argument("--no-card", action="store_true", help="do not (re)write the dataset card README.md")
    p.set_defaults(fn=_report)

"""`synthloop dedup`: exact, MinHash-LSH or semantic dedup of existing Parquet / JSONL files.

    synthloop dedup data/*.parquet --out deduped/ --method minhash --threshold 0.7
    synthloop dedup a.jsonl b.jsonl --out dd/ --method exact --text-columns instruction,input
    synthloop dedup new.parquet --out dd/ --method semantic --preload round-00/kept-*.parquet

Inputs are Parquet or JSONL in the synthloop schema or any table holding the named text columns;
every other column passes through untouched (no schema is forced on foreign tables). Rows are
streamed in batches, keep-first in input order. Output: ``DIR/kept-NNNNN.parquet``, the dropped
rows with ``drop_reason`` in ``DIR/rejects-NNNNN.parquet`` and ``DIR/summary.json`` (counts by
reason, records/s); files are staged in a hidden folder and moved in at the end, summary.json
last: without it a folder holds no output, and a rerun after a kill clears what was moved in.
Bad input: one line naming file (and line) and field, exit 2, nothing written. Progress goes to stderr, a one-line JSON summary to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import polars as pl

METHODS = ("exact", "minhash", "semantic")
_DEFAULT_THRESHOLD = {"minhash": 0.7, "semantic": 0.9}
_DEFAULT_BATCH = {"exact": 50_000, "minhash": 50_000, "semantic": 2048}
_PARQUET = (".parquet", ".pq")
_JSONL = (".jsonl", ".ndjson")


class InputError(ValueError):
    """Bad command-line input; str() is one line naming file (and line) and field."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `dedup` on an argparse subparsers object; the command runs `run_dedup(args)`.

    >>> ap = argparse.ArgumentParser(); p = add_parser(ap.add_subparsers(dest="command"))
    >>> ap.parse_args(["dedup", "x.parquet", "--out", "o"]).method
    'minhash'
    """
    p = subparsers.add_parser(
        "dedup", help="exact / MinHash-LSH / semantic dedup of Parquet or JSONL files",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("inputs", nargs="+", metavar="IN", help="Parquet or JSONL files (or folders of them)")
    p.add_argument("--out", required=True, help="output folder (must not hold dedup output yet)")
    p.add_argument("--text-columns", default="instruction,response",
                   help="comma-separated columns compared (default: instruction,response)")
    p.add_argument("--method", choices=METHODS, default="minhash")
    p.add_argument("--threshold", type=float, default=None,
                   help="Jaccard for minhash (default 0.7), cosine for semantic (default 0.9)")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--ngram", type=int, default=5, help="shingle size")
    p.add_argument("--shingle", choices=("word", "char"), default="word", help="word or character n-grams")
    p.add_argument("--bands", type=int, default=0, help="LSH bands (with --rows; default: from threshold)")
    p.add_argument("--rows", type=int, default=0, help="LSH rows per band")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check MinHash candidates by exact shingle Jaccard (default); "
                        "--no-verify: by the signature estimate (less memory, lower recall)")
    p.add_argument("--model", default="", help="semantic: local sentence-transformers folder")
    p.add_argument("--semdedup", action="store_true",
                   help="semantic: SemDeDup per batch, survivor by scores.quality (else keep-first)")
    p.add_argument("--preload", action="append", default=[], metavar="PARQUET",
                   help="earlier shards (globs allowed, repeatable) whose rows are never re-emitted")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch (default 50000; 2048 for semantic)")
    p.add_argument("--shard-rows", type=int, default=100_000, help="rows per output file")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local (streaming, one process) or ray (Ray Data; same kept rows)")
    p.add_argument("--address", default="",
                   help="Ray cluster address (default: $RAY_ADDRESS or the cluster `ray start` last "
                        "started here, else a new local one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=run_dedup)
    return p


# ---------------------------------------------------------------- checking inputs

def _input_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in _PARQUET + _JSONL)
            if not found:
                raise InputError(f"{p}: folder holds no .parquet or .jsonl files")
            files.extend(found)
        elif not p.exists():
            raise InputError(f"{p}: no such file")
        elif p.suffix not in _PARQUET + _JSONL:
            raise InputError(f"{p}: unsupported format (use .parquet, .jsonl or .ndjson)")
        else:
            files.append(p)
    return files


def _check_schema(path: Path, schema: pl.Schema, columns: list[str]) -> None:
    for c in columns:
        if c not in schema:
            raise InputError(f"{path}: field '{c}': missing (columns: {', '.join(schema.names())})")
        if schema[c] not in (pl.String, pl.Null):
            raise InputError(f"{path}: field '{c}': must be text, got {schema[c]}")
    if "drop_reason" in schema and schema["drop_reason"] not in (pl.String, pl.Null):
        raise InputError(f"{path}: field 'drop_reason': must be text, got {schema['drop_reason']}")


def _check_jsonl(path: Path, columns: list[str]) -> int:
    """Parse every line; return the record count. Blank lines are skipped."""
    n = 0
    try:
        fh = open(path, encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            except UnicodeDecodeError:
                raise InputError(f"{path}:{lineno}: not UTF-8 text") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for c in columns:
                if c not in obj:
                    raise InputError(f"{path}:{lineno}: field '{c}': missing")
                if obj[c] is not None and not isinstance(obj[c], str):
                    raise InputError(f"{path}:{lineno}: field '{c}': must be a string, "
                                     f"got {type(obj[c]).__name__}")
            n += 1
    return n


def _open_inputs(files: list[Path], columns: list[str]) -> list[tuple[Path, pl.LazyFrame, int]]:
    """Check every input before any work: (path, lazy frame, rows) each."""
    out = []
    for f in files:
        try:
            if f.suffix in _PARQUET:
                lf = pl.scan_parquet(f)
                schema = lf.collect_schema()
                rows = lf.select(pl.len()).collect().item()
            else:
                rows = _check_jsonl(f, columns)
                # full-file type inference, so a late row cannot break the stream half-way
                lf = pl.scan_ndjson(f, infer_schema_length=None) if rows else \
                    pl.LazyFrame(schema={c: pl.String for c in columns})
                schema = lf.collect_schema()
        except InputError:
            raise
        except (pl.exceptions.PolarsError, OSError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{f}: cannot read as a table ({msg})") from None
        if rows:
            _check_schema(f, schema, columns)
        out.append((f, lf, rows))
    return out


def _check_preload(preload: list[str], columns: list[str]) -> None:
    from synthloop.filters.preload import expand_paths

    for raw in preload:
        paths = expand_paths([raw])
        if not paths or not all(Path(p).is_file() for p in paths):
            raise InputError(f"--preload {raw}: no such file")
        for p in paths:
            try:
                schema = pl.scan_parquet(p).collect_schema()
            except (pl.exceptions.PolarsError, OSError) as e:
                raise InputError(f"--preload {p}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
            _check_schema(Path(p), schema, columns)


# ---------------------------------------------------------------- dedup and output

def _config(args, columns: list[str]):
    """The stage config the method's dedup class (local) or filters/dedup_ray.py (Ray) runs."""
    method = args.method
    if method == "exact":
        from synthloop.filters.exact import ExactConfig
        return ExactConfig(text_columns=columns, preload=args.preload)
    threshold = args.threshold if args.threshold is not None else _DEFAULT_THRESHOLD[method]
    if method == "minhash":
        from synthloop.filters.minhash import MinHashConfig
        return MinHashConfig(
            text_columns=columns, threshold=threshold, num_perm=args.num_perm, ngram=args.ngram,
            shingle=args.shingle, bands=args.bands, rows=args.rows, verify=args.verify,
            preload=args.preload)
    from synthloop.filters.embed_dedup import SemanticConfig
    return SemanticConfig(text_columns=columns, threshold=threshold, model=args.model,
                          mode="semdedup" if args.semdedup else "stream", preload=args.preload)


def _build(method: str, cfg):
    if method == "exact":
        from synthloop.filters.exact import ExactDedup
        return ExactDedup(cfg)
    if method == "minhash":
        from synthloop.filters.minhash import MinHashDedup
        return MinHashDedup(cfg)
    from synthloop.filters.embed_dedup import SemanticDedup
    return SemanticDedup(cfg)


class _Shards:
    """Buffers frames (schemas may differ between inputs) into files of `rows` rows."""

    def __init__(self, folder: Path, prefix: str, rows: int, template: pl.DataFrame):
        self.folder, self.prefix, self.rows = folder, prefix, rows
        self.parts: list[pl.DataFrame] = []
        self.buffered = 0
        self.files: list[str] = []
        self.template = template   # the columns of an empty file

    def add(self, df: pl.DataFrame) -> None:
        if df.height:
            self.parts.append(df)
            self.buffered += df.height
        while self.buffered >= self.rows:
            self._flush(self.rows)

    def _flush(self, n: int) -> None:
        from synthloop.outputs.shards import write_parquet_atomic

        buf = pl.concat(self.parts, how="diagonal_relaxed") if self.parts else self.template
        name = f"{self.prefix}-{len(self.files):05d}.parquet"
        write_parquet_atomic(buf.head(n), self.folder / name)
        self.files.append(name)
        rest = buf.slice(n)
        self.parts, self.buffered = ([rest] if rest.height else []), rest.height

    def finish(self) -> list[str]:
        if self.buffered or not self.files:   # always at least one file, possibly empty
            self._flush(self.buffered)
        return self.files


def _progress(total: int, quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("[bold]dedup"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                    console=Console(file=sys.stderr), disable=quiet)
    return prog, prog.add_task("dedup", total=total or None, stats="")


def run_dedup(args) -> int:
    """Run `synthloop dedup` from parsed arguments; returns the exit code (0, or 2 on bad input).

    >>> ap = argparse.ArgumentParser(); add_parser(ap.add_subparsers(dest="command"))  # doctest: +ELLIPSIS
    ArgumentParser(...)
    >>> run_dedup(ap.parse_args(["dedup", "/nonexistent.parquet", "--out", "/tmp/o"]))
    2
    """
    try:
        return _run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    columns = [c.strip() for c in args.text_columns.split(",") if c.strip()]
    if not columns:
        raise InputError("--text-columns: name at least one column")
    if args.threshold is not None and args.method == "minhash" and not 0 < args.threshold < 1:
        raise InputError(f"--threshold: a Jaccard threshold must be in (0, 1), got {args.threshold}")
    if (args.bands > 0) != (args.rows > 0) or args.bands * args.rows > args.num_perm:
        raise InputError("--bands/--rows: give both, with bands * rows <= --num-perm")
    out = Path(args.out)
    if (out / "summary.json").exists():
        raise InputError(f"{out}: already holds dedup output; choose another --out")
    inputs = _open_inputs(_input_files(args.inputs), columns)
    batch_rows = args.batch_size or _DEFAULT_BATCH[args.method]
    if batch_rows < 1 or args.shard_rows < 1:
        raise InputError("--batch-size and --shard-rows must be >= 1")
    _check_preload(args.preload, columns)
    cfg = _config(args, columns)
    try:
        if args.executor == "local":
            dedup = _build(args.method, cfg)
        else:
            dedup = None
            _check_for_ray(args, cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise InputError(str(e)) from None

    out.mkdir(parents=True, exist_ok=True)
    _remove_unfinished(out)
    stage = out / f".dedup-tmp-{os.getpid()}"
    stage.mkdir()
    try:
        summary = (_dedup(args, inputs, dedup, columns, batch_rows, stage) if dedup is not None
                   else _dedup_ray(args, inputs, cfg, columns, batch_rows, stage))
        for name in summary["kept_files"] + summary["rejects_files"]:
            os.replace(stage / name, out / name)
        tmp = out / f".summary.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(summary, indent=2))
        shutil.rmtree(stage)                    # before the summary: a finished folder holds no staging
        os.replace(tmp, out / "summary.json")   # last: its presence means the output is complete
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(json.dumps({k: summary[k] for k in ("out", "records", "kept", "dropped", "records_per_s")}))
    return 0


def _remove_unfinished(out: Path) -> None:
    """What a dedup into `out` killed before its summary.json left: the files it had moved in
    already (without the summary they are no output) and the staging folders of dead pids."""
    from synthloop.outputs.shards import pid_alive

    for f in [*out.glob("kept-*.parquet"), *out.glob("rejects-*.parquet")]:
        f.unlink()
    for d in [*out.glob(".dedup-tmp-*"), *out.glob(".summary.json.tmp-*")]:
        pid = d.name.rsplit("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)


def _dedup(args, inputs, dedup, columns, batch_rows, stage: Path) -> dict:
    first = pl.DataFrame(schema=inputs[0][1].collect_schema())
    reason = pl.DataFrame(schema={"drop_reason": pl.String})
    kept = _Shards(stage, "kept", args.shard_rows, first)
    rejects = _Shards(stage, "rejects", args.shard_rows,
                      first if "drop_reason" in first.columns else pl.concat([first, reason], how="horizontal"))
    dropped: Counter = Counter()
    n_in = n_kept = 0
    total = sum(rows for _, _, rows in inputs)
    t0 = time.perf_counter()
    prog, task = _progress(total, args.quiet)
    with prog:
        for path, lf, rows in inputs:
            if rows == 0:
                continue
            had_reason = "drop_reason" in lf.collect_schema()
            for batch in lf.collect_batches(chunk_size=batch_rows):
                if not had_reason:
                    batch = batch.with_columns(pl.lit(None, pl.String).alias("drop_reason"))
                marked = dedup.mark(batch)
                is_kept = marked["drop_reason"].is_null()
                good = marked.filter(is_kept)
                kept.add(good if had_reason else good.drop("drop_reason"))
                bad = marked.filter(~is_kept)
                rejects.add(bad)
                dropped.update(dict(bad["drop_reason"].value_counts().iter_rows()))
                n_in += batch.height
                n_kept += good.height
                rate = n_in / max(time.perf_counter() - t0, 1e-9)
                prog.update(task, completed=n_in,
                            stats=f"{rate:,.0f} rec/s  kept {n_kept}  dropped {n_in - n_kept}")
    kept_files, rejects_files = kept.finish(), rejects.finish()
    dt = time.perf_counter() - t0
    return {
        "out": str(args.out), "method": args.method, "inputs": [str(p) for p, _, _ in inputs],
        "text_columns": columns, "params": _params(args, dedup.cfg), "executor": "local",
        "records": n_in, "kept": n_kept, "dropped": dict(sorted(dropped.items())),
        "seconds": round(dt, 3), "records_per_s": round(n_in / dt, 1) if dt > 0 else None,
        "kept_files": kept_files, "rejects_files": rejects_files,
    }


def _check_for_ray(args, cfg) -> None:
    """What the local classes check on construction, without building an index or an encoder."""
    if args.method == "minhash":
        if not 0.0 < cfg.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {cfg.threshold}")
    elif args.method == "semantic":
        if args.semdedup:
            raise InputError("--semdedup: SemDeDup picks survivors per local batch; "
                             "it runs with --executor local only")
        from synthloop.filters.embed_dedup import default_model_path
        model = cfg.model or default_model_path()
        if not Path(model).is_dir():
            raise FileNotFoundError(f"embedding model folder not found: {model}")
    from synthloop.filters.ray_replicas import require_ray

    require_ray()


def _dedup_ray(args, inputs, cfg, columns, batch_rows, stage: Path) -> dict:
    from synthloop.filters import dedup_ray

    live = [(path, rows) for path, _, rows in inputs if rows]
    had_reason = all("drop_reason" in lf.collect_schema() for _, lf, rows in inputs if rows)
    first = pl.DataFrame(schema=inputs[0][1].collect_schema())
    t0 = time.perf_counter()
    res = dedup_ray.dedup(args.method, cfg, live, args.preload, columns=columns,
                          batch_rows=batch_rows, stage=stage, had_reason=had_reason,
                          address=args.address or None) if live else \
        {"records": 0, "kept": 0, "dropped": {}, "kept_files": [], "rejects_files": [], "ray": {}}
    dt = time.perf_counter() - t0
    reason = pl.DataFrame(schema={"drop_reason": pl.String})
    for key, prefix, empty in (("kept_files", "kept", first),
                               ("rejects_files", "rejects", first if "drop_reason" in first.columns
                                else pl.concat([first, reason], how="horizontal"))):
        if not res[key]:    # always at least one file, possibly empty, as the local executor
            from synthloop.outputs.shards import write_parquet_atomic
            write_parquet_atomic(empty, stage / f"{prefix}-00000.parquet")
            res[key] = [f"{prefix}-00000.parquet"]
    return {
        "out": str(args.out), "method": args.method, "inputs": [str(p) for p, _, _ in inputs],
        "text_columns": columns, "params": _params(args, cfg), "executor": "ray", "ray": res["ray"],
        "records": res["records"], "kept": res["kept"], "dropped": res["dropped"],
        "seconds": round(dt, 3), "records_per_s": round(res["records"] / dt, 1) if dt > 0 else None,
        "kept_files": res["kept_files"], "rejects_files": res["rejects_files"],
    }


def _params(args, cfg) -> dict:
    if args.method == "exact":
        return {"preload": args.preload}
    if args.method == "minhash":
        from synthloop.filters.lsh import optimal_bands_rows
        bands, rows = (cfg.bands, cfg.rows) if cfg.bands else optimal_bands_rows(
            cfg.threshold, cfg.num_perm, fp_weight=cfg.fp_weight, fn_weight=cfg.fn_weight)
        return {"threshold": cfg.threshold, "num_perm": cfg.num_perm, "ngram": cfg.ngram,
                "shingle": cfg.shingle, "bands": bands, "rows": rows,
                "verify": cfg.verify, "preload": args.preload}
    return {"threshold": cfg.threshold, "mode": cfg.mode, "model": cfg.model or "bundled MiniLM-L6-v2",
            "preload": args.preload}


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (tests, ``python -m synthloop.filters.dedup_cli``): `synthloop dedup ARGS`."""
    ap = argparse.ArgumentParser(prog="synthloop")
    add_parser(ap.add_subparsers(dest="command", required=True))
    return run_dedup(ap.parse_args(["dedup", *(argv or sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())

"""`synthloop score` and `synthloop select`: score or select an existing dataset outside a run.

    synthloop score data.parquet --out scored/ --scorer judge --model embedded --set min_score=0.6
    synthloop score a.jsonl b.jsonl --out ifd/ --scorer ifd --set max_ifd=1.0
    synthloop select scored/kept.parquet --out picked/ --budget 1000 --score-column quality
    synthloop score data.parquet --out ifd/ --scorer ifd --executor ray [--address HEAD:6379]

With ``--executor ray`` the scorer (or, for select, the embedding model) runs as replicas on a
Ray cluster, one per GPU or per CPU (filters/ray_replicas.py); the output rows are the same.

Inputs are Parquet or JSONL, either in the synthloop schema or any table with instruction /
response columns (names set with --instruction-field etc.). Every input is read and checked
before any work starts: a bad one prints one line naming file, line and field, exits 2, and
writes nothing. Outputs: ``DIR/kept.parquet`` and ``DIR/rejects.parquet`` (with ``drop_stage``),
each written atomically; a one-line JSON summary goes to stdout, progress to stderr.
"""
from __future__ import annotations

import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

import polars as pl



class InputError(ValueError):
    """Bad command-line input; str() is one line naming file, line and field."""


# ---------------------------------------------------------------- reading inputs

def _field(where: str, obj: dict, key: str, *, required: bool) -> str:
    val = obj.get(key)
    if val is None:
        if required:
            raise InputError(f"{where}: field '{key}': missing")
        return ""
    if not isinstance(val, str):
        raise InputError(f"{where}: field '{key}': must be a string, got {type(val).__name__}")
    return val


def _rows_from_dicts(loc, items, fields: dict, need_response: bool) -> list[dict]:
    from synthloop.core.schema import SCHEMA

    keep = [c for c in SCHEMA.names() if c not in ("instruction", "input", "response")]
    rows = []
    for line, obj in items:
        if not isinstance(obj, dict):
            raise InputError(f"{loc(line)}: expected a JSON object, got {type(obj).__name__}")
        row = {k: obj[k] for k in keep if obj.get(k) is not None}
        row["instruction"] = _field(loc(line), obj, fields["instruction"], required=True)
        row["input"] = _field(loc(line), obj, fields["input"], required=False)
        row["response"] = _field(loc(line), obj, fields["response"], required=need_response)
        rows.append(row)
    return rows


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None


def read_records(path: str | Path, *, fields: dict | None = None, need_response: bool = True) -> pl.DataFrame:
    """Read one Parquet/JSONL file into a schema-exact frame, or raise InputError naming the spot.

    >>> read_records("scored.jsonl", fields={"response": "output"})      # doctest: +SKIP
    """
    from synthloop.core.schema import SCHEMA, conform, make_batch

    path = Path(path)
    fields = {"instruction": "instruction", "input": "input", "response": "response", **(fields or {})}
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() == ".parquet":
        try:
            df = pl.read_parquet(path)
        except Exception as e:  # polars raises several error types for a broken file
            raise InputError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
        default = all(fields[k] == k for k in fields)
        if default and all(c in df.columns for c in SCHEMA.names()):
            try:
                return conform(df.select(SCHEMA.names()), source=str(path))
            except ValueError as e:
                raise InputError(str(e)) from None
        for key, col in fields.items():
            if col in df.columns and df.schema[col] not in (pl.String, pl.Null):
                raise InputError(f"{path}: field '{col}': must be strings, got {df.schema[col]}")
        items, loc = enumerate(df.iter_rows(named=True), 1), (lambda n: f"{path}: row {n}")
    elif path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        items, loc = _jsonl(path), (lambda n: f"{path}:{n}")
    else:
        raise InputError(f"{path}: unsupported input (use .parquet or .jsonl)")
    rows = _rows_from_dicts(loc, items, fields, need_response)
    try:
        return make_batch(rows)
    except (KeyError, TypeError, pl.exceptions.PolarsError) as e:
        raise InputError(f"{path}: records do not fit the synthloop schema ({e})") from None


def read_all(paths: list[str], args, *, need_response: bool) -> pl.DataFrame:
    fields = {"instruction": args.instruction_field, "input": args.input_field,
              "response": args.response_field}
    frames = [read_records(p, fields=fields, need_response=need_response) for p in paths]
    return pl.concat(frames, how="vertical") if frames else pl.DataFrame()


def write_outputs(df: pl.DataFrame, out: str, stage: str, arrived: pl.DataFrame) -> dict:
    """Write kept and rejected rows under `out` atomically; return the summary counts.

    `arrived` holds the input rows that were already rejected (drop_stage "input")."""
    from synthloop.core.schema import SCHEMA
    from synthloop.outputs.shards import REJECTS_SCHEMA, write_parquet_atomic

    kept = df.filter(pl.col("drop_reason").is_null()).select(SCHEMA.names())
    rejects = pl.concat([
        arrived.with_columns(pl.lit("input", dtype=pl.String).alias("drop_stage")),
        df.filter(pl.col("drop_reason").is_not_null())
        .with_columns(pl.lit(stage, dtype=pl.String).alias("drop_stage"))]).select(REJECTS_SCHEMA.names())
    write_parquet_atomic(kept, Path(out) / "kept.parquet")
    write_parquet_atomic(rejects, Path(out) / "rejects.parquet")
    return {"out": str(out), "kept": kept.height,
            "rejected": dict(Counter(rejects["drop_reason"].to_list()))}


# ---------------------------------------------------------------- score

def _settings(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {pair}: expected KEY=VALUE")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value            # a bare word is a string: --set model=/m/rm
    return out


def scorer_settings(args) -> tuple[dict, dict]:
    """(--set settings, checked like a stage table; the judge/deita backend's BackendSpec fields)."""
    import dataclasses

    from synthloop.core import registry
    from synthloop.core.config import from_dict

    settings = _settings(args.set)
    cls = registry.config_class("scorer", args.scorer)
    if args.model and "model" in {f.name for f in dataclasses.fields(cls)}:
        settings.setdefault("model", args.model)        # ifd: the student; reward: the RM
    from_dict(cls, dict(settings), path="--set", text="", table=args.scorer)
    return settings, {"backend": args.backend, "model": args.model or "embedded",
                      "options": _settings(args.backend_option)}


class OpenedScorer:
    """--scorer built through the stage registry, with the judge/deita backend it opens, called on
    polars frames (here) or Arrow tables (in a Ray replica, filters/ray_replicas.py).

    Loads models, so it is built only after every input has been checked."""

    def __init__(self, name: str, settings: dict, backend: dict):
        from synthloop.core import registry

        self.backend, self.opened, self.fn = backend, [], None
        try:
            self.fn = registry.build_scorer(name, dict(settings), self._llm)
        except ValueError:
            self.close()
            raise

    def _llm(self, role: str):                           # judge/deita: --model on --backend
        from synthloop.core.llm import BackendSpec, open_llm

        if not self.opened:
            self.opened.append(open_llm(BackendSpec(**self.backend)))
        return self.opened[0]

    @property
    def stats(self):
        return getattr(self.fn, "stats", None)

    def __call__(self, batch):
        if isinstance(batch, pl.DataFrame):
            return self.fn(batch)
        return self.fn(pl.from_arrow(batch)).to_arrow()

    def close(self) -> None:
        if hasattr(self.fn, "close"):
            self.fn.close()
        for o in self.opened:
            o.close()


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(file=sys.stderr), disable=not enabled)


def run_score(args) -> int:
    """Score/filter the inputs with one scorer; returns the exit code."""
    from synthloop.core.config import ConfigError
    from synthloop.filters import ray_replicas

    try:
        if args.batch_rows < 1:
            raise InputError(f"--batch-rows must be >= 1, got {args.batch_rows}")
        df = read_all(args.inputs, args, need_response=args.scorer != "deita")
        settings, backend = scorer_settings(args)
        if args.executor == "ray":
            ray_replicas.require_ray()
            replicas = ray_replicas.scorer_pool(args, settings, backend)
        else:
            fn = OpenedScorer(args.scorer, settings, backend)
    except (InputError, ConfigError, ValueError, OSError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    todo = df.filter(pl.col("drop_reason").is_null())
    done, extra = [], {}
    with _progress(not args.quiet) as bar:
        task = bar.add_task(f"{args.scorer}", total=todo.height)
        if args.executor == "ray":
            try:
                frame, stats, extra["ray"] = ray_replicas.score(replicas, todo, args.batch_rows,
                                                                lambda n: bar.advance(task, n))
            finally:
                replicas.close()
            done.append(frame)
        else:
            try:
                for part in todo.iter_slices(args.batch_rows):
                    done.append(fn(part))
                    bar.advance(task, part.height)
            finally:
                fn.close()
            stats = ray_replicas.plain_stats(fn.stats)
    summary = write_outputs(pl.concat(done, how="vertical") if done else todo, args.out, args.scorer,
                            df.filter(pl.col("drop_reason").is_not_null()))
    if stats is not None:
        summary["stats"] = stats
    print(json.dumps({**summary, **extra}))
    return 0


# ---------------------------------------------------------------- select

def run_select(args) -> int:
    """Diversity-aware selection of the inputs under a budget; returns the exit code."""
    from synthloop.filters import ray_replicas
    from synthloop.filters.select import score_expr, select

    try:
        df = read_all(args.inputs, args, need_response=False)
        score_expr(args.score_column, df.schema)
        if args.budget < 0:
            raise InputError(f"--budget must be >= 0, got {args.budget}")
        if not -1 <= args.threshold <= 1:
            raise InputError(f"--threshold is a cosine similarity in [-1, 1], got {args.threshold}")
        arrived = df.filter(pl.col("drop_reason").is_not_null())
        todo = df.filter(pl.col("drop_reason").is_null())
        replicas = None
        if args.executor == "ray" and args.budget and todo.height:
            ray_replicas.require_ray()
            replicas = ray_replicas.encoder_pool(args)
    except (InputError, ValueError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    try:
        with _progress(not args.quiet) as bar:
            task = bar.add_task("selecting", total=todo.height)
            out = select(todo, budget=args.budget, score_column=args.score_column, threshold=args.threshold,
                         text=args.text, progress=lambda i: bar.update(task, completed=i + 1),
                         embed=ray_replicas.embedder(replicas) if replicas else None)
            bar.update(task, completed=bar.tasks[0].total)
    finally:
        if replicas:
            replicas.close()
    print(json.dumps(write_outputs(out, args.out, "select", arrived)))
    return 0


def _common(p) -> None:
    p.add_argument("inputs", nargs="+", metavar="IN", help="Parquet or JSONL files")
    p.add_argument("--out", required=True, help="output folder: kept.parquet, rejects.parquet")
    p.add_argument("--instruction-field", default="instruction")
    p.add_argument("--input-field", default="input")
    p.add_argument("--response-field", default="response")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local (this process) or ray (replicas on a Ray cluster; the same rows)")
    p.add_argument("--address", default="",
                   help="Ray cluster address (default: $RAY_ADDRESS or the cluster `ray start` last "
                        "started here, else a new local one)")
    p.add_argument("--replicas", type=int, default=0,
                   help="with --executor ray: model replicas (default: one per GPU, else one per "
                        "--cpus-per-replica CPUs)")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="with --executor ray: GPUs each replica takes (default 1 on a GPU cluster, else 0)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="with --executor ray: CPUs each replica takes")


def add_parser(subparsers) -> None:
    """Register `score` and `select` on the `synthloop` command's subparsers."""
    s = subparsers.add_parser("score", help="score or filter a dataset with one scorer")
    _common(s)
    from synthloop.core.registry import names
    s.add_argument("--scorer", required=True, choices=names("scorer"))
    s.add_argument("--model", help="judge/deita: the judge LLM; ifd: the student; reward: the RM "
                                    "folder (a local path or 'embedded')")
    s.add_argument("--backend", default="transformers", choices=("transformers", "vllm", "openai"),
                   help="judge/deita backend")
    s.add_argument("--backend-option", action="append", metavar="KEY=VALUE",
                   help="backend constructor option, e.g. base_url=http://localhost:8000/v1")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="scorer setting (TOML value), e.g. min_score=0.6, k=3, max_words=800")
    s.add_argument("--batch-rows", type=int, default=64, help="rows per batch handed to the scorer")
    s.set_defaults(fn=run_score)
    p = subparsers.add_parser("select", help="pick a diverse, high-scoring subset under a budget")
    _common(p)
    p.add_argument("--budget", type=int, required=True, help="how many records to keep")
    p.add_argument("--score-column", default="quality",
                   help="a scores field (quality, judge, reward, ...) or a numeric column")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="cosine similarity at or above which a record is too close to a kept one")
    p.add_argument("--text", default="instruction", choices=("instruction", "pair"),
                   help="what is embedded for the similarity check")
    p.set_defaults(fn=run_select)

"""Seed loaders: self-instruct `seed_tasks.jsonl`, Alpaca JSON/JSONL, ShareGPT, generic JSONL/Parquet
with a field mapping, and TXT (one instruction per line).

Every loader returns a `SeedSet`: records in the synthloop schema (``method == "seed"``) plus the
ids of classification tasks (self-instruct marks them; they get output-first instance prompts).
A malformed file raises `SeedError` whose message names the path, line and field.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import polars as pl

from synthloop.core.jsonl import JsonlError, decode, read_bytes, read_jsonl, text_lines
from synthloop.core.schema import SCHEMA, SeedSet, conform, make_batch

FORMATS = ("auto", "self_instruct", "alpaca", "sharegpt", "jsonl", "parquet", "txt")
BUNDLED = "bundled"


class SeedError(ValueError):
    """Bad seed input; str() is one line: ``path:line: field 'x': what is wrong``."""

    def __init__(self, path: Path | str, line: int | None, field: str | None, msg: str):
        loc = f"{path}:{line}" if line else str(path)
        super().__init__(f"{loc}: field '{field}': {msg}" if field else f"{loc}: {msg}")


def bundled_path() -> Path:
    return Path(str(resources.files("synthloop.seeds") / "data" / "seed_tasks.jsonl"))


def _json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each starts on."""
    text = decode(path, read_bytes(path))
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text[i:i + 1] == "[":
        raise SeedError(path, 1, None, "expected a JSON array of records")
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise SeedError(path, text.count("\n", 0, i) + 1, None, "unterminated JSON array")
        if text[i] == "]":
            return
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise SeedError(path, e.lineno, None, f"not valid JSON ({e.msg})") from None
        except ValueError as e:
            raise SeedError(path, line, None, f"not valid JSON ({e})") from None
        except RecursionError:
            raise SeedError(path, line, None, "not valid JSON (nested too deeply)") from None
        yield line, obj


def _text(path, line, field: str, val: str) -> str:
    """`val` stripped; a lone surrogate (JSON allows "\\ud800") cannot be stored as UTF-8."""
    try:
        val.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SeedError(path, line, field, f"not valid Unicode (lone surrogate at character {e.start})") from None
    return val.strip()


def _str(path, line, obj: dict, key: str, *, required: bool = True, label: str = "") -> str:
    label = label or key
    if not isinstance(obj, dict):
        raise SeedError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
    if key not in obj or obj[key] is None:
        if required:
            raise SeedError(path, line, label, "missing")
        return ""
    val = obj[key]
    if not isinstance(val, str):
        raise SeedError(path, line, label, f"must be a string, got {type(val).__name__}")
    val = _text(path, line, label, val)
    if required and not val:
        raise SeedError(path, line, label, "is empty")
    return val


def _self_instruct(path: Path) -> SeedSet:
    rows, clf = [], set()
    for line, obj in read_jsonl(path):
        ins = _str(path, line, obj, "instruction")
        inst = obj.get("instances")
        if not isinstance(inst, list) or not inst:
            raise SeedError(path, line, "instances", "must be a non-empty list of {input, output}")
        for k, it in enumerate(inst):
            if not isinstance(it, dict):
                raise SeedError(path, line, f"instances[{k}]", "must be an object with input and output")
            inp = _str(path, line, it, "input", required=False, label=f"instances[{k}].input")
            out = _str(path, line, it, "output", label=f"instances[{k}].output")
            rows.append({"instruction": ins, "input": inp, "response": out, "method": "seed"})
        flag = obj.get("is_classification", False)
        if not isinstance(flag, bool):
            raise SeedError(path, line, "is_classification", f"must be true or false, got {flag!r}")
        if flag:
            clf.add(ins)
    return _finish(rows, clf)


def _alpaca_rows(path: Path, items) -> SeedSet:
    rows = []
    for line, obj in items:
        rows.append({"instruction": _str(path, line, obj, "instruction"),
                     "input": _str(path, line, obj, "input", required=False),
                     "response": _str(path, line, obj, "output", required=False), "method": "seed"})
    return _finish(rows)


_USER = {"human", "user"}
_ASSISTANT = {"gpt", "assistant", "chatgpt", "bing", "bard", "model"}


def _sharegpt(path: Path, items) -> SeedSet:
    """The first user turn and the assistant turn after it; system turns are skipped."""
    rows = []
    for line, obj in items:
        if not isinstance(obj, dict):
            raise SeedError(path, line, None, "expected a JSON object")
        key = "conversations" if "conversations" in obj else "messages"
        turns = obj.get(key)
        if not isinstance(turns, list) or not turns:
            raise SeedError(path, line, key, "must be a non-empty list of turns")
        rk, ck = ("from", "value") if key == "conversations" else ("role", "content")
        user = reply = None
        for k, t in enumerate(turns):
            if not isinstance(t, dict) or rk not in t or ck not in t:
                raise SeedError(path, line, f"{key}[{k}]", f"each turn needs '{rk}' and '{ck}'")
            if not isinstance(t[ck], str):
                raise SeedError(path, line, f"{key}[{k}].{ck}", "must be a string")
            role = str(t[rk]).lower()
            if user is None and role in _USER:
                user = _text(path, line, f"{key}[{k}].{ck}", t[ck])
            elif user is not None and role in _ASSISTANT:
                reply = _text(path, line, f"{key}[{k}].{ck}", t[ck])
                break
        if not user:
            raise SeedError(path, line, key, "has no user turn")
        rows.append({"instruction": user, "response": reply or "", "method": "seed"})
    return _finish(rows)


def _generic(path: Path, items, fields: dict) -> SeedSet:
    f_ins = fields.get("instruction", "instruction")
    f_inp = fields.get("input", "input")
    f_out = fields.get("output", "output")
    rows = []
    for line, obj in items:
        rows.append({"instruction": _str(path, line, obj, f_ins),
                     "input": _str(path, line, obj, f_inp, required=False),
                     "response": _str(path, line, obj, f_out, required=False), "method": "seed"})
    return _finish(rows)


def _parquet(path: Path, fields: dict) -> SeedSet:
    try:
        df = pl.read_parquet(path)
    except Exception as e:  # polars raises several error types for a bad file
        raise SeedError(path, None, None, f"not a readable Parquet file ({e})") from None
    if not fields and set(SCHEMA.names()) <= set(df.columns):
        # Our own shards seed as they are: constraints, scores and lineage come along.
        try:
            records = conform(df.select(SCHEMA.names()), source=str(path))
        except ValueError as e:
            raise SeedError(path, None, None, str(e)) from None
        return _finish(records.with_columns(pl.lit(None, dtype=pl.String).alias("drop_reason")).to_dicts())
    return _generic(path, enumerate(df.iter_rows(named=True), 1), fields)


def _txt(path: Path) -> SeedSet:
    return _finish([{"instruction": line.strip(), "method": "seed"} for _, line in text_lines(path)])


def _finish(rows: list[dict], clf_instructions: set[str] = frozenset()) -> SeedSet:
    df = make_batch(rows).unique(subset="id", keep="first", maintain_order=True)
    clf = set(df.filter(pl.col("instruction").is_in(list(clf_instructions)))["id"]) if clf_instructions else set()
    return SeedSet(records=df, classification=clf)


def detect_format(path: Path) -> str:
    """Guess a seed file's format from its extension and first record."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return "txt"
    if suffix == ".parquet":
        return "parquet"
    first = None
    if suffix == ".json":
        for _, first in _json_array(path):
            break
    else:
        for _, first in read_jsonl(path):
            break
    if not isinstance(first, dict):
        raise SeedError(path, 1, None, "cannot tell the seed format: no JSON object records (set seeds.format)")
    if "instances" in first:
        return "self_instruct"
    if "conversations" in first or "messages" in first:
        return "sharegpt"
    if "instruction" in first and "output" in first:
        return "alpaca"
    return "jsonl"


def load_seeds(path: str | Path = BUNDLED, *, format: str = "auto", fields: dict | None = None) -> SeedSet:
    """Load seed tasks from a file (or the bundled set).

    >>> len(load_seeds()) >= 150
    True
    """
    path = bundled_path() if str(path) == BUNDLED else Path(path)
    if format not in FORMATS:
        raise SeedError(path, None, "format", f"unknown seed format '{format}' (one of {', '.join(FORMATS)})")
    if not path.exists():
        raise SeedError(path, None, None, "no such file")
    if not path.is_file():
        raise SeedError(path, None, None, "not a file")
    try:
        seeds = _load(path, format, fields or {})
    except JsonlError as e:       # unreadable bytes or JSON, with its line
        raise SeedError(e.path, e.line, None, e.msg) from None
    if not len(seeds):
        raise SeedError(path, None, None, "holds no seed tasks")
    return seeds


def _load(path: Path, format: str, fields: dict) -> SeedSet:
    fmt = detect_format(path) if format == "auto" else format
    json_items = (lambda: _json_array(path)) if path.suffix.lower() == ".json" else (lambda: read_jsonl(path))
    if fmt == "self_instruct":
        seeds = _self_instruct(path)
    elif fmt == "alpaca":
        seeds = _alpaca_rows(path, json_items())
    elif fmt == "sharegpt":
        seeds = _sharegpt(path, json_items())
    elif fmt == "jsonl":
        seeds = _generic(path, json_items(), fields)
    elif fmt == "parquet":
        seeds = _parquet(path, fields)
    else:
        seeds = _txt(path)
    return seeds

"""The one record schema: every batch that moves between stages is a polars DataFrame of this shape.

Filters are vectorised expressions over it, Parquet shards are written from it without copies, and
a batch maps onto a Ray Data block. Never infer a schema from data: build batches with
`make_batch`, which casts and orders the columns and fills ids.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable

import polars as pl

MESSAGE = pl.Struct({"role": pl.String, "content": pl.String})

#: A verifiable constraint attached to an instruction: a checker id (IFEval's ids, or a user check
#: registered in filters/checks.py) and its keyword arguments as a JSON object string.
CONSTRAINT = pl.Struct({"id": pl.String, "kwargs": pl.String})

#: The language of a record (filters/language.py): ISO 639-1 code and the detector's probability.
LANGUAGE = pl.Struct({"code": pl.String, "confidence": pl.Float64})

#: Score columns filled by scorers; null means "not scored".
SCORES = pl.Struct({
    "quality": pl.Float64,
    "complexity": pl.Float64,
    "ifd": pl.Float64,
    "reward": pl.Float64,
    "judge": pl.Float64,
    "verified": pl.Float64,      # fraction of the row's constraints its response passes (loose)
    "verified_all": pl.Boolean,  # the response passes every constraint
    "pass_rate": pl.Float64,     # rejection sampling: fraction of the n samples that passed all
    "safety": pl.Float64,        # safety screen: 1 = nothing unsafe found, 0 = unsafe (filters/safety.py)
})

SCHEMA = pl.Schema({
    "id": pl.String,             # content hash of normalised instruction + input
    "instruction": pl.String,
    "input": pl.String,
    "response": pl.String,       # "" until someone answers it
    "messages": pl.List(MESSAGE),  # chat form, what TRL / axolotl read
    "method": pl.String,         # seed, self_instruct, evol:<op>, distill, magpie, ...
    "parent_id": pl.String,      # lineage: the record this one was derived from
    "generation": pl.Int32,      # evolution depth (0 for anything not evolved)
    "round": pl.Int32,           # self-improvement round that produced it
    "model": pl.String,          # model that wrote the instruction / response
    "constraints": pl.List(CONSTRAINT),  # verifiable constraints on the response; [] when none
    "language": LANGUAGE,        # {code, confidence}; filled at the latest when a record is committed
    "scores": SCORES,
    "drop_reason": pl.String,    # set only on rows headed for the rejects stream
})

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Normalise text for identity: NFKC, lower case, collapsed whitespace.

    >>> normalize("  Hello\\n  World ")
    'hello world'
    """
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().lower()


def record_id(instruction: str, input: str = "") -> str:
    """Stable content id of a task: the same instruction + input gives the same id in every run.

    >>> record_id("Add 2 and 3.") == record_id("  add 2 and 3. ")
    True
    """
    key = normalize(instruction) + "\x1f" + normalize(input)
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def to_messages(instruction: str, input: str, response: str) -> list[dict[str, str]]:
    """Chat form of a pair: the input, if any, follows the instruction in the user turn."""
    user = instruction if not input else f"{instruction}\n\n{input}"
    msgs = [{"role": "user", "content": user}]
    if response:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def empty_batch() -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMA)


def make_batch(rows: Iterable[dict[str, Any]]) -> pl.DataFrame:
    """Build a schema-exact batch from dicts; missing columns get defaults, ids and messages are derived.

    >>> make_batch([{"instruction": "Name a colour.", "response": "Blue."}])["method"].to_list()
    ['seed']
    """
    out = []
    for r in rows:
        unknown = set(r) - set(SCHEMA.names())
        if unknown:
            raise KeyError(f"unknown record fields: {sorted(unknown)}")
        ins, inp, resp = r.get("instruction", ""), r.get("input") or "", r.get("response") or ""
        out.append({
            "id": r.get("id") or record_id(ins, inp),
            "instruction": ins,
            "input": inp,
            "response": resp,
            "messages": r.get("messages") or to_messages(ins, inp, resp),
            "method": r.get("method", "seed"),
            "parent_id": r.get("parent_id"),
            "generation": r.get("generation", 0),
            "round": r.get("round", 0),
            "model": r.get("model", ""),
            "constraints": r.get("constraints") or [],
            "language": r.get("language"),
            "scores": r.get("scores"),
            "drop_reason": r.get("drop_reason"),
        })
    return pl.DataFrame(out, schema=SCHEMA) if out else empty_batch()


def upgrade(frame: pl.DataFrame | pl.LazyFrame, schema: pl.Schema = SCHEMA) -> pl.DataFrame | pl.LazyFrame:
    """A frame an older synthloop wrote, with what `schema` has gained since filled with null: a
    missing column (``language``) or a missing field of a struct column (``scores.safety``).
    Columns come in schema order, any others after them; nothing is dropped or retyped.

    >>> upgrade(pl.DataFrame({"id": ["a"]}), pl.Schema({"id": pl.String, "n": pl.Int32})).row(0)
    ('a', None)
    """
    have = frame.collect_schema() if isinstance(frame, pl.LazyFrame) else frame.schema
    if have == schema:
        return frame
    cols = []
    for name, dtype in schema.items():
        if name not in have:
            cols.append(pl.lit(None, dtype=dtype).alias(name))
        elif isinstance(dtype, pl.Struct) and isinstance(have[name], pl.Struct) and have[name] != dtype:
            old = {f.name for f in have[name].fields}
            cols.append(pl.when(pl.col(name).is_not_null()).then(pl.struct(
                [pl.col(name).struct.field(f.name) if f.name in old else pl.lit(None, dtype=f.dtype).alias(f.name)
                 for f in dtype.fields])).otherwise(None).alias(name))
        else:
            cols.append(pl.col(name))
    return frame.select(cols + [pl.col(c) for c in have.names() if c not in schema])


def conform(df: pl.DataFrame, *, source: str = "batch") -> pl.DataFrame:
    """Check a frame has exactly our columns and types (in order); raise naming what is off."""
    if df.schema == SCHEMA:
        return df
    missing = [c for c in SCHEMA.names() if c not in df.columns]
    extra = [c for c in df.columns if c not in SCHEMA]
    if missing or extra:
        raise ValueError(f"{source}: columns differ from the synthloop schema "
                         f"(missing {missing}, unexpected {extra})")
    try:
        return df.select([pl.col(c).cast(t, strict=True) for c, t in SCHEMA.items()])
    except pl.exceptions.PolarsError as e:
        raise ValueError(f"{source}: cannot cast to the synthloop schema: {e}") from None


@dataclass
class SeedSet:
    """Seed records in this schema (``method == "seed"``) and the ids of classification tasks
    (self-instruct marks them; they get output-first instance prompts)."""

    records: pl.DataFrame
    classification: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return self.records.height

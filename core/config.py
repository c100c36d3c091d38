"""TOML run configs, validated into dataclasses with errors that name the file, line and key.

A config has a ``[run]`` table, backends under ``[llm.<role>]`` (roles: generator, teacher,
judge, ...), a ``[seeds]`` table, one ``[source]`` and an ordered ``[[stages]]`` list; each source or
stage table has a ``type`` and that type's own keys (see core/registry.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthloop.core.llm.base import BackendSpec


class ConfigError(ValueError):
    """A bad config; the message is one line naming where."""


@dataclass
class RunSection:
    name: str = "run"
    out: str = ""                 # run directory; default runs/<name>
    limit: int = 0                # stop once this many records are kept (0: until the source ends)
    seed: int = 0
    shard_rows: int = 1000
    cache: str = "default"        # request cache file; "default" = <cache dir>/requests.sqlite, "off"
    round: int = 0
    executor: str = "pipelined"   # pipelined (many batches in flight) | sequential (one at a time)
    in_flight: int = 0            # requests kept in flight; 0 = the backend's default (vllm: 64 on a CPU)


@dataclass
class SeedsSection:
    path: str = "bundled"         # a file, or "bundled" for the seed set shipped with synthloop
    format: str = "auto"          # auto | self_instruct | alpaca | sharegpt | jsonl | parquet | txt
    fields: dict = field(default_factory=dict)   # generic jsonl/parquet: {instruction=, input=, output=}


@dataclass
class RunConfig:
    run: RunSection
    llm: dict[str, BackendSpec]
    seeds: SeedsSection
    source: dict
    stages: list[dict]
    path: str = ""
    text: str = ""

    def hash(self) -> str:
        """Identity of what the run produces: everything except how many records to stop at and
        how the work is scheduled (executors write the same records)."""
        body = {"run": {k: v for k, v in dataclasses.asdict(self.run).items()
                        if k not in ("limit", "out", "executor", "in_flight")},
                "llm": {k: dataclasses.asdict(v) for k, v in self.llm.items()},
                "seeds": dataclasses.asdict(self.seeds), "source": self.source, "stages": self.stages}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def line_of(text: str, key: str) -> int | None:
    """First line (1-based) where `key` is assigned or opens a table in TOML `text`."""
    # `key = ...`, `[table.key]`, or a key inside an inline table: `{ a = 1, key = 2 }`.
    pat = re.compile(rf"(^\s*(\[+\s*)?[\w.\"]*|[{{,]\s*)\b{re.escape(key)}\b\s*(=|\])")
    for i, line in enumerate(text.splitlines(), 1):
        if pat.search(line):
            return i
    return None


def where(path: str, text: str, key: str) -> str:
    line = line_of(text, key.split(".")[-1]) if text else None
    return f"{path}:{line}" if line else path


def from_dict(cls: type, data: dict, *, path: str, text: str, table: str) -> Any:
    """Build dataclass `cls` from `data`, naming any unknown key or wrong type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{where(path, text, key)}: [{table}] unknown key '{key}' "
                              f"(known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        want = hints[key]
        base = typing.get_origin(want) or want
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(base, type) and base is not typing.Any and not isinstance(value, base) \
                or (base is int and isinstance(value, bool)):
            raise ConfigError(f"{where(path, text, key)}: [{table}] '{key}' must be "
                              f"{getattr(base, '__name__', base)}, got {type(value).__name__}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if str(e).startswith(path):
            raise
        err = e
    except ValueError as e:          # the class's own checks (__post_init__)
        err = e
    # Point at the line of the first key the message names (else the file).
    key = next((k for k in data if k in str(err)), "")
    raise ConfigError(f"{where(path, text, key) if key else path}: [{table}] {err}") from None


def parse_config(text: str, *, path: str = "<config>", extra_tables: tuple[str, ...] = ()) -> RunConfig:
    """Parse and validate a run config; `extra_tables` are tables another reader checks (rounds)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    known = {"run", "llm", "seeds", "source", "stages", *extra_tables}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where(path, text, key)}: unknown table '{key}' (known: {', '.join(sorted(known))})")
    run = from_dict(RunSection, raw.get("run", {}), path=path, text=text, table="run")
    llm = {role: from_dict(BackendSpec, spec, path=path, text=text, table=f"llm.{role}")
           for role, spec in raw.get("llm", {"generator": {}}).items()}
    seeds = from_dict(SeedsSection, raw.get("seeds", {}), path=path, text=text, table="seeds")
    source = raw.get("source", {"type": "self_instruct"})
    stages = raw.get("stages", [])
    cfg = RunConfig(run=run, llm=llm, seeds=seeds, source=source, stages=stages, path=path, text=text)
    from synthloop.core.registry import validate
    validate(cfg)
    return cfg


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    return parse_config(text, path=str(path))

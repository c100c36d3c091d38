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
    executor: str = "pipelined"   # pipelined (many batches in flight) | sequential (one at a time) | ray
    in_flight: int = 0            # requests kept in flight; 0 = the backend's default (vllm: 64 on a CPU)
    ray: dict = field(default_factory=dict)   # [run.ray]: see RaySection (only read by the ray executor)

    def __post_init__(self):
        # The run directory defaults to runs/<name>: a name must not lead anywhere else.
        if not self.name.strip() or self.name in (".", "..") or any(c in self.name for c in "/\\") \
                or not self.name.isprintable():
            raise ValueError(f"'name' must be a plain name without '/', '..' or control characters, got {self.name!r} "
                             f"(set 'out' to put the run directory elsewhere)")


@dataclass
class RaySection:
    """``[run.ray]``: where and how the ray executor places its engines (engine/ray_engines.py)."""

    address: str = ""             # cluster to join; "" = $RAY_ADDRESS, else one started on this machine, else a new local one
    engines: int = 0              # engine actors per backend; 0 = the cluster's GPUs shared among the run's backends (1 without GPUs)
    gpus_per_engine: float = -1   # -1 = 1 where the cluster has GPUs and the backend runs a model (vllm, transformers), else 0
    cpus_per_engine: float = 1
    max_restarts: int = 3         # an engine actor that dies is restarted this often; its requests go to another meanwhile

    def __post_init__(self):
        if self.engines < 0 or self.cpus_per_engine < 0 or self.max_restarts < 0:
            raise ValueError("engines, cpus_per_engine and max_restarts must be >= 0")


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
                        if k not in ("limit", "out", "executor", "in_flight", "ray")},
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
    if not isinstance(data, dict):
        raise ConfigError(f"{where(path, text, table)}: [{table}] must be a table, got {_toml_type(data)}")
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


def _toml_type(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)


def parse_toml(text: str, path: str) -> dict:
    """TOML `text` as a dict; a syntax error is a ConfigError naming ``path:line``."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # Python 3.11's error has no line attribute; its message ends "(at line N, column M)".
        m = re.search(r"^(.*) \(at line (\d+), column \d+\)$", str(e))
        raise ConfigError(f"{path}:{m.group(2)}: {m.group(1)}" if m else f"{path}: {e}") from None


def read_config_text(path: str | Path) -> str:
    """A config file's text; unreadable or not UTF-8 is a ConfigError naming the file (and line)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None


def _check_tables(source: Any, stages: Any, *, path: str, text: str) -> None:
    """Source and stage tables are tables with a string `type`, before any builder sees them."""
    if not isinstance(source, dict):
        raise ConfigError(f"{where(path, text, 'source')}: 'source' must be a table, got {_toml_type(source)}")
    if not isinstance(stages, list) or not all(isinstance(t, dict) for t in stages):
        raise ConfigError(f"{where(path, text, 'stages')}: 'stages' must be an array of tables ([[stages]])")
    tables = [("source", source)] + [(f"stages.{i}", t) for i, t in enumerate(stages)]
    if source.get("type") == "mix" and "sources" in source:
        parts = source["sources"]
        if not isinstance(parts, list) or not all(isinstance(t, dict) for t in parts):
            raise ConfigError(f"{where(path, text, 'sources')}: [source] 'sources' must be an array of "
                              f"source tables, e.g. [{{ type = \"self_instruct\" }}]")
        tables += [(f"source.sources.{i}", t) for i, t in enumerate(parts)]
    for label, t in tables:
        if "type" in t and not isinstance(t["type"], str):
            raise ConfigError(f"{where(path, text, 'type')}: [{label}] 'type' must be a string, "
                              f"got {_toml_type(t['type'])}")


def parse_config(text: str, *, path: str = "<config>", extra_tables: tuple[str, ...] = ()) -> RunConfig:
    """Parse and validate a run config; `extra_tables` are tables another reader checks (rounds)."""
    raw = parse_toml(text, path)
    known = {"run", "llm", "seeds", "source", "stages", *extra_tables}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where(path, text, key)}: unknown table '{key}' (known: {', '.join(sorted(known))})")
    run = from_dict(RunSection, raw.get("run", {}), path=path, text=text, table="run")
    llm_tables = raw.get("llm", {"generator": {}})
    if not isinstance(llm_tables, dict):
        raise ConfigError(f"{where(path, text, 'llm')}: 'llm' must be tables [llm.<role>], got {_toml_type(llm_tables)}")
    llm = {role: from_dict(BackendSpec, spec, path=path, text=text, table=f"llm.{role}")
           for role, spec in llm_tables.items()}
    for role, spec in llm.items():
        if isinstance(spec.options, dict) and "api_key" in spec.options:
            # The config text is copied into every manifest and dataset card.
            raise ConfigError(f"{where(path, text, 'api_key')}: [llm.{role}] options.api_key: never put a key in a "
                              f"config; name an environment variable (api_key_env) or a file (api_key_file)")
    seeds = from_dict(SeedsSection, raw.get("seeds", {}), path=path, text=text, table="seeds")
    source = raw.get("source", {"type": "self_instruct"})
    stages = raw.get("stages", [])
    _check_tables(source, stages, path=path, text=text)
    cfg = RunConfig(run=run, llm=llm, seeds=seeds, source=source, stages=stages, path=path, text=text)
    from synthloop.core.registry import validate
    validate(cfg)
    return cfg


def load_config(path: str | Path) -> RunConfig:
    return parse_config(read_config_text(path), path=str(path))

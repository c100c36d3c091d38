"""Named sources and stages that a TOML config can enable, order and parameterise.

A module registers a builder with its config dataclass::

    @register("stage", "heuristics", HeuristicsConfig)
    def build(cfg: HeuristicsConfig, ctx: Context) -> Stage: ...

`build(kind, table, ctx)` validates the table (unknown keys are named) and calls the builder.
Builders get a `Context`: the run's seed and round, its directory, the seed records, the LLM
backends by role (built lazily, shared when two roles name the same backend, cached), and
`speculate()`: whether work ahead of need (a source's next steps) may start now.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from synthloop.generator.config import ConfigError, RunConfig, from_dict, where
from synthloop.generator.llm.base import LLM, BackendSpec
from synthloop.generator.stages import as_stage
from synthloop.seeds.loaders import SeedSet

#: Modules whose import registers sources and stages.
MODULES = [
    "synthloop.generator.sources", "synthloop.generator.mix",
    "synthloop.generator.self_instruct",
    "synthloop.generator.instances",
    "synthloop.generator.evol", "synthloop.generator.distill", "synthloop.generator.magpie",
    "synthloop.generator.constraints",
    "synthloop.generator.rejection",
    "synthloop.filters.heuristics",
    "synthloop.filters.judge",
    "synthloop.filters.deita",
    "synthloop.filters.ifd",
    "synthloop.filters.reward",
    "synthloop.filters.exact", "synthloop.filters.minhash", "synthloop.filters.embed_dedup",
]

_REGISTRY: dict[tuple[str, str], tuple[type, Callable]] = {}


def register(kind: str, name: str, config_cls: type) -> Callable:
    def deco(fn: Callable) -> Callable:
        _REGISTRY[(kind, name)] = (config_cls, fn)
        return fn
    return deco


def _load() -> None:
    for mod in MODULES:
        importlib.import_module(mod)


def names(kind: str) -> list[str]:
    _load()
    return sorted(n for k, n in _REGISTRY if k == kind)


@dataclass
class Context:
    """What a builder may use. `llm(role)` falls back to the generator backend."""

    config: RunConfig
    run_dir: Path
    seeds: SeedSet
    open_llm: Callable[[BackendSpec], LLM]
    # False while every answer so far came from the request cache: the run replays a finished
    # one and must not send requests that run never needed (see generator/executors.py).
    speculate: Callable[[], bool] = lambda: True
    _llms: dict = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.config.run.seed

    @property
    def round(self) -> int:
        return self.config.run.round

    def llm(self, role: str = "generator") -> LLM:
        spec = self.config.llm.get(role) or self.config.llm["generator"]
        key = repr(dataclasses.asdict(spec))
        if key not in self._llms:
            self._llms[key] = self.open_llm(spec)
        return self._llms[key]

    def llms(self) -> list[LLM]:
        return list(self._llms.values())


def _split(kind: str, table: dict, cfg: RunConfig, label: str) -> tuple[type, Callable, dict]:
    _load()
    if "type" not in table:
        raise ConfigError(f"{cfg.path}: [{label}] needs a 'type' (one of: {', '.join(names(kind))})")
    typ = table["type"]
    if (kind, typ) not in _REGISTRY:
        raise ConfigError(f"{where(cfg.path, cfg.text, 'type')}: [{label}] unknown {kind} type "
                          f"'{typ}' (known: {', '.join(names(kind))})")
    cls, fn = _REGISTRY[(kind, typ)]
    rest = {k: v for k, v in table.items() if k not in ("type", "name")}
    return cls, fn, rest


def validate(cfg: RunConfig) -> None:
    """Check every source/stage table against its config class without building anything."""
    if "generator" not in cfg.llm:
        raise ConfigError(f"{cfg.path}: [llm] needs a 'generator' backend")
    if cfg.run.executor not in ("pipelined", "sequential"):
        raise ConfigError(f"{where(cfg.path, cfg.text, 'executor')}: [run] executor must be pipelined or "
                          f"sequential, got '{cfg.run.executor}'")
    if cfg.run.in_flight < 0:
        raise ConfigError(f"{where(cfg.path, cfg.text, 'in_flight')}: [run] in_flight must be >= 0 (0: the backend's default)")
    for role, spec in cfg.llm.items():
        if spec.backend not in ("transformers", "vllm", "openai"):
            raise ConfigError(f"{where(cfg.path, cfg.text, 'backend')}: [llm.{role}] backend must be "
                              f"transformers, vllm or openai, got '{spec.backend}'")
    tables = [("source", cfg.source, "source")] + [
        ("stage", st, f"stages.{i}") for i, st in enumerate(cfg.stages)]
    # A mix source's parts are source tables too (generator/mix.py).
    tables[1:1] = [("source", t, f"source.sources.{i}") for i, t in enumerate(cfg.source.get("sources", []))
                   if cfg.source.get("type") == "mix" and isinstance(t, dict)]
    seen = set()
    for kind, table, label in tables:
        cls, _, rest = _split(kind, table, cfg, label)
        from_dict(cls, rest, path=cfg.path, text=cfg.text, table=label)
        if label.startswith("source."):
            continue                      # parts share the mix's name
        name = table.get("name", table["type"])
        if name in seen:
            raise ConfigError(f"{cfg.path}: two stages named '{name}'; give one a 'name'")
        seen.add(name)


def build(kind: str, table: dict, ctx: Context, label: str) -> Any:
    cls, fn, rest = _split(kind, table, ctx.config, label)
    obj = fn(from_dict(cls, rest, path=ctx.config.path, text=ctx.config.text, table=label), ctx)
    obj.name = table.get("name", table["type"])
    return as_stage(obj) if kind == "stage" else obj

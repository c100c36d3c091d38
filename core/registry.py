"""Named sources and stages that a TOML config can enable, order and parameterise.

This is the one place a stage is registered: its module is listed in `MODULES` and registers a
builder with its config dataclass::

    @register("stage", "exact_dedup", ExactConfig, tags=("dedup",))
    def build(cfg: ExactConfig, ctx: Context) -> Stage: ...

A scorer registers once with `scorer(name, ConfigCls)`: a function ``(cfg, llm) -> fn(batch) ->
batch`` (``llm(role)`` opens a backend). It is then both a pipeline stage of that name (tagged
"scorer") and a `synthloop score --scorer NAME`. What a stage is (``tags``) is asked, never listed
elsewhere: ``names("stage", tag="dedup")``.

`build(kind, table, ctx)` validates the table (unknown keys are named) and calls the builder.
Builders get a `Context`: the run's seed and round, its directory, the seed records, the LLM
backends by role (built lazily, shared when two roles name the same backend, cached), and
`speculate()`: whether work ahead of need (a source's next steps) may start now.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from synthloop.core.config import ConfigError, RaySection, RunConfig, from_dict, where
from synthloop.core.llm.base import LLM, BackendSpec
from synthloop.core.schema import SeedSet
from synthloop.core.stages import as_stage, per_batch

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
    "synthloop.filters.language", "synthloop.filters.safety",
]

_REGISTRY: dict[tuple[str, str], tuple[type, Callable]] = {}
_TAGS: dict[tuple[str, str], frozenset[str]] = {}


def register(kind: str, name: str, config_cls: type, *, tags: tuple[str, ...] = ()) -> Callable:
    """Register a builder of `kind` ("source", "stage" or "scorer") under `name`."""
    def deco(fn: Callable) -> Callable:
        _REGISTRY[(kind, name)] = (config_cls, fn)
        _TAGS[(kind, name)] = frozenset(tags)
        return fn
    return deco


def scorer(name: str, config_cls: type) -> Callable:
    """Register ``fn(cfg, llm) -> batch function`` as the scorer `name` and as a stage of that name.

    The stage keeps the scorer's state (`state`/`restore`) and closes it; a scorer that is an
    object (not a plain function) makes an ordered stage, as its counts are order-dependent."""
    def deco(fn: Callable) -> Callable:
        register("scorer", name, config_cls)(fn)

        def stage(cfg, ctx: "Context"):
            s = fn(cfg, ctx.llm)
            return per_batch(name, s, owner=None if inspect.isfunction(s) else s)
        register("stage", name, config_cls, tags=("scorer",))(stage)
        return fn
    return deco


def _load() -> None:
    for mod in MODULES:
        importlib.import_module(mod)


def names(kind: str, tag: str | None = None) -> list[str]:
    """Registered names of `kind`, only those tagged `tag` when given."""
    _load()
    return sorted(n for k, n in _REGISTRY if k == kind and (tag is None or tag in _TAGS[(k, n)]))


def config_class(kind: str, name: str) -> type:
    """The config dataclass `name` of `kind` was registered with."""
    _load()
    if (kind, name) not in _REGISTRY:
        raise ConfigError(f"unknown {kind} '{name}' (known: {', '.join(names(kind))})")
    return _REGISTRY[(kind, name)][0]


def build_scorer(name: str, settings: dict, llm: Callable[[str], LLM], *, path: str = "--set") -> Any:
    """The scorer `name` outside a pipeline: settings are checked like a stage table."""
    cls, fn = config_class("scorer", name), _REGISTRY[("scorer", name)][1]
    return fn(from_dict(cls, settings, path=path, text="", table=name), llm)


@dataclass
class Context:
    """What a builder may use. `llm(role)` falls back to the generator backend."""

    config: RunConfig
    run_dir: Path
    seeds: SeedSet
    open_llm: Callable[[BackendSpec], LLM]
    # False while every answer so far came from the request cache: the run replays a finished
    # one and must not send requests that run never needed (see engine/executors.py).
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
    if cfg.run.executor not in ("pipelined", "sequential", "ray"):
        raise ConfigError(f"{where(cfg.path, cfg.text, 'executor')}: [run] executor must be pipelined, "
                          f"sequential or ray, got '{cfg.run.executor}'")
    from_dict(RaySection, cfg.run.ray, path=cfg.path, text=cfg.text, table="run.ray")
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

"""The `mix` source: several sources in one run, their batches interleaved.

Each cycle takes `weights[i]` batches from source i (default one each), in the order listed; a
source that stops (its `max_steps`, or its patience) drops out and the others go on. Rows keep the
`method` of the source that made them, so a run can hold self-instruct and Magpie records side
by side and every later stage treats them alike::

    [source]
    type = "mix"
    sources = [
      { type = "self_instruct", prompts_per_step = 16 },
      { type = "magpie", requests_per_step = 8, max_steps = 2 },
    ]
    weights = [2, 1]          # two self-instruct batches, then one Magpie batch, and again

Rows a part drops are counted under this source's name in the manifest, each with the part's own
reason. State: the position in the cycle, which parts have stopped, and each part's own state, so
a resumed run continues with the same part and the same step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from synthloop.core.registry import Context, build, register


@dataclass
class MixConfig:
    sources: list = field(default_factory=list)   # source tables, each with its own `type`
    weights: list = field(default_factory=list)   # batches per cycle from each source; [] = one each


class Mix:
    def __init__(self, cfg: MixConfig, ctx: Context):
        if not cfg.sources:
            raise ValueError("mix: 'sources' needs at least one source table")
        if any(t.get("type") == "mix" for t in cfg.sources):
            raise ValueError("mix: a mix cannot contain another mix")
        weights = cfg.weights or [1] * len(cfg.sources)
        if len(weights) != len(cfg.sources) or any(not isinstance(w, int) or w < 1 for w in weights):
            raise ValueError(f"mix: 'weights' needs one integer >= 1 per source ({len(cfg.sources)})")
        self.parts = [build("source", t, ctx, f"source.sources.{i}") for i, t in enumerate(cfg.sources)]
        # The turn order of one cycle, e.g. weights [2, 1] -> [0, 0, 1].
        self.order = [i for i, w in enumerate(weights) for _ in range(w)]
        self.pos = 0
        self.stopped = [False] * len(self.parts)
        self._name = "mix"

    # The runner counts a source's drops under the source's name, and parts that rebuild their
    # state from rejects (self_instruct, magpie) look for that name: the parts take this one.
    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value
        for p in self.parts:
            p.name = value

    def state(self) -> dict:
        return {"pos": self.pos, "stopped": list(self.stopped),
                "parts": [p.state() if hasattr(p, "state") else {} for p in self.parts]}

    def restore(self, state: dict, committed) -> None:
        self.pos = state.get("pos", 0)
        self.stopped = list(state.get("stopped", self.stopped))
        for p, s in zip(self.parts, state.get("parts", [{}] * len(self.parts))):
            if hasattr(p, "restore"):
                p.restore(s, committed)

    async def __call__(self):
        streams = [p() for p in self.parts]
        try:
            while not all(self.stopped):
                i = self.order[self.pos]
                self.pos = (self.pos + 1) % len(self.order)
                if self.stopped[i]:
                    continue
                try:
                    batch = await anext(streams[i])
                except StopAsyncIteration:
                    self.stopped[i] = True
                    continue
                yield batch
        finally:
            for s in streams:
                await s.aclose()     # cancels the steps a part launched ahead


@register("source", "mix", MixConfig)
def build_mix(cfg: MixConfig, ctx: Context) -> Mix:
    return Mix(cfg, ctx)

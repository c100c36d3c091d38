"""Self-improvement rounds: generate with the student, curate, LoRA-train it, evaluate, repeat.

A rounds config is a run config (see core/config.py) plus two tables::

    [rounds]
    count = 2                 # rounds r = 0 .. count-1
    train_from = "base"       # "base": every adapter starts fresh; "last": continue the last one
    hard_examples = 16        # instructions the student answers worst become next round's seeds
    heldout = "bundled"       # held-out instruction/reference JSONL (tuner/data/heldout.jsonl)
    win_rate = true           # judge the new student against the previous one ([llm.judge], else generator)
    eval_limit = 0            # evaluate on the first N held-out pairs (0: all)
    benchmark = ""            # IFEval-format file to score every student on ("bundled": ours; "": none)
    benchmark_sampling = {}   # the students' settings there (default: greedy, max_tokens 1024)
    reseed = "loss"           # hard examples: "loss" (highest reference loss under the new student)
                              # or "pass_rate" (lowest rejection-sampling pass rate, constraints kept)

    [train]                   # tuner.sft.TrainConfig (base_model comes from [llm.generator].model)
    max_steps = 12

Round r writes ``OUT/round-NN/`` (a run directory: shards, rejects, manifest), then, when
``[train] method`` uses DPO, ``round-NN/pairs/`` (preference pairs from rejection sampling, see
outputs/export.py), then ``round-NN/adapter/`` and an entry in ``OUT/rounds.json``. With a
``benchmark`` the base student is scored once first (``base`` in rounds.json) and every round's
student after training. Each phase has a file contract and is
skipped when its output exists (a run whose manifest is complete, an adapter folder, an entry
with an eval), so a killed loop resumes where it stopped. Generation in round r uses the adapter
of round r-1 (vLLM: a `LoRARequest` per call; transformers: merged weights); dedup stages that
take a ``preload`` list are given every earlier round's shards, so no round re-emits old data.

``[train] peft`` picks what trains (lora, ia3, prefix, none = full fine-tune); ``round-NN/adapter/``
then holds that adapter, or for ``none`` a complete model folder, and every consumer (the
generator's backend, evaluation, the benchmark, hard examples) loads it by what it holds
(`core.models.student_kind`). vLLM cannot apply a prefix-tuning adapter, so ``peft = "prefix"``
with a vllm generator is refused when the config is read.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from synthloop.core.config import ConfigError, RunConfig, from_dict, parse_config, parse_toml, read_config_text, where
from synthloop.core.registry import names
from synthloop.core.llm.base import BackendSpec
from synthloop.outputs.paths import inside
from synthloop.outputs.rounds import load_base, load_rounds, record_base, record_round
from synthloop.outputs.run_reader import kept_paths, read_kept
from synthloop.tuner.sft import TrainConfig



@dataclass
class RoundsSection:
    count: int = 2
    train_from: str = "base"       # base | last
    hard_examples: int = 16
    heldout: str = "bundled"
    win_rate: bool = True
    eval_limit: int = 0
    benchmark: str = ""
    benchmark_sampling: dict = field(default_factory=dict)
    reseed: str = "loss"


@dataclass
class RoundsConfig:
    run: RunConfig
    rounds: RoundsSection
    train: dict


def load_rounds_config(path: str | Path) -> RoundsConfig:
    """Read a rounds config; the [rounds] and [train] tables are checked like every other table."""
    path = Path(path)
    text = read_config_text(path)
    raw = parse_toml(text, str(path))
    rounds = from_dict(RoundsSection, raw.get("rounds", {}), path=str(path), text=text, table="rounds")
    if rounds.train_from not in ("base", "last") or rounds.count < 1:
        raise ConfigError(f"{where(str(path), text, 'train_from')}: [rounds] needs count >= 1 and "
                          f"train_from = \"base\" or \"last\"")
    if rounds.reseed not in ("loss", "pass_rate"):
        raise ConfigError(f"{where(str(path), text, 'reseed')}: [rounds] reseed must be \"loss\" or "
                          f"\"pass_rate\", got \"{rounds.reseed}\"")
    if rounds.benchmark not in ("", "bundled"):
        from synthloop.tuner.benchmark import BenchmarkError, load_benchmark
        try:
            load_benchmark(rounds.benchmark)
        except (BenchmarkError, OSError) as e:
            raise ConfigError(f"{where(str(path), text, 'benchmark')}: [rounds] benchmark: {e}") from None
    train = raw.get("train", {})
    try:
        from_dict(TrainConfig, train, path=str(path), text=text, table="train")
    except ValueError as e:
        raise ConfigError(str(e) if isinstance(e, ConfigError) else f"{path}: [train] {e}") from None
    run = parse_config(text, path=str(path), extra_tables=("rounds", "train"))
    if train.get("peft") == "prefix" and run.llm.get("generator", BackendSpec()).backend == "vllm":
        raise ConfigError(f"{where(str(path), text, 'peft')}: [train] peft = \"prefix\" needs [llm.generator] "
                          f"backend = \"transformers\": vLLM cannot apply a prefix-tuning adapter, and it cannot "
                          f"be merged into the weights")
    return RoundsConfig(run=run, rounds=rounds, train=train)


def round_config(cfg: RoundsConfig, r: int, *, adapter: str | None, seeds: str | None,
                 earlier: list[Path]) -> RunConfig:
    """The run config of round r: the student with last round's adapter, reseeded, deduped against earlier rounds."""
    run = copy.deepcopy(cfg.run)
    run.run.round = r
    run.run.name = f"{cfg.run.run.name}-round-{r:02d}"
    for role, spec in list(run.llm.items()):
        if role == "generator" and adapter:
            run.llm[role] = BackendSpec(backend=spec.backend, model=spec.model,
                                        options={**spec.options, "adapter": adapter})
    if seeds:
        run.seeds.path, run.seeds.format = seeds, "auto"     # next_seeds.json or next_seeds.parquet
    globs = [str(p) for d in earlier for p in kept_paths(d)]
    dedup = names("stage", tag="dedup")
    for st in run.stages:
        if st["type"] in dedup and globs:
            st["preload"] = list(st.get("preload", [])) + globs
    return run


def _hard_examples(base_model: str, adapter: str, run_dir: Path, k: int, seeds_out: Path, original: str) -> int:
    """Write the k kept instructions with the highest reference loss under the new student, plus the
    original seeds, as an Alpaca JSON file; returns how many hard examples it holds."""
    from synthloop.seeds.loaders import load_seeds
    from synthloop.tuner.evaluate import load_student, reference_loss

    kept = read_kept(run_dir, columns=["instruction", "input", "response"])
    items = [{"instruction": i, "input": x, "output": y} for i, x, y in kept.iter_rows()]
    model, tok = load_student(base_model, adapter)
    losses = [reference_loss(model, tok, [it])["loss"] for it in items]
    hard = [it for _, it in sorted(zip(losses, items), key=lambda t: -t[0])[:k]]
    seeds = load_seeds(original).records
    rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["response"]}
            for r in seeds.iter_rows(named=True)] + hard
    tmp = seeds_out.with_name(seeds_out.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(seeds_out)
    return len(hard)


def _hard_by_pass_rate(run_dir: Path, k: int, seeds_out: Path, original: str) -> int:
    """Write the k tasks the student passed least often (rejection sampling's ``scores.pass_rate``,
    never-passed tasks first), then the original seeds, as a seed Parquet file in our schema, so each
    hard task comes back with its constraints, and first: a round stopped by `limit` still retries
    them. Returns how many hard examples it holds."""
    from synthloop.core.schema import SCHEMA
    from synthloop.outputs.run_reader import read_rejects
    from synthloop.outputs.shards import write_parquet_atomic
    from synthloop.seeds.loaders import load_seeds

    rate = pl.col("scores").struct.field("pass_rate")
    tried = pl.concat([read_kept(run_dir), read_rejects(run_dir).filter(pl.col("drop_reason") == "no_passing_sample")
                       .select(SCHEMA.names())], how="vertical").filter(rate.is_not_null())
    hard = (tried.with_row_index("order").sort([rate, "order"]).head(k).drop("order")
            .with_columns(pl.lit("").alias("response"), pl.lit(None, dtype=pl.String).alias("drop_reason")))
    hard = hard.with_columns(pl.col("messages").list.head(1))
    seeds = load_seeds(original).records
    rows = pl.concat([hard, seeds], how="vertical").unique(subset="id", keep="first", maintain_order=True)
    write_parquet_atomic(rows, seeds_out)
    return hard.height


def _benchmark(cfg: RoundsConfig, base_model: str, adapter: str | None) -> dict:
    """The student's scores on the [rounds] benchmark (answers through the generator's backend)."""
    from synthloop.tuner.benchmark import evaluate_benchmark

    path = None if cfg.rounds.benchmark == "bundled" else cfg.rounds.benchmark
    res = evaluate_benchmark(path=path, base_model=base_model, adapter=adapter, student=cfg.run.llm["generator"],
                             params=cfg.rounds.benchmark_sampling or None, keep_per_prompt=False)
    return {k: v for k, v in res.items() if k != "per_prompt"}


def _preference_pairs(rdir: Path) -> Path:
    """round-NN/pairs/: DPO pairs from the round's rejection sampling (file contract: skipped if there)."""
    from synthloop.outputs.export import export

    pairs = rdir / "pairs"
    if not (pairs / "pairs-00000.parquet").exists():
        res = export(rdir, "dpo", pairs)
        print(f"{rdir.name}: {res['rows']} preference pairs -> {pairs}", file=sys.stderr)
    return pairs


def run_rounds(cfg: RoundsConfig, out: str | Path | None = None, *, show_progress: bool = True,
               backend_factory=None) -> list[dict]:
    """Run (or resume) every round; returns the rounds.json entries.

    `backend_factory` builds the generation backends, as in `execute` (tests pass a scripted one);
    training and evaluation always load the student itself.

    >>> run_rounds(load_rounds_config("configs/rounds-quickstart.toml"))   # doctest: +SKIP
    """
    from synthloop.core.llm import open_llm
    from synthloop.engine.runner import execute
    from synthloop.tuner.evaluate import evaluate
    from synthloop.tuner.sft import summarize, train_in_fresh_process

    out = Path(out or cfg.run.run.out or Path("runs") / cfg.run.run.name)
    base_model = cfg.run.llm["generator"].model
    done = {e["round"]: e for e in load_rounds(out)}
    base_eval = load_base(out)
    if cfg.rounds.benchmark and not (base_eval and base_eval.get("benchmark")):
        print("base model: benchmark", file=sys.stderr)
        base_eval = {"benchmark": _benchmark(cfg, base_model, None)}
        record_base(out, base_eval)
    previous_bench = (base_eval or {}).get("benchmark")
    previous_loss = None
    adapter: str | None = None
    seeds: str | None = None
    earlier: list[Path] = []
    for r in range(cfg.rounds.count):
        rdir = inside(out, f"round-{r:02d}", what="round folder")
        if r in done and done[r].get("eval"):
            # rounds.json is data: the paths it names must stay inside the rounds directory.
            adapter = done[r]["adapter"] and str(inside(out, done[r]["adapter"], what="rounds.json adapter"))
            seeds = done[r].get("next_seeds")
            previous_bench = done[r]["eval"].get("benchmark") or previous_bench
            previous_loss = done[r]["eval"].get("loss")
            seeds = seeds and str(inside(out, seeds, what="rounds.json next_seeds"))
            earlier.append(rdir)
            print(f"round {r}: already complete", file=sys.stderr)
            continue
        print(f"round {r}: generating with {'base model' if not adapter else adapter}", file=sys.stderr)
        execute(round_config(cfg, r, adapter=adapter, seeds=seeds, earlier=earlier), out=rdir,
                show_progress=show_progress, backend_factory=backend_factory or open_llm)
        new_adapter = rdir / "adapter"
        if not (new_adapter / "train_metrics.json").exists():      # written last, inside the atomic folder
            print(f"round {r}: training {new_adapter}", file=sys.stderr)
            tcfg = TrainConfig(**{"base_model": base_model, **cfg.train,
                                  "init_adapter": adapter if cfg.rounds.train_from == "last" else None})
            if "dpo" in tcfg.method:
                _preference_pairs(rdir)
            train_in_fresh_process(tcfg, rdir, new_adapter, overwrite=True)
        metrics = json.loads((new_adapter / "train_metrics.json").read_text())
        print(f"round {r}: evaluating", file=sys.stderr)
        judge = cfg.run.llm.get("judge") or cfg.run.llm["generator"]
        heldout = None if cfg.rounds.heldout == "bundled" else cfg.rounds.heldout
        # Both students answer through the generator's backend (vLLM: the adapter as a LoRARequest).
        ev = evaluate(base_model=base_model, adapter=str(new_adapter), previous_adapter=adapter,
                      heldout=heldout, judge=judge if cfg.rounds.win_rate else None,
                      student=cfg.run.llm["generator"],
                      seed=cfg.run.run.seed, limit=cfg.rounds.eval_limit or None,
                      previous_loss=previous_loss is None)
        if previous_loss is not None:      # the previous student's loss is in its own entry already
            ev["previous_loss"] = previous_loss
        previous_loss = ev["loss"]
        if cfg.rounds.benchmark:
            print(f"round {r}: benchmark", file=sys.stderr)
            ev["benchmark"], ev["previous_benchmark"] = _benchmark(cfg, base_model, str(new_adapter)), previous_bench
            previous_bench = ev["benchmark"]
        next_seeds = None
        if cfg.rounds.hard_examples and r + 1 < cfg.rounds.count and cfg.rounds.reseed == "pass_rate":
            next_seeds = rdir / "next_seeds.parquet"
            ev["hard_examples"] = _hard_by_pass_rate(rdir, cfg.rounds.hard_examples, next_seeds, cfg.run.seeds.path)
        elif cfg.rounds.hard_examples and r + 1 < cfg.rounds.count:
            next_seeds = rdir / "next_seeds.json"
            ev["hard_examples"] = _hard_examples(base_model, str(new_adapter), rdir, cfg.rounds.hard_examples,
                                                 next_seeds, cfg.run.seeds.path)
        record_round(out, {"round": r, "run_dir": rdir.name, "adapter": f"{rdir.name}/adapter",
                           "next_seeds": next_seeds and f"{rdir.name}/{next_seeds.name}",
                           "records": pl.scan_parquet(kept_paths(rdir)).select(pl.len()).collect().item()
                           if kept_paths(rdir) else 0,
                           "train_metrics": summarize(metrics), "eval": ev})
        adapter, seeds = str(new_adapter), next_seeds and str(next_seeds)
        earlier.append(rdir)
    return load_rounds(out)

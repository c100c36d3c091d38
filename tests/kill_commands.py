"""The seven commands of the kill campaign on the scripted backend (tests/scripted_cli.py) and a
tiny random Llama for training: what each runs, where it can be killed, what it must leave; and
`run-embedded`, `run` generating with the embedded model (the slow variant).

`build_inputs(folder, tiny_model)` writes the shared inputs once (a finished run, a dedup input
with planted duplicates, a scored table, a training config); `commands(inputs)` returns the
`Command`s. Every trial writes into its own folder (`out/`, its own request cache).
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from collections import Counter
from pathlib import Path

import polars as pl

from kill_campaign import IN_CREATE, IN_MODIFY, IN_MOVED_TO, SCRIPTED_CLI, Command, Outcome, Trigger

RUN_CONFIG = """
[run]
name = "faults"
limit = {limit}
shard_rows = 9
cache = "{cache}"

[llm.generator]
backend = "transformers"
{model_line}

[llm.teacher]
backend = "transformers"
model = "teacher"

[source]
type = "mix"
sources = [
  {{ type = "self_instruct", prompts_per_step = 3, steps_in_flight = 2 }},
  {{ type = "magpie", pre_query = "<|im_start|>user\\n", end_of_turn = "<|im_end|>", requests_per_step = 4 }},
]

[[stages]]
type = "instances"

[[stages]]
type = "evol"
fraction = 0.5

[[stages]]
type = "distill"

[[stages]]
type = "heuristics"

[[stages]]
type = "exact_dedup"
"""

#: `run-embedded`: real generation by the embedded model (the slow variant, bench/faults.py only)
EMBEDDED_CONFIG = """
[run]
name = "faults-embedded"
limit = 4
shard_rows = 1
cache = "{cache}"

[llm.generator]
backend = "transformers"
options = {{ batch_size = 8 }}

[source]
type = "self_instruct"
prompts_per_step = 1
steps_in_flight = 1
sampling = {{ temperature = 1.0, top_p = 0.9, max_tokens = 96, stop = ["\\n\\n", "\\n14."] }}

[[stages]]
type = "distill"
sampling = {{ temperature = 0.7, top_p = 0.9, max_tokens = 160 }}

[[stages]]
type = "heuristics"
"""

ROUNDS_TABLES = """
[rounds]
count = 2
hard_examples = 3
eval_limit = 3
win_rate = false

[train]
max_steps = 2
batch_size = 2
max_length = 128
learning_rate = 5e-3
lora_r = 4
lora_alpha = 8
lora_dropout = 0.0
"""

TRAIN_TABLE = ROUNDS_TABLES.split("[train]", 1)[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(SCRIPTED_CLI), *args]


def _ids(path: Path) -> list[str]:
    return pl.read_parquet(path, columns=["id"])["id"].to_list() if path.exists() else []


def _run_triggers(prefix: str) -> list[Trigger]:
    return [
        Trigger("shard write", rf"^{prefix}(data|rejects|pending)/\..*\.tmp-\d+$", IN_CREATE, temp=True),
        Trigger("manifest write", rf"^{prefix}\.manifest\.json\.tmp-\d+$", IN_CREATE, temp=True),
        Trigger("manifest rename", rf"^{prefix}manifest\.json$", IN_MOVED_TO),
        Trigger("cache write", r"req\.sqlite-wal$", IN_MODIFY),
    ]


def run_outcome(run: Path, tag: str = "") -> Outcome:
    """A run directory's committed kept and rejected ids; its manifest must be complete and add up."""
    from synthloop.outputs.manifest import count_problems

    out = Outcome()
    path = run / "manifest.json"
    if not path.exists():
        out.problems.append(f"{run.name}: no manifest")
        return out
    m = json.loads(path.read_text())
    out.problems += [f"{run.name}: {p}" for p in count_problems(m)]
    if not m["complete"]:
        out.problems.append(f"{run.name}: not complete")
    for e in m["shards"]:
        out.kept.update(tag + i for i in _ids(run / e["path"]))
    for e in m["rejects"]:
        out.rejected.update(tag + i for i in _ids(run / e["path"]))
    out.extra[f"{tag}stages"] = m["stages"]
    return out


def committed_outcome(run: Path) -> Outcome:
    """The ids a killed run had committed (none before its first commit)."""
    if not (run / "manifest.json").exists():
        return Outcome()
    got = run_outcome(run)
    got.problems = []            # "not complete" is what a killed run is
    return got


def _table_outcome(out: Path, kept_name: str, rejects_name: str | None, n_in: int) -> Outcome:
    res = Outcome(Counter(_ids(out / kept_name)), Counter(_ids(out / rejects_name)) if rejects_name else Counter())
    if not (out / kept_name).exists() or (rejects_name and not (out / rejects_name).exists()):
        res.problems.append("output missing")
    total = sum(res.kept.values()) + sum(res.rejected.values())
    if n_in and total != n_in:
        res.problems.append(f"{total} rows out of {n_in} in")
    return res


def build_inputs(folder: Path, tiny_model: str) -> Path:
    """Shared inputs of the campaign, written once into `folder`."""
    from scripted_llm import scripted_factory

    from synthloop.core.config import parse_config
    from synthloop.engine.runner import execute

    folder.mkdir(parents=True, exist_ok=True)
    text = RUN_CONFIG.format(limit=40, cache=folder / "req.sqlite", model_line='model = "embedded"')
    run = folder / "run"
    execute(parse_config(text, path="inputs.toml"), out=run, show_progress=False, backend_factory=scripted_factory())
    kept = pl.read_parquet(run / "data" / "*.parquet")
    rng = random.Random(0)
    # dedup input: the run's rows, a third of them again, and near copies with one word changed
    again = kept.sample(fraction=0.34, seed=0)
    near = kept.sample(fraction=0.34, seed=1).with_columns(
        pl.col("response").map_elements(lambda s: s + " " + rng.choice(("indeed", "again", "today")),
                                        return_dtype=pl.String),
        ("near-" + pl.col("id")).alias("id"))
    pl.concat([kept, again, near]).write_parquet(folder / "dedup_in.parquet")
    kept.write_parquet(folder / "score_in.parquet")
    quality = [rng.random() for _ in range(kept.height)]
    kept.with_columns(pl.col("scores").struct.with_fields(pl.Series("quality", quality))).write_parquet(
        folder / "select_in.parquet")
    (folder / "train.toml").write_text("[train]" + TRAIN_TABLE + 'base_model = "' + tiny_model + '"\n')
    (folder / "tiny_model").write_text(tiny_model)
    return folder


def commands(inputs: Path) -> list[Command]:
    tiny = (inputs / "tiny_model").read_text()
    n_dedup = pl.read_parquet(inputs / "dedup_in.parquet", columns=["id"]).height
    n_score = pl.read_parquet(inputs / "score_in.parquet", columns=["id"]).height

    def run_prepare(trial: Path) -> None:
        (trial / "run.toml").write_text(RUN_CONFIG.format(limit=60, cache=trial / "req.sqlite",
                                                          model_line='model = "embedded"'))

    def rounds_prepare(trial: Path) -> None:
        (trial / "rounds.toml").write_text(
            RUN_CONFIG.format(limit=12, cache=trial / "req.sqlite", model_line=f'model = "{tiny}"')
            + ROUNDS_TABLES)

    def dedup_outcome(trial: Path) -> Outcome:
        out = trial / "out"
        if not (out / "summary.json").exists():
            return Outcome(problems=["no summary.json"])
        s = json.loads((out / "summary.json").read_text())
        res = Outcome()
        for name in s["kept_files"]:
            res.kept.update(_ids(out / name))
        for name in s["rejects_files"]:
            res.rejected.update(_ids(out / name))
        if s["records"] != s["kept"] + sum(s["dropped"].values()) or s["records"] != n_dedup:
            res.problems.append(f"summary counts: {s['records']} != {s['kept']} + {s['dropped']} (in: {n_dedup})")
        if sum(res.kept.values()) != s["kept"]:
            res.problems.append(f"kept files hold {sum(res.kept.values())} rows, summary says {s['kept']}")
        extra = sorted({p.name for p in out.glob("*.parquet")} - set(s["kept_files"] + s["rejects_files"]))
        if extra:
            res.problems.append(f"files the summary does not list: {extra}")
        return res

    def train_outcome(trial: Path) -> Outcome:
        out = trial / "adapter"
        res = Outcome()
        try:
            metrics = json.loads((out / "train_metrics.json").read_text())
            weights = hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
            json.loads((out / "adapter_config.json").read_text())
        except (OSError, ValueError) as e:
            res.problems.append(f"adapter incomplete: {e}")
            return res
        res.extra = {"examples": metrics["examples"], "final_loss": metrics["final_loss"], "weights": weights}
        return res

    def rounds_outcome(trial: Path) -> Outcome:
        out = trial / "out"
        res = Outcome()
        try:
            entries = json.loads((out / "rounds.json").read_text())["rounds"]
        except (OSError, ValueError, KeyError) as e:
            res.problems.append(f"rounds.json: {e}")
            return res
        if len(entries) != 2:
            res.problems.append(f"{len(entries)} rounds in rounds.json")
        for e in entries:
            got = run_outcome(out / e["run_dir"], tag=f"r{e['round']}:")
            res.kept += got.kept
            res.rejected += got.rejected
            res.problems += got.problems
            res.extra.update(got.extra)
            res.extra[f"r{e['round']}"] = {"records": e["records"], "final_loss": e["train_metrics"]["final_loss"],
                                           "eval_loss": e["eval"].get("loss"), "wins": e["eval"].get("wins")}
        return res

    def out_folder(trial: Path) -> None:      # made beforehand, so the watch sees its first file
        (trial / "out").mkdir()

    table_triggers = [
        Trigger("file write", r"^out/\.(kept|rejects)\.parquet\.tmp-\d+$", IN_CREATE, temp=True),
        Trigger("output rename", r"^out/(kept|rejects)\.parquet$", IN_MOVED_TO),
    ]
    def embedded_prepare(trial: Path) -> None:
        (trial / "run.toml").write_text(EMBEDDED_CONFIG.format(cache=trial / "req.sqlite"))

    return [
        Command("run-embedded",
                lambda t: [sys.executable, "-m", "synthloop.engine.cli", "run", str(t / "run.toml"),
                           "--out", str(t / "out"), "--quiet"],
                lambda t: run_outcome(t / "out"), _run_triggers("out/"), prepare=embedded_prepare,
                env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}, timeout=1800,
                committed=lambda t: committed_outcome(t / "out")),
        Command("run", lambda t: _cli("run", str(t / "run.toml"), "--out", str(t / "out"), "--quiet"),
                lambda t: run_outcome(t / "out"), _run_triggers("out/"), prepare=run_prepare),
        Command("dedup", lambda t: _cli("dedup", str(inputs / "dedup_in.parquet"), "--out", str(t / "out"),
                                        "--method", "minhash", "--batch-size", "16", "--shard-rows", "10", "--quiet"),
                dedup_outcome,
                [Trigger("shard write", r"^out/\.dedup-tmp-\d+/\..*\.tmp-\d+$", IN_CREATE, temp=True),
                 Trigger("output rename", r"^out/(kept|rejects)-\d+\.parquet$", IN_MOVED_TO),
                 Trigger("summary rename", r"^out/summary\.json$", IN_MOVED_TO)],
                prepare=out_folder, finished=lambda t: (t / "out" / "summary.json").exists()),
        Command("score", lambda t: _cli("score", str(inputs / "score_in.parquet"), "--out", str(t / "out"),
                                        "--scorer", "judge", "--model", "judge", "--set", "min_score=0.5",
                                        "--batch-rows", "4", "--quiet"),
                lambda t: _table_outcome(t / "out", "kept.parquet", "rejects.parquet", n_score), table_triggers,
                prepare=out_folder),
        Command("select", lambda t: _cli("select", str(inputs / "select_in.parquet"), "--out", str(t / "out"),
                                         "--budget", "15", "--score-column", "quality", "--quiet"),
                lambda t: _table_outcome(t / "out", "kept.parquet", "rejects.parquet", n_score), table_triggers,
                prepare=out_folder),
        Command("export", lambda t: _cli("export", "--format", "sft", str(inputs / "run"), "--out", str(t / "out")),
                lambda t: _table_outcome(t / "out", "sft-00000.parquet", None, n_score),
                [Trigger("file write", r"^out/\.sft-00000\.parquet\.tmp-\d+$", IN_CREATE, temp=True),
                 Trigger("output rename", r"^out/sft-00000\.parquet$", IN_MOVED_TO)], prepare=out_folder),
        Command("train", lambda t: _cli("train", str(inputs / "run"), "--out", str(t / "adapter"),
                                        "--config", str(inputs / "train.toml"), "--overwrite"),
                train_outcome,
                [Trigger("adapter save", r"^\.adapter\.tmp-\d+/\.tmp\w+$", IN_CREATE, temp=True),
                 Trigger("adapter config", r"^\.adapter\.tmp-\d+/adapter_config\.json$", IN_CREATE),
                 Trigger("metrics write", r"^\.adapter\.tmp-\d+/train_metrics\.json$", IN_CREATE),
                 Trigger("adapter rename", r"^adapter$", IN_MOVED_TO)]),
        Command("rounds", lambda t: _cli("rounds", str(t / "rounds.toml"), "--out", str(t / "out"), "--quiet"),
                rounds_outcome,
                _run_triggers(r"out/round-\d+/") + [
                    Trigger("adapter save", r"^out/round-\d+/\.adapter\.tmp-\d+/\.tmp\w+$", IN_CREATE, temp=True),
                    Trigger("rounds.json write", r"^out/\.rounds\.json\.tmp-\d+$", IN_CREATE, temp=True)],
                prepare=rounds_prepare, timeout=1200),
    ]

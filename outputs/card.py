"""A dataset card (``README.md`` in the run directory), in the Hugging Face Hub's format.

The YAML header tells the Hub (and ``datasets.load_dataset``) where the Parquet shards are; the
body gives the schema, counts per stage and per method, drop reasons, models, the rounds (if
any) and the exact config text, all read from the manifests and the committed shards.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import polars as pl

from synthloop.core.schema import SCHEMA, SCORES
from synthloop.outputs.manifest import load_manifest
from synthloop.outputs.rounds import load_rounds
from synthloop.outputs.run_reader import read_kept, round_dirs, run_dirs
from synthloop.outputs.shards import write_bytes_atomic

COLUMNS = {
    "id": "content hash of the normalised instruction + input (stable across runs and rounds)",
    "instruction": "the task",
    "input": "optional context for the task (\"\" when none)",
    "response": "the answer",
    "messages": "the same pair in chat form (`role`, `content`): what TRL and axolotl read",
    "method": "how the record was made: seed, self_instruct, evol:<op>, distill, magpie, ...",
    "parent_id": "the record it was derived from (lineage), if any",
    "generation": "evolution depth (0 for anything not evolved)",
    "round": "self-improvement round that produced it",
    "model": "model that wrote the record",
    "constraints": "verifiable constraints on the response (`id`, `kwargs` as JSON); [] when none",
    "language": "detected language: ISO 639-1 `code` and the detector's `confidence` (CLD2, or fastText lid.176 where CLD2 is unsure)",
    "scores": "scorer outputs (" + ", ".join(f.name for f in SCORES.fields) + "); null where unscored",
    "drop_reason": "always null in the kept data (set only in rejects/)",
}


def _cell(v) -> str:
    """A table cell: Markdown renders inline HTML, so text from configs and data is escaped."""
    return html.escape(str(v), quote=False).replace("|", "\\|").replace("\n", " ")


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text`, so the text cannot close it."""
    return "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows), ""]


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "n>10M"


def render_card(run_dir: str | Path) -> str:
    """The card's Markdown text for a run directory or a rounds directory.

    >>> print(render_card("runs/quickstart")[:3])      # doctest: +SKIP
    ---
    """
    run_dir = Path(run_dir)
    runs = [(rnd, path, load_manifest(path) or {}) for rnd, path in run_dirs(run_dir)]
    kept = pl.concat([read_kept(p, ["method", "round", "scores", "language"]) for _, p, _ in runs], how="vertical")
    is_rounds = bool(round_dirs(run_dir))
    data_glob = "round-*/data/*.parquet" if is_rounds else "data/*.parquet"
    first = runs[0][2]
    name = first.get("name", run_dir.name)
    complete = all(m.get("complete") for _, _, m in runs)
    lines = ["---", f"pretty_name: {json.dumps(name)}", *_language_yaml(kept), "task_categories:", "- text-generation",
             "tags:", "- synthetic", "- instruction-tuning", "- synthloop",
             "size_categories:", f"- {_size_category(kept.height)}",
             "configs:", "- config_name: default", "  data_files:", "  - split: train", f"    path: {data_glob}",
             "---", "", f"# {html.escape(name, quote=False)}", "",
             f"Synthetic instruction/response data grown from seed tasks by synthloop: {kept.height} records"
             + (f" over {len(runs)} rounds" if is_rounds else "") + "."
             + ("" if complete else " **The run is not complete**: rows not yet filling a shard are held in "
                "pending/ and are not matched by the data files above."), ""]

    lines += ["## Loading", "", "```python", "from datasets import load_dataset",
              f"ds = load_dataset(\"parquet\", data_files=\"{run_dir}/{data_glob}\", split=\"train\")",
              "# TRL's SFTTrainer reads the `messages` column as a conversational dataset:",
              "# SFTTrainer(model=..., train_dataset=ds.select_columns([\"messages\"]), ...)", "```", ""]

    lines += ["## Schema", ""] + _md_table(["column", "type", "meaning"],
                                           [[c, str(t), COLUMNS.get(c, "")] for c, t in SCHEMA.items()])

    by_method = kept.group_by("method").len("records").sort("records", descending=True)
    lines += ["## Records per generation method", ""] + _md_table(["method", "records"], by_method.rows())
    lines += _languages_section(kept, runs)

    for rnd, path, m in runs:
        title = f"## Pipeline, round {rnd}" if rnd is not None else "## Pipeline"
        stages = m.get("stages", [])
        lines += [title, ""] + _md_table(
            ["stage", "in", "created", "kept", "dropped", "drop reasons"],
            [[s["name"], s["in"], s["created"], s["kept"], s["dropped_total"],
              ", ".join(f"{k}: {v}" for k, v in s.get("dropped", {}).items())] for s in stages])

    lines += _safety_section(runs)

    scored = [(f.name, kept["scores"].struct.field(f.name).drop_nulls().cast(pl.Float64))   # booleans as 0/1
              for f in SCORES.fields] if kept.height else []
    scored = [(n, s) for n, s in scored if s.len()]
    if scored:
        lines += ["## Scores (kept records)", ""] + _md_table(
            ["field", "scored", "mean", "min", "max"],
            [[n, s.len(), f"{s.mean():.3f}", f"{s.min():.3f}", f"{s.max():.3f}"] for n, s in scored])

    models = {}
    for rnd, _, m in runs:
        for role, model in m.get("models", {}).items():
            models.setdefault((role, model), []).append("all" if rnd is None else str(rnd))
    lines += ["## Models", ""] + _md_table(["role", "backend:model", "rounds"],
                                           [[r, mdl, ", ".join(rs)] for (r, mdl), rs in models.items()])
    usage = [[rnd if rnd is not None else "", *(m.get("llm", {}).get("total", {}).get(k, 0)
              for k in ("requests", "errors", "cache_hits", "prompt_tokens", "completion_tokens"))]
             for rnd, _, m in runs]
    lines += ["LLM usage:", ""] + _md_table(["round", "requests", "errors", "cache hits", "prompt tokens",
                                             "completion tokens"], usage)

    rounds = load_rounds(run_dir)
    if rounds:
        lines += ["## Rounds", "", "Each round's student was LoRA-trained on the curated data and evaluated on a "
                  "held-out set (loss of reference answers; judge win-rate against the previous student).", ""]
        lines += _md_table(["round", "adapter", "held-out loss", "win-rate"],
                           [[r["round"], r.get("adapter") or "(base)", _num((r.get("eval") or {}).get("loss")),
                             _num((r.get("eval") or {}).get("win_rate"))] for r in rounds])

    seeds = first.get("seeds", {})
    config = (first.get("config") or "").rstrip()
    lines += ["## Seeds", "", f"{seeds.get('records', '?')} seed records from `{seeds.get('path', '?')}`.", "",
              "## Config", "", f"From `{first.get('config_path', '')}` (config hash {first.get('config_hash', '')}):", "",
              _fence(config) + "toml", config, _fence(config), ""]
    return "\n".join(lines)


def _language_counts(kept: pl.DataFrame) -> list[tuple[str, int]]:
    codes = kept["language"].struct.field("code").fill_null("und")
    return sorted(codes.value_counts().rows(), key=lambda r: (-r[1], r[0]))


def _language_yaml(kept: pl.DataFrame) -> list[str]:
    """The header's `language:` list: every detected code, most records first."""
    codes = [c for c, _ in _language_counts(kept) if c != "und"]
    return ["language:", *(f"- {c}" for c in codes)] if codes else []


def _languages_section(kept: pl.DataFrame, runs: list) -> list[str]:
    """Kept records per detected language (filters/language.py), and what a language filter dropped."""
    if not kept.height:
        return []
    out = ["## Languages", "", "Detected per record (instruction and response) with CLD2, or fastText's lid.176 "
           "model where CLD2 is unsure; ISO 639-1 codes, `und`: nothing to detect.", ""]
    out += _md_table(["language", "records", "share"],
                     [[c, n, f"{n / kept.height:.1%}"] for c, n in _language_counts(kept)])
    dropped = {}
    for _, _, m in runs:
        for stage, st in (m.get("state") or {}).items():
            if isinstance(st, dict) and set(st) == {"detected", "dropped"}:
                for code, n in st["dropped"].items():
                    dropped[(stage, code)] = dropped.get((stage, code), 0) + n
    if dropped:
        out += ["Dropped by the language filter:", ""] + _md_table(
            ["stage", "language", "records"], [[s, c, n] for (s, c), n in sorted(dropped.items())])
    return out


def _safety_section(runs: list) -> list[str]:
    """What each safety screen (filters/safety.py) flagged, per category, summed over rounds."""
    screens: dict[str, dict] = {}
    for _, _, m in runs:
        for stage, st in (m.get("state") or {}).items():
            if isinstance(st, dict) and {"screened", "flagged", "by_category"} <= set(st):
                tot = screens.setdefault(stage, {"screened": 0, "flagged": 0, "unparsed": 0, "by_category": {},
                                                 "dropped": 0})
                for k in ("screened", "flagged", "unparsed"):
                    tot[k] += st.get(k, 0)
                for cat, n in st["by_category"].items():
                    tot["by_category"][cat] = tot["by_category"].get(cat, 0) + n
                row = next((s for s in m.get("stages", []) if s["name"] == stage), {})
                tot["dropped"] += sum(n for r, n in row.get("dropped", {}).items() if r.startswith("unsafe:"))
    if not screens:
        return []
    out = ["## Safety screen", "", "Each pair was screened for unsafe content (violence, weapons, self-harm, sexual "
           "content with minors, hate, drugs, malware, fraud, personal data); flagged pairs are dropped "
           "(`unsafe:<category>` in rejects/) or kept with `scores.safety = 0`.", ""]
    return out + _md_table(
        ["stage", "screened", "flagged", "dropped", "unparsed", "flagged by category"],
        [[s, t["screened"], t["flagged"], t["dropped"], t["unparsed"],
          ", ".join(f"{c}: {n}" for c, n in sorted(t["by_category"].items())) or "none"]
         for s, t in screens.items()])


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def write_card(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/README.md`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    path = run_dir / "README.md"
    write_bytes_atomic(render_card(run_dir).encode("utf-8"), path)
    return path

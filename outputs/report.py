"""`synthloop report RUN_DIR`: an HTML page with PNG plots of what a run (or a loop of rounds) did.

Plots: kept/dropped funnel per stage (one panel per round), drop reasons, histograms of every
score field that has values (kept vs dropped), survivors per generation method, and, when
``rounds.json`` exists, held-out loss and judge win-rate per round. Counts come from the
manifests (the commit record); scores and methods from the committed shards. Everything is
read-only, so a report can be made while a run is still going.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from synthloop.core.schema import SCHEMA, SCORES
from synthloop.outputs.manifest import load_manifest
from synthloop.outputs.paths import inside
from synthloop.outputs.rounds import load_base, load_rounds
from synthloop.outputs.run_reader import kept_paths, read_kept, read_rejects, run_dirs
from synthloop.outputs.shards import scan_shards, write_bytes_atomic

KEPT, DROPPED = "#2b7bba", "#d9534f"
EXAMPLES = 5          # kept records shown per run, as text (escaped: it is model output)


@dataclass
class RunData:
    round: int | None
    path: Path
    manifest: dict
    kept: pl.DataFrame        # method, scores
    rejects: pl.DataFrame     # method, scores, drop_reason, drop_stage
    examples: pl.DataFrame    # method, instruction, response of the first few kept records

    @property
    def label(self) -> str:
        return f"round {self.round}" if self.round is not None else self.manifest.get("name", self.path.name)


def load_runs(run_dir: str | Path) -> list[RunData]:
    """Manifest + the columns the plots need, for every run directory under `run_dir`."""
    runs = []
    for rnd, path in run_dirs(run_dir):
        runs.append(RunData(rnd, path, load_manifest(path) or {},
                            read_kept(path, ["method", "scores"]),
                            read_rejects(path, ["method", "scores", "drop_reason", "drop_stage"]),
                            scan_shards(kept_paths(path), SCHEMA).select("method", "instruction", "response")
                            .head(EXAMPLES).collect()))
    return runs


def _clip(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[:n] + " ..."


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot global state, safe next to any other backend.
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_funnel(runs: list[RunData], path: Path) -> Path:
    """Stacked kept/dropped bars per stage, one panel per run (round)."""
    fig = _figure(8, 0.6 + 2.6 * len(runs))
    for i, run in enumerate(runs):
        ax = fig.add_subplot(len(runs), 1, i + 1)
        stages = run.manifest.get("stages", [])
        names = [s["name"] for s in stages][::-1]
        kept = [s["kept"] for s in stages][::-1]
        dropped = [s["dropped_total"] for s in stages][::-1]
        ax.barh(names, kept, color=KEPT, label="kept")
        ax.barh(names, dropped, left=kept, color=DROPPED, label="dropped")
        for y, (k, d) in enumerate(zip(kept, dropped)):
            ax.text(k + d, y, f" {k} / {d}", va="center", fontsize=8)
        ax.set_title(f"{run.label}: kept / dropped per stage", fontsize=10)
        ax.margins(x=0.15)
        if i == 0:
            ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def drop_reason_counts(runs: list[RunData]) -> pl.DataFrame:
    """(label, stage, reason, count) from the manifests."""
    rows = [{"label": r.label, "stage": s["name"], "reason": reason, "count": n}
            for r in runs for s in r.manifest.get("stages", []) for reason, n in s.get("dropped", {}).items() if n]
    return pl.DataFrame(rows, schema={"label": pl.String, "stage": pl.String, "reason": pl.String, "count": pl.Int64})


def plot_drop_reasons(runs: list[RunData], path: Path) -> Path | None:
    counts = drop_reason_counts(runs)
    if counts.is_empty():
        return None
    counts = counts.with_columns(key=pl.col("stage") + ": " + pl.col("reason"))
    order = counts.group_by("key").agg(pl.col("count").sum()).sort("count")["key"].to_list()
    fig = _figure(8, 1 + 0.35 * len(order))
    ax = fig.add_subplot(1, 1, 1)
    left = [0] * len(order)
    for label in dict.fromkeys(counts["label"].to_list()):   # one stacked segment per round
        part = dict(counts.filter(pl.col("label") == label).group_by("key").agg(pl.col("count").sum()).iter_rows())
        vals = [part.get(k, 0) for k in order]
        ax.barh(order, vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("records dropped")
    ax.set_title("drop reasons (stage: reason)", fontsize=10)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def score_fields(runs: list[RunData]) -> list[str]:
    """Score fields with at least one value in the kept or dropped records."""
    fields = []
    for name in (f.name for f in SCORES.fields):
        if any(df.height and df["scores"].struct.field(name).is_not_null().any()
               for r in runs for df in (r.kept, r.rejects)):
            fields.append(name)
    return fields


def plot_scores(runs: list[RunData], fields: list[str], path: Path) -> Path | None:
    if not fields:
        return None
    fig = _figure(8, 2.6 * len(fields))
    for i, name in enumerate(fields):
        ax = fig.add_subplot(len(fields), 1, i + 1)
        for label, frames, color in (("kept", [r.kept for r in runs], KEPT), ("dropped", [r.rejects for r in runs], DROPPED)):
            vals = [float(v) for df in frames if df.height     # booleans (verified_all) as 0/1
                    for v in df["scores"].struct.field(name).drop_nulls().to_list()]
            if vals:
                ax.hist(vals, bins=30, alpha=0.6, color=color, label=f"{label} (n={len(vals)})")
        ax.set_title(f"scores.{name}", fontsize=10)
        ax.legend(fontsize=8)
    return _save(fig, path)


def method_counts(runs: list[RunData]) -> pl.DataFrame:
    """(label, method, kept, dropped) per run."""
    parts = []
    for r in runs:
        k = r.kept.group_by("method").len("kept")
        d = r.rejects.group_by("method").len("dropped")
        both = k.join(d, on="method", how="full", coalesce=True).fill_null(0)
        parts.append(both.with_columns(pl.lit(r.label).alias("label")))
    if not parts:
        return pl.DataFrame(schema={"label": pl.String, "method": pl.String, "kept": pl.UInt32, "dropped": pl.UInt32})
    return pl.concat(parts, how="vertical_relaxed").select("label", "method", "kept", "dropped").sort("label", "method")


def plot_methods(runs: list[RunData], path: Path) -> Path | None:
    counts = method_counts(runs)
    if counts.is_empty():
        return None
    labels = list(dict.fromkeys(counts["label"].to_list()))
    fig = _figure(8, 0.6 + max(2.0, 0.5 * counts["method"].n_unique()) * len(labels))
    for i, label in enumerate(labels):
        part = counts.filter(pl.col("label") == label).sort("kept")
        ax = fig.add_subplot(len(labels), 1, i + 1)
        methods = [m or "(none)" for m in part["method"].to_list()]
        kept, dropped = part["kept"].to_list(), part["dropped"].to_list()
        ax.barh(methods, kept, color=KEPT, label="kept")
        ax.barh(methods, dropped, left=kept, color=DROPPED, label="dropped")
        for y, (k, d) in enumerate(zip(kept, dropped)):
            ax.text(k + d, y, f" {k}/{k + d} kept", va="center", fontsize=8)
        ax.set_title(f"{label}: survivors per generation method", fontsize=10)
        ax.margins(x=0.2)
        if i == 0:
            ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def base_loss(rounds: list[dict]) -> float | None:
    """The base model's held-out loss: the first round's previous student, when that was the base."""
    first = (rounds[0].get("eval") or {}) if rounds else {}
    if first.get("previous_adapter") is None and rounds and rounds[0]["round"] == 0:
        return first.get("previous_loss")
    return None


def plot_rounds(rounds: list[dict], path: Path) -> Path | None:
    """Held-out loss and judge win-rate per round (from rounds.json)."""
    ev = [(r["round"], r.get("eval") or {}) for r in rounds]
    if not any(e.get("loss") is not None or e.get("win_rate") is not None for _, e in ev):
        return None
    fig = _figure(8, 5)
    ax = fig.add_subplot(2, 1, 1)
    pts = [(n, e["loss"]) for n, e in ev if e.get("loss") is not None]
    if pts:
        ax.plot(*zip(*pts), marker="o", color=KEPT, label="student")
    if base_loss(rounds) is not None:
        ax.axhline(base_loss(rounds), linestyle="--", color="grey", label="base model")
    ax.set_ylabel("held-out loss")
    ax.set_title("held-out reference loss per round (lower is better)", fontsize=10)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(2, 1, 2)
    pts = [(n, e["win_rate"]) for n, e in ev if e.get("win_rate") is not None]
    if pts:
        ax.plot(*zip(*pts), marker="o", color=KEPT)
    ax.axhline(0.5, linestyle="--", color="grey")
    ax.set_ylim(0, 1)
    ax.set_xlabel("round")
    ax.set_ylabel("win-rate vs previous")
    ax.set_title("judge win-rate of each round's student over the previous one", fontsize=10)
    ticks = [n for n, _ in ev]
    for a in fig.axes:   # both panels on the same round axis, even where a round has no win-rate
        a.set_xticks(ticks)
        a.set_xlim(min(ticks) - 0.3, max(ticks) + 0.3)
    return _save(fig, path)


def plot_benchmark(rounds: list[dict], base: dict | None, path: Path) -> Path | None:
    """Benchmark accuracy (prompt- and instruction-level, loose) per round, the base model dashed."""
    pts = [(r["round"], (r.get("eval") or {}).get("benchmark")) for r in rounds]
    pts = [(n, b) for n, b in pts if b]
    if not pts:
        return None
    fig = _figure(8, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    for key, color, label in (("prompt_loose", KEPT, "prompt-level"), ("instruction_loose", DROPPED, "instruction-level")):
        ax.plot([n for n, _ in pts], [b[key] for _, b in pts], marker="o", color=color, label=f"{label} (loose)")
        if base and base.get(key) is not None:
            ax.axhline(base[key], linestyle="--", color=color, alpha=0.6, label=f"base model, {label}")
    ax.set_ylim(0, 1)
    ax.set_xticks([n for n, _ in pts])
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title("verifiable benchmark per round (higher is better)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def _bench(ev: dict) -> str:
    b = ev.get("benchmark")
    return f"{b['prompt_loose']:.3f} / {b['instruction_loose']:.3f}" if b else ""


def render_html(run_dir: Path, runs: list[RunData], rounds: list[dict], plots: list[tuple[str, Path]]) -> str:
    summary = [[r.label, sum(e["rows"] for e in r.manifest.get("shards", []))
                + r.manifest.get("pending_rows", {}).get("kept", 0),
                sum(s["dropped_total"] for s in r.manifest.get("stages", [])),
                len(r.manifest.get("shards", [])), r.manifest.get("complete", False),
                ", ".join(f"{k}={v}" for k, v in r.manifest.get("models", {}).items())] for r in runs]
    parts = [f"<h1>synthloop report: {html.escape(run_dir.name)}</h1>",
             _table(["run", "kept", "dropped", "shards", "complete", "models"], summary)]
    for r in runs:
        parts.append(f"<h3>{html.escape(r.label)}: stages</h3>")
        parts.append(_table(["stage", "in", "created", "kept", "dropped", "reasons"],
                            [[s["name"], s["in"], s["created"], s["kept"], s["dropped_total"],
                              ", ".join(f"{k}: {v}" for k, v in s.get("dropped", {}).items())]
                             for s in r.manifest.get("stages", [])]))
        if r.examples.height:
            parts.append(f"<h3>{html.escape(r.label)}: first kept records</h3>")
            parts.append(_table(["method", "instruction", "response"],
                                [[m, _clip(i), _clip(a)] for m, i, a in r.examples.rows()]))
    if rounds:
        parts.append("<h2>rounds</h2>")
        parts.append(_table(["round", "run dir", "adapter", "train steps", "final train loss", "held-out loss",
                             "win-rate", "wins/losses/ties", "parse failures", "benchmark prompt/instr. (loose)"],
                            [[r["round"], r.get("run_dir", ""), r.get("adapter") or "(base)",
                              _fmt((r.get("train_metrics") or {}).get("steps")),
                              _fmt((r.get("train_metrics") or {}).get("final_loss")),
                              _fmt((r.get("eval") or {}).get("loss")), _fmt((r.get("eval") or {}).get("win_rate")),
                              "/".join(_fmt((r.get("eval") or {}).get(k)) for k in ("wins", "losses", "ties")),
                              _fmt((r.get("eval") or {}).get("parse_failures")), _bench(r.get("eval") or {})]
                             for r in rounds]))
        if base_loss(rounds) is not None:
            parts.append(f"<p>held-out loss of the base model: {_fmt(base_loss(rounds))}</p>")
        base = load_base(run_dir) or {}
        if base.get("benchmark"):
            parts.append(f"<p>benchmark of the base model, prompt/instruction-level (loose): "
                         f"{_bench(base)}</p>")
    for title, png in plots:
        parts.append(f"<h2>{html.escape(title)}</h2><img src=\"{html.escape(png.name)}\" alt=\"{html.escape(title)}\">")
    style = ("body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>synthloop report: "
            f"{html.escape(run_dir.name)}</title><style>{style}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report/index.html`` and its PNGs; returns the index path.

    >>> write_report("runs/quickstart")          # doctest: +SKIP
    PosixPath('runs/quickstart/report/index.html')
    """
    run_dir = Path(run_dir)
    runs = load_runs(run_dir)
    rounds = load_rounds(run_dir)
    out = inside(run_dir, "report", what="report folder")     # a symlink out of the run is refused
    out.mkdir(parents=True, exist_ok=True)
    fields = score_fields(runs)
    made = [("Funnel", plot_funnel(runs, out / "funnel.png")),
            ("Drop reasons", plot_drop_reasons(runs, out / "drop_reasons.png")),
            ("Scores", plot_scores(runs, fields, out / "scores.png")),
            ("Survivors per generation method", plot_methods(runs, out / "methods.png")),
            ("Rounds: held-out loss and win-rate", plot_rounds(rounds, out / "rounds.png")),
            ("Rounds: verifiable benchmark", plot_benchmark(rounds, (load_base(run_dir) or {}).get("benchmark"),
                                                            out / "benchmark.png"))]
    plots = [(t, p) for t, p in made if p is not None]
    for stale in set(out.glob("*.png")) - {p for _, p in plots}:   # a plot that no longer applies
        stale.unlink()
    index = out / "index.html"
    write_bytes_atomic(render_html(run_dir, runs, rounds, plots).encode("utf-8"), index)
    return index

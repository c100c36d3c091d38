"""`manifest.json`: the commit record of a run directory.

Only shards listed here are part of the dataset; the manifest is replaced atomically, so it is the
single commit point of a run. Per-stage counts obey ``in + created == kept + dropped`` and each
stage's ``in`` equals the previous stage's ``kept``, and ``languages`` (kept rows per language
code) adds up to the last stage's ``kept``; `count_problems` checks all three.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = 1


def load_manifest(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def save_manifest(run_dir: Path, manifest: dict) -> None:
    path = Path(run_dir) / "manifest.json"
    tmp = path.with_name(f".manifest.json.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def model_identity(spec) -> dict:
    """What a role's `[llm.*]` table runs, exactly, for ``manifest.json`` → ``model_details``: the
    ``name`` its records carry in the `model` column, the resolved local ``path`` with a weights
    ``fingerprint`` (`core.models.weights_fingerprint`) or the HF hub ``revision`` the path is a
    snapshot of, the ``quantization`` (`core.models.quantization_of`), the student ``adapter`` with
    its kind, and for a served model its ``base_url``.

    >>> model_identity(BackendSpec(backend="vllm", model="models/qwen-7b-awq"))    # doctest: +SKIP
    {'backend': 'vllm', 'model': 'models/qwen-7b-awq', 'name': 'models/qwen-7b-awq[awq]', 'quantization': 'awq', ...}
    """
    from synthloop.core.models import (model_name, quantization_of, resolve_model, student_kind, student_weights,
                                       weights_fingerprint)

    opts = dict(spec.options)
    out = {"backend": spec.backend, "model": spec.model}
    if spec.backend == "openai":
        return {**out, "name": opts.get("name") or f"openai:{spec.model}", "base_url": opts.get("base_url")}
    adapter = opts.get("adapter")
    path = student_weights(spec.model, adapter)[0] if adapter else resolve_model(spec.model)
    quant = quantization_of(path, opts)
    out.update(name=opts.get("name") or model_name(spec.model, adapter, quant), path=str(Path(path).resolve()),
               quantization=quant, fingerprint=weights_fingerprint(path))
    if Path(path).parent.name == "snapshots":        # a Hugging Face hub cache folder: its commit
        out["revision"] = Path(path).name
    if adapter:
        out["adapter"] = {"path": str(adapter), "kind": student_kind(adapter)}
    return out


def stage_row(name: str, n_in: int, kept: int, dropped: dict[str, int]) -> dict:
    """One stage's counts; `created` is derived (rows the stage added)."""
    total = sum(dropped.values())
    return {"name": name, "in": n_in, "created": kept + total - n_in, "kept": kept,
            "dropped": dict(sorted(dropped.items())), "dropped_total": total}


def count_problems(manifest: dict) -> list[str]:
    """Every way the manifest's counts fail to add up; empty when they do."""
    out, prev_kept = [], None
    for st in manifest.get("stages", []):
        if st["in"] + st["created"] != st["kept"] + sum(st["dropped"].values()):
            out.append(f"stage {st['name']}: in + created != kept + dropped")
        if st["dropped_total"] != sum(st["dropped"].values()):
            out.append(f"stage {st['name']}: dropped_total is not the sum of reasons")
        if prev_kept is not None and st["in"] != prev_kept:
            out.append(f"stage {st['name']}: in={st['in']} but the previous stage kept {prev_kept}")
        if st["created"] < 0:
            out.append(f"stage {st['name']}: negative created count")
        prev_kept = st["kept"]
    kept_rows = sum(s["rows"] for s in manifest.get("shards", [])) + manifest.get("pending_rows", {}).get("kept", 0)
    rej_rows = sum(s["rows"] for s in manifest.get("rejects", [])) + manifest.get("pending_rows", {}).get("rejects", 0)
    stages = manifest.get("stages", [])
    if stages and kept_rows != stages[-1]["kept"]:
        out.append(f"shards hold {kept_rows} rows but the last stage kept {stages[-1]['kept']}")
    langs = manifest.get("languages")
    if stages and langs is not None and sum(langs.values()) != stages[-1]["kept"]:
        out.append(f"languages count {sum(langs.values())} rows but the last stage kept {stages[-1]['kept']}")
    if stages and rej_rows != sum(s["dropped_total"] for s in stages):
        out.append(f"rejects hold {rej_rows} rows but stages dropped {sum(s['dropped_total'] for s in stages)}")
    return out

"""Benchmark evaluation on files in IFEval's input format: does the student follow instructions?

A benchmark file is JSONL, one prompt a line, exactly as IFEval's ``input_data.jsonl``::

    {"key": 1000, "prompt": "Write a haiku ... in all lowercase letters.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}

The student answers each prompt (the single user turn, greedy) through our LLM seam, and every
instruction is checked by `synthloop.filters.checks` (IFEval's checkers, plus registered custom
checks). Scores follow IFEval's definitions: prompt-level accuracy counts prompts whose
instructions *all* pass, instruction-level accuracy counts single instructions; "strict" checks
the response as it is, "loose" forgives a preamble or a closing line and markdown ``*``.

synthloop ships its own prompts (`tuner/data/ifeval_heldout.jsonl`, written for this project);
pass IFEval's own file, or any file in its format, instead.
"""
from __future__ import annotations

import json
import os
import time
from importlib import resources
from pathlib import Path
from typing import Sequence

from synthloop.core.jsonl import JsonlError, read_jsonl
from synthloop.filters import checks
from synthloop.core.llm import BackendSpec, Completion, open_llm
from synthloop.tuner.evaluate import student_spec

#: Greedy, with room for IFEval's length instructions ("at least 600 words"): a 256-token cap would
#: fail those by truncation, not by disobedience.
BENCHMARK_PARAMS = {"temperature": 0, "max_tokens": 1024}

FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")


class BenchmarkError(ValueError):
    """A benchmark file that cannot be evaluated; the message is one line naming file:line and field."""


def bundled_benchmark() -> Path:
    return Path(str(resources.files("synthloop.tuner") / "data" / "ifeval_heldout.jsonl"))


def _item(obj, where: str, known: set[str]) -> dict:
    """One checked benchmark prompt from a parsed line; `where` is ``file:line`` for errors."""
    def fail(field: str, msg: str) -> BenchmarkError:
        return BenchmarkError(f"{where}: field '{field}': {msg}")

    if not isinstance(obj, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in FIELDS:
        if name not in obj:
            raise fail(name, "missing")
    key, prompt, ids, kwargs = (obj[name] for name in FIELDS)
    # bool is an int to Python, never a key to anyone.
    if isinstance(key, bool) or not isinstance(key, (int, str)) or key == "":
        raise fail("key", f"must be an integer or a non-empty string, got {json.dumps(key)}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise fail("prompt", "must be a non-empty string")
    if any("\ud800" <= ch <= "\udfff" for ch in prompt):
        raise fail("prompt", "not valid Unicode (a lone surrogate)")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise fail("instruction_id_list", "must be a non-empty list of strings")
    if not isinstance(kwargs, list):
        raise fail("kwargs", "must be a list of objects")
    if len(kwargs) != len(ids):
        raise fail("kwargs", f"{len(kwargs)} entries for {len(ids)} instruction ids")
    clean = []
    for i, (cid, kw) in enumerate(zip(ids, kwargs)):
        if cid not in known:
            raise fail(f"instruction_id_list[{i}]", f"unknown constraint id '{cid}'")
        if kw is not None and not isinstance(kw, dict):
            raise fail(f"kwargs[{i}]", f"must be an object, got {type(kw).__name__}")
        kw = checks.parse_kwargs(kw)    # IFEval's own file pads kwargs with nulls: drop them
        try:
            checks.validate(cid, kw)
        except checks.CheckError as e:
            raise fail(f"kwargs[{i}]", str(e)) from None
        clean.append(kw)
    return {"key": key, "prompt": prompt, "instruction_id_list": list(ids), "kwargs": clean}


def load_benchmark(path: str | os.PathLike | None = None) -> list[dict]:
    """Read and check a benchmark file in IFEval's input format (None: the bundled prompts).

    Items keep IFEval's four fields, with null kwargs values dropped. Any problem raises one
    `BenchmarkError` naming the file, the line and the field.

    >>> load_benchmark("bench.jsonl")[0]                                   # doctest: +SKIP
    {'key': 1, 'prompt': 'Answer without commas.', 'instruction_id_list': ['punctuation:no_comma'], 'kwargs': [{}]}
    """
    path = Path(path) if path is not None else bundled_benchmark()
    items, seen, known = [], {}, set(checks.known_ids())
    try:
        lines = list(read_jsonl(path))
    except JsonlError as e:
        raise BenchmarkError(str(e)) from None
    for n, obj in lines:
        item = _item(obj, f"{path}:{n}", known)
        # 7 and "7" are one key to whoever joins responses by key.
        if str(item["key"]) in seen:
            raise BenchmarkError(f"{path}:{n}: field 'key': {json.dumps(item['key'])} repeats line "
                                 f"{seen[str(item['key'])]}")
        seen[str(item["key"])] = n
        items.append(item)
    if not items:
        raise BenchmarkError(f"{path}: no benchmark prompts")
    return items


def constraints(item: dict) -> list[dict]:
    """An item's instructions as the ``{id, kwargs}`` constraints `checks.check` takes."""
    return [{"id": cid, "kwargs": kw} for cid, kw in zip(item["instruction_id_list"], item["kwargs"])]


def _mean(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def score(items: Sequence[dict], responses: Sequence[str | None]) -> dict:
    """IFEval's four accuracies of `responses` (one per item, in order), per constraint and per prompt.

    An empty (or None) response fails every instruction. ``per_prompt`` holds, per item,
    ``{key, prompt, response, instruction_id_list, strict, loose}`` with one bool per instruction.

    >>> item = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    >>> score([item], ["no commas here"])["prompt_strict"]
    1.0
    """
    if len(items) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(items)} benchmark prompts")
    per_prompt, by_id = [], {}
    for item, response in zip(items, responses):
        response = response or ""
        results = checks.check(response, constraints(item), item["prompt"])
        per_prompt.append({"key": item["key"], "prompt": item["prompt"], "response": response,
                           "instruction_id_list": item["instruction_id_list"],
                           "strict": [r.strict for r in results], "loose": [r.loose for r in results]})
        for r in results:
            by_id.setdefault(r.id, []).append(r)
    strict = [s for p in per_prompt for s in p["strict"]]
    loose = [s for p in per_prompt for s in p["loose"]]
    return {
        "prompt_strict": _mean([all(p["strict"]) for p in per_prompt]),
        "prompt_loose": _mean([all(p["loose"]) for p in per_prompt]),
        "instruction_strict": _mean(strict),
        "instruction_loose": _mean(loose),
        "n_prompts": len(per_prompt),
        "n_instructions": len(strict),
        "per_constraint": {cid: {"n": len(rs), "strict": _mean([r.strict for r in rs]),
                                 "loose": _mean([r.loose for r in rs])} for cid, rs in sorted(by_id.items())},
        "sentence_splitter": checks.sentence_splitter(),
        "per_prompt": per_prompt,
    }


def _complete(llm, items: Sequence[dict], params: dict | None) -> list[Completion]:
    requests = [[{"role": "user", "content": item["prompt"]}] for item in items]
    return llm.generate(requests, params or BENCHMARK_PARAMS)


def answer_benchmark(llm, items: Sequence[dict], params: dict | None = None) -> list[str]:
    """The student's answers, the prompt as the single user turn (failed requests give "").

    Texts are kept as the backend returned them: the checkers decide what whitespace means.
    """
    return [c.text if c.ok else "" for c in _complete(llm, items, params)]


def evaluate_benchmark(*, path: str | os.PathLike | None = None, base_model: str = "embedded",
                       adapter: str | None = None, student: BackendSpec | None = None,
                       limit: int | None = None, params: dict | None = None,
                       keep_per_prompt: bool = True) -> dict:
    """Answer a benchmark file with base + adapter and score it (None: the bundled prompts).

    The student answers through `student` (default: the transformers backend) with
    ``options["adapter"]`` set; the backend is closed before scoring.

    >>> evaluate_benchmark(adapter="runs/loop/round-01/adapter", keep_per_prompt=False)  # doctest: +SKIP
    {'prompt_strict': 0.31, 'prompt_loose': 0.36, 'instruction_strict': 0.44, ...}
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    items = load_benchmark(path)[:limit]
    llm = open_llm(student_spec(base_model, adapter, student))
    try:
        t0 = time.time()
        done = _complete(llm, items, params)
        seconds = time.time() - t0
    finally:
        llm.close()
    out = score(items, [c.text if c.ok else "" for c in done])
    out.update(benchmark="bundled" if path is None else str(path), base_model=base_model, adapter=adapter,
               answer_seconds=round(seconds, 3), completion_tokens=sum(c.completion_tokens for c in done),
               failed_requests=sum(not c.ok for c in done))
    if not keep_per_prompt:
        del out["per_prompt"]
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_table(result: dict) -> str:
    """A markdown table of per-constraint accuracies (in %), then the four overall ones.

    >>> print(format_table(score([{"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
    ...                            "kwargs": [{}]}], ["a, b"])))
    | instruction | n | strict % | loose % |
    |---|--:|--:|--:|
    | punctuation:no_comma | 1 | 0.0 | 0.0 |
    | **prompt-level** | 1 | 0.0 | 0.0 |
    | **instruction-level** | 1 | 0.0 | 0.0 |
    """
    rows = ["| instruction | n | strict % | loose % |", "|---|--:|--:|--:|"]
    for cid, r in result["per_constraint"].items():
        rows.append(f"| {cid} | {r['n']} | {_pct(r['strict'])} | {_pct(r['loose'])} |")
    rows.append(f"| **prompt-level** | {result['n_prompts']} | {_pct(result['prompt_strict'])} | "
                f"{_pct(result['prompt_loose'])} |")
    rows.append(f"| **instruction-level** | {result['n_instructions']} | {_pct(result['instruction_strict'])} | "
                f"{_pct(result['instruction_loose'])} |")
    return "\n".join(rows)


def write_responses(path: str | os.PathLike, per_prompt: Sequence[dict]) -> None:
    """One JSON line per prompt, written to a temporary file first and renamed into place, so a
    crash never leaves half a file (the lines are also IFEval's response format: prompt, response)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in per_prompt:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

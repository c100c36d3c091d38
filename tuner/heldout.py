"""The held-out set: instruction/reference pairs the student never trains on.

A JSONL file, one object a line: ``instruction`` (required), ``input`` (optional), ``output``
(the reference answer). synthloop ships its own set (`tuner/data/heldout.jsonl`, written for this
project, checked not to overlap the bundled seeds); pass another file for your domain.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from synthloop.core.jsonl import read_jsonl
from synthloop.core.schema import to_messages


def bundled_heldout() -> Path:
    return Path(str(resources.files("synthloop.tuner") / "data" / "heldout.jsonl"))


def load_heldout(path: str | Path | None = None) -> list[dict]:
    """Read and check a held-out file (None: the bundled set); errors name the line.

    >>> items = load_heldout()
    >>> len(items) >= 40 and sorted(items[0]) == ["input", "instruction", "output"]
    True
    """
    path = Path(path) if path is not None else bundled_heldout()
    items = []
    for n, obj in read_jsonl(path):       # JsonlError (a ValueError) names the line
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected an object")
        unknown = set(obj) - {"instruction", "input", "output"}
        if unknown:
            raise ValueError(f"{path}:{n}: unknown fields {sorted(unknown)} (instruction, input, output)")
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise ValueError(f"{path}:{n}: '{key}' must be a non-empty string")
        if not isinstance(obj.get("input", ""), str):
            raise ValueError(f"{path}:{n}: 'input' must be a string")
        if any("\ud800" <= ch <= "\udfff" for v in obj.values() if isinstance(v, str) for ch in v):
            raise ValueError(f"{path}:{n}: not valid Unicode (a lone surrogate)")
        items.append({"instruction": obj["instruction"], "input": obj.get("input", ""), "output": obj["output"]})
    if not items:
        raise ValueError(f"{path}: no held-out pairs")
    return items


def prompt_messages(item: dict) -> list[dict]:
    """The user turn a student answers (the same rendering training data uses)."""
    return to_messages(item["instruction"], item.get("input", ""), "")


def reference_messages(item: dict) -> list[dict]:
    return to_messages(item["instruction"], item.get("input", ""), item["output"])

"""Reading JSONL input files with errors that name the file and line, never a traceback.

Input files are hostile until read: bytes that are not UTF-8, a number of 5000 digits (Python
refuses to convert it), arrays nested deeper than the interpreter's stack. Each becomes a
`JsonlError` (a ValueError whose message is ``path:line: what``); loaders re-raise it as their
own error type when they have one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


class JsonlError(ValueError):
    """One line: ``path:line: msg`` (or ``path: msg`` when no line applies)."""

    def __init__(self, path: str | Path, line: int | None, msg: str):
        self.path, self.line, self.msg = path, line, msg
        super().__init__(f"{path}:{line}: {msg}" if line else f"{path}: {msg}")


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes without a UTF-8 byte-order mark; unreadable is a JsonlError."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise JsonlError(path, None, "not a file")
    try:
        return path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    except OSError as e:
        raise JsonlError(path, None, f"cannot read ({e.strerror or e})") from None


def decode(path: str | Path, data: bytes, first_line: int = 1) -> str:
    """`data` as UTF-8, or a JsonlError naming the line of the first byte that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise JsonlError(path, line, f"not UTF-8 text (byte 0x{data[e.start]:02x})") from None


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines of a UTF-8 text file with their 1-based numbers."""
    for n, raw in enumerate(read_bytes(path).split(b"\n"), 1):
        line = decode(path, raw, n)
        if line.strip():
            yield n, line


def loads(path: str | Path, line: int, text: str) -> Any:
    """One JSON value from `text` (which starts on `line`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JsonlError(path, line + e.lineno - 1, f"not valid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:
        raise JsonlError(path, line, f"not valid JSON ({e})") from None
    except RecursionError:
        raise JsonlError(path, line, "not valid JSON (nested too deeply)") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSONL file.

    >>> list(read_jsonl("tuner/data/heldout.jsonl"))[0][0]      # doctest: +SKIP
    1
    """
    for n, line in text_lines(path):
        yield n, loads(path, n, line)

"""Everything a run writes stays inside its run directory.

The run directory itself is what the user names (``--out``, ``[run] out``, else ``runs/<name>``).
Paths *inside* it come from our code and from data we read back (manifest entries, rounds.json):
a name with ``..``, an absolute path, or a symlink that leads out of the directory (``data ->
/home/me``, which resume's clean-up of uncommitted shards would then empty) is refused before
anything is read, written or removed.
"""
from __future__ import annotations

from pathlib import Path, PurePath
from typing import Iterable


class UnsafePath(ValueError):
    """A path that would leave the run directory; the message is one line naming both."""


def inside(root: str | Path, rel: str | Path, *, what: str = "path") -> Path:
    """``root / rel``, or `UnsafePath` if `rel` is absolute, climbs with ``..`` or, through a symlink
    anywhere on the way, resolves outside `root`.

    >>> inside("runs/x", "data/shard-00000.parquet").as_posix()
    'runs/x/data/shard-00000.parquet'
    >>> inside("runs/x", "../y")      # doctest: +SKIP
    UnsafePath: runs/x: path '../y' is outside the run directory
    """
    root = Path(root)
    parts = PurePath(str(rel)).parts
    if not isinstance(rel, (str, Path)) or not parts or PurePath(str(rel)).is_absolute() \
            or ".." in parts or "\\" in str(rel) or "\0" in str(rel):
        raise UnsafePath(f"{root}: {what} {str(rel)!r} is outside the run directory")
    full = root / rel
    top, end = root.resolve(), full.resolve()
    if end != top and top not in end.parents:
        raise UnsafePath(f"{root}: {what} {str(rel)!r} leads outside the run directory (to {end})")
    return full


def confine(root: str | Path, rels: Iterable[str | Path], *, what: str = "path") -> None:
    """Check every path in `rels` with `inside`."""
    for rel in rels:
        inside(root, rel, what=what)

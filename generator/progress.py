"""Live progress on stderr: records kept (of the limit), records/s, tokens/s, rows dropped."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class RunProgress:
    def __init__(self, *, limit: int, enabled: bool = True, start_rows: int = 0, label: str = "generating"):
        self.limit, self.enabled, self.start_rows = limit, enabled, start_rows
        self.t0 = time.monotonic()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.fields[of]}"),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
            console=Console(file=sys.stderr), disable=not enabled, transient=False)
        self.task = self.progress.add_task(label, total=limit or None, completed=start_rows,
                                           of=limit or "?", stats="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, kept: int, dropped: int, llms) -> None:
        dt = max(time.monotonic() - self.t0, 1e-9)
        tokens = sum(l.stats.completion_tokens for l in llms)
        hits = sum(l.stats.cache_hits for l in llms)
        stats = (f"{(kept - self.start_rows) / dt:.2f} rec/s  {tokens / dt:.0f} tok/s  "
                 f"kept {kept}  dropped {dropped}  cache hits {hits}")
        self.progress.update(self.task, completed=kept, stats=stats)

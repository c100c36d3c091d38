"""Live progress on stderr: records kept (of the limit), records/s, requests in flight, the
engine's completion tokens/s (cache hits excluded), rows dropped.

On a terminal it is a rich progress bar; when stderr is a file or pipe (CI, nohup) the same
figures are printed as a plain line every `log_every` seconds instead.
"""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class RunProgress:
    def __init__(self, *, limit: int, enabled: bool = True, start_rows: int = 0, label: str = "generating",
                 log_every: float = 15.0):
        self.limit, self.enabled, self.start_rows, self.label = limit, enabled, start_rows, label
        self.t0 = self.last_log = time.monotonic()
        self.log_every = log_every
        console = Console(file=sys.stderr)
        self.plain = enabled and not console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.fields[of]}"),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
            console=console, disable=not enabled or self.plain, transient=False)
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
        in_flight = sum(l.in_flight for l in llms)
        stats = (f"{(kept - self.start_rows) / dt:.2f} rec/s  in flight {in_flight}  engine {tokens / dt:.0f} tok/s  "
                 f"kept {kept}  dropped {dropped}  cache hits {hits}")
        self.progress.update(self.task, completed=kept, stats=stats)
        if self.plain and time.monotonic() - self.last_log >= self.log_every:
            self.last_log = time.monotonic()
            print(f"{self.label}: {kept}/{self.limit or '?'}  {stats}  {dt:.0f}s", file=sys.stderr, flush=True)

"""The kill campaign: SIGKILL a real `synthloop` process at seeded instants, rerun, compare.

Used by tests/test_faults_kill.py (fast, scripted backend) and bench/faults.py (all 20 kills per
command). Nothing in the product knows about it: a kill lands either after a seeded random delay
(uniform over the length of an uninterrupted run) or on a file event the process itself causes,
watched with Linux inotify from this process and answered with SIGKILL at once:

- the k-th creation of a temporary file (a shard, the manifest, an adapter file being written),
- the k-th rename into a final name (a manifest or output rename, the adapter folder),
- the k-th write to the request cache's SQLite WAL,

with k drawn from the number of such events in the uninterrupted run. Whether the kill landed
inside the write is checked afterwards: the temporary file is still there (its writer died
before renaming it). The command is then run again, unkilled, and its output compared with the
uninterrupted run's: the same record ids, none lost, none twice, counts that add up, no stray
temporary files, and no process of the killed one left running.
"""
from __future__ import annotations

import ctypes
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

TESTS = Path(__file__).resolve().parent
SCRIPTED_CLI = TESTS / "scripted_cli.py"

IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x8, 0x80, 0x100
IN_ISDIR, IN_Q_OVERFLOW = 0x40000000, 0x4000
_WATCH = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE


class Inotify:
    """Every file event under `root`, new folders included (watched as they appear)."""

    def __init__(self, root: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.dirs: dict[int, Path] = {}
        self.root = Path(root)
        self._add_tree(self.root)

    def _add_tree(self, top: Path) -> None:
        for d, _, _ in os.walk(top):
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(d), _WATCH)
            if wd >= 0:
                self.dirs[wd] = Path(d)

    def read(self, timeout: float) -> list[tuple[str, int]]:
        """(path relative to root, mask) of the events within `timeout` seconds."""
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return []
        try:
            buf = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        out, i = [], 0
        while i + 16 <= len(buf):
            wd, mask, _, n = struct.unpack_from("iIII", buf, i)
            name = buf[i + 16:i + 16 + n].rstrip(b"\0").decode()
            i += 16 + n
            if wd not in self.dirs:
                continue
            path = self.dirs[wd] / name
            if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                self._add_tree(path)
            out.append((str(path.relative_to(self.root)), mask))
        return out

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Trigger:
    """A file event to kill on: `mask` bits and a regex on the path relative to the trial folder.
    `temp` says the path is a temporary file whose survival proves the kill landed mid-write."""

    label: str
    pattern: str
    mask: int
    temp: bool = False

    def matches(self, path: str, mask: int) -> bool:
        return bool(mask & self.mask) and re.search(self.pattern, path) is not None


@dataclass
class Outcome:
    """What a finished command left: record ids (kept and rejected) and any inconsistencies."""

    kept: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)     # command-specific facts that must equal the clean run's


@dataclass
class Command:
    """One CLI command under the campaign. `argv(trial)` is the command line for a trial folder;
    `prepare(trial)` writes what it needs there first; `outcome(trial)` reads the result."""

    name: str
    argv: Callable[[Path], list[str]]
    outcome: Callable[[Path], Outcome]
    triggers: list[Trigger]
    prepare: Callable[[Path], None] = lambda trial: None
    env: dict = field(default_factory=dict)
    timeout: float = 900
    #: the output is finished (a command that refuses to overwrite it is then checked, not rerun)
    finished: Callable[[Path], bool] = lambda trial: False
    #: for a model whose answers vary with how requests are batched (a real one), no two runs
    #: write the same records: the rerun is then held to what the killed run had committed
    #: (read by this, before the rerun): every committed id survives, none twice
    committed: Callable[[Path], Outcome] | None = None


@dataclass
class Trial:
    kind: str             # trigger label or "time"
    at: str               # the occurrence or delay chosen
    killed: bool = False  # SIGKILL reached a running process
    inside: bool = False  # its temporary file was left behind: killed mid-write
    orphans: int = 0      # processes of the killed command still running afterwards
    lost: int = 0
    duplicated: int = 0
    foreign: int = 0      # ids the clean run does not have
    problems: list[str] = field(default_factory=list)


def _session(sid: int) -> list[int]:
    """Pids in session `sid` (the command and every process it started)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d))
    return pids


def _start(cmd: Command, trial: Path, log: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **cmd.env}
    with open(trial / f"{log}.stderr", "w") as err:
        return subprocess.Popen(cmd.argv(trial), stdout=subprocess.DEVNULL, stderr=err, env=env,
                                start_new_session=True)


def _finish(p: subprocess.Popen, timeout: float) -> int:
    try:
        return p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_clean(cmd: Command, trial: Path) -> tuple[float, Counter, Outcome]:
    """Run uninterrupted in a fresh `trial` folder: (seconds, events per trigger, outcome)."""
    trial.mkdir(parents=True)
    cmd.prepare(trial)
    watch = Inotify(trial)
    events: Counter = Counter()
    t0 = time.monotonic()
    p = _start(cmd, trial, "clean")
    try:
        while p.poll() is None and time.monotonic() - t0 < cmd.timeout:
            for path, mask in watch.read(0.05):
                for t in cmd.triggers:
                    events[t.label] += t.matches(path, mask)
        for path, mask in watch.read(0):
            for t in cmd.triggers:
                events[t.label] += t.matches(path, mask)
    finally:
        watch.close()
    rc = _finish(p, 1)
    seconds = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError(f"{cmd.name}: the uninterrupted run failed (exit {rc}): "
                           f"{(trial / 'clean.stderr').read_text()[-2000:]}")
    return seconds, events, cmd.outcome(trial)


def kill_points(cmd: Command, n: int, seconds: float, events: Counter, seed: int,
                kinds: list[str] | None = None) -> list[tuple[str, object]]:
    """`n` seeded kill points: the event triggers seen in the clean run and a random delay in turn
    (or only `kinds`)."""
    rng = random.Random(f"{seed}:{cmd.name}")
    kinds = [k for k in kinds or [t.label for t in cmd.triggers] + ["time"] if k == "time" or events[k]] or ["time"]
    points = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        points.append((kind, rng.uniform(0.0, seconds) if kind == "time" else rng.randint(1, events[kind])))
    return points


def kill_and_rerun(cmd: Command, trial: Path, kind: str, at, clean: Outcome) -> Trial:
    """Fresh `trial` folder: start, SIGKILL at (kind, at), rerun unkilled, compare with `clean`."""
    trial.mkdir(parents=True)
    cmd.prepare(trial)
    res = Trial(kind, f"{at:.2f}s" if kind == "time" else f"#{at}")
    trigger = next((t for t in cmd.triggers if t.label == kind), None)
    watch = Inotify(trial)
    t0, seen, victim = time.monotonic(), 0, None
    p = _start(cmd, trial, "killed")
    try:
        while p.poll() is None and time.monotonic() - t0 < cmd.timeout:
            if trigger is None:
                wait = at - (time.monotonic() - t0)
                if wait <= 0:
                    os.kill(p.pid, signal.SIGKILL)
                    break
                time.sleep(min(wait, 0.05))
                continue
            hit = False
            for path, mask in watch.read(0.05):
                if trigger.matches(path, mask):
                    seen += 1
                    if seen == at:
                        os.kill(p.pid, signal.SIGKILL)
                        victim, hit = path, True
                        break
            if hit:
                break
    finally:
        watch.close()
    rc = p.wait(timeout=60)
    res.killed = rc == -signal.SIGKILL
    if res.killed and trigger is not None and trigger.temp:
        res.inside = (trial / victim).exists()
    deadline = time.monotonic() + 3       # what still runs after 3 s is an orphan
    while _session(p.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _session(p.pid)
    res.orphans = len(left)
    for pid in left:         # ours to end: the killed command's own children
        os.kill(pid, signal.SIGKILL)
    if not res.killed and rc != 0:
        res.problems.append(f"exited {rc} before the kill: {(trial / 'killed.stderr').read_text()[-500:]}")
    want = cmd.committed(trial) if cmd.committed else clean
    if not cmd.finished(trial):      # killed after its output was complete: nothing to redo
        rc = _finish(_start(cmd, trial, "rerun"), cmd.timeout)
        if rc != 0:
            res.problems.append(f"rerun exited {rc}: {(trial / 'rerun.stderr').read_text().strip()[-500:]}")
            return res
    got = cmd.outcome(trial)
    res.problems += got.problems
    for have, had in ((got.kept, want.kept), (got.rejected, want.rejected)):
        res.lost += sum((had - have).values())
        res.duplicated += sum(c - 1 for c in have.values() if c > 1)
        if not cmd.committed:        # new records after a kill are expected when answers vary
            res.foreign += len(set(have) - set(had))
    for key, value in ({} if cmd.committed else clean.extra).items():
        if got.extra.get(key) != value:
            res.problems.append(f"{key}: {got.extra.get(key)!r} != clean {value!r}")
    return res


def stray_temp_files(root: Path) -> list[str]:
    """Temporary files or folders a finished command left under `root`."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if re.search(r"\.tmp-\d+$|\.old-\d+$|-tmp-\d+$", p.name))


@dataclass
class Row:
    command: str
    kills: int = 0
    landed: int = 0
    inside: int = 0
    finished_first: int = 0
    records: int = 0
    lost: int = 0
    duplicated: int = 0
    foreign: int = 0
    orphans: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.foreign or self.orphans or self.failures)


def campaign(cmd: Command, work: Path, n: int, seed: int = 0, kinds: list[str] | None = None,
             log=lambda s: print(s, file=sys.stderr)) -> Row:
    """`n` kills of `cmd` (at `kinds` of points only, if given), each in its own folder under
    `work`; one table row."""
    t0 = time.monotonic()
    seconds, events, clean = run_clean(cmd, work / f"{cmd.name}-clean")
    row = Row(cmd.name, records=sum(clean.kept.values()) + sum(clean.rejected.values())
              or clean.extra.get("examples", 0))
    if clean.problems:
        row.failures.append(f"clean run: {clean.problems}")
    log(f"{cmd.name}: clean run {seconds:.1f}s, events {dict(events)}")
    for i, (kind, at) in enumerate(kill_points(cmd, n, seconds, events, seed, kinds)):
        trial = work / f"{cmd.name}-kill{i:02d}"
        res = kill_and_rerun(cmd, trial, kind, at, clean)
        res.problems += [f"stray {p}" for p in stray_temp_files(trial)]
        row.kills += 1
        row.landed += res.killed
        row.inside += res.inside
        row.finished_first += not res.killed
        row.lost += res.lost
        row.duplicated += res.duplicated
        row.foreign += res.foreign
        row.orphans += res.orphans
        row.failures += [f"kill {i} ({kind} {res.at}): {p}" for p in res.problems]
        log(f"{cmd.name}: kill {i} at {kind} {res.at}: killed={res.killed} inside={res.inside} "
            f"orphans={res.orphans} lost={res.lost} dup={res.duplicated} problems={res.problems}")
    row.seconds = time.monotonic() - t0
    return row


HEADER = ("| command | kills | landed | mid-write | finished first | records | lost | duplicated | "
          "foreign | orphans | failures |\n|---|---|---|---|---|---|---|---|---|---|---|")


def table(rows: list[Row]) -> str:
    lines = [HEADER]
    for r in rows:
        lines.append(f"| {r.command} | {r.kills} | {r.landed} | {r.inside} | {r.finished_first} | {r.records} | "
                     f"{r.lost} | {r.duplicated} | {r.foreign} | {r.orphans} | {len(r.failures)} |")
    return "\n".join(lines)

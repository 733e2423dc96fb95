"""What `make run` costs the machine, stage by stage: wall time, peak memory, and what the terminal shows.

Runs `moeforge run --config tiny` (what `make run` runs) in a fresh working directory, as a user would in a
terminal: under a pseudo-terminal, so the progress bars render as they do for a person. Every second it samples the
run's whole process tree (the driver, Ray's GCS, raylet, dashboard and every worker it starts):

- `rss`: the sum of each process's private and file-backed resident pages (`RssAnon + RssFile`), plus Ray's object
  store once (the allocated pages of the plasma store's shared-memory file). This is the figure the laptop target
  is set on; it over-counts pages that several processes share (torch's libraries in every worker);
- `pss`: the same with proportional set sizes (each shared page divided among the processes that map it), so
  shared libraries count once: what the run takes from the machine.

Each sample is charged to the stages running at that moment (from the CLI's `▶ stage running` and `✓ stage done`
lines). At the end it prints each stage's time and peaks, the run's peaks, and what the terminal got: how many
lines each stage's progress bar left (1 when it updates in place) and every line that looks like a warning.

    .venv/bin/python benchmarks/run_footprint.py [--config tiny] [--set key=value ...] [--keep-output FILE] [--cwd DIR]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from _common import REPO, result

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
WARNING = re.compile(r"warn|error|traceback|deprecat", re.IGNORECASE)
STAGE_START = re.compile(r"▶ (\S+)\s+running")
STAGE_DONE = re.compile(r"✓ (\S+)\s+(done|cached)")


def status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size of `pid` without its shared-memory pages (the object store is counted apart)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Pss_Anon:", "Pss_File:")):
                total += int(line.split()[1])
    except (OSError, ValueError):
        pass
    return total


def object_store_files(pid: int) -> dict[int, int]:
    """The plasma store's shared-memory files mapped by `pid` (the raylet): inode -> KiB resident in tmpfs.

    The store is a deleted file under /dev/shm that the raylet and every client map; its allocated blocks are the
    object store's resident bytes, whichever process touched them (counted once, by inode)."""
    files: dict[int, int] = {}
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            if "plasma" not in line:
                continue
            st = os.stat(f"/proc/{pid}/map_files/{line.split()[0]}")
            files[st.st_ino] = st.st_blocks // 2
    except (OSError, ValueError, IndexError):
        pass
    return files


@dataclass
class Sample:
    rss_mib: float
    pss_mib: float
    store_mib: float
    processes: int


def sample_tree(root: psutil.Process) -> Sample:
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return Sample(0, 0, 0, 0)
    rss = pss = 0
    store: dict[int, int] = {}
    for p in procs:
        rss += status_kib(p.pid, "RssAnon") + status_kib(p.pid, "RssFile")
        pss += pss_kib(p.pid)
        try:
            if p.name() == "raylet":
                store.update(object_store_files(p.pid))
        except psutil.NoSuchProcess:
            pass
    s = sum(store.values())
    return Sample((rss + s) / 1024, (pss + s) / 1024, s / 1024, len(procs))


@dataclass
class StageCost:
    started: float | None = None
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    peak_pss_mib: float = 0.0
    peak_store_mib: float = 0.0


@dataclass
class Watch:
    """The run's output as it arrives, the stages running now, and the peaks charged to them."""

    stages: dict[str, StageCost] = field(default_factory=lambda: defaultdict(StageCost))
    running: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    raw: bytearray = field(default_factory=bytearray)
    pending: str = ""
    peak: Sample = field(default_factory=lambda: Sample(0, 0, 0, 0))

    def feed(self, data: bytes) -> None:
        self.raw += data
        self.pending += data.decode("utf-8", "replace")
        *lines, self.pending = re.split(r"[\r\n]", self.pending)
        now = time.perf_counter()
        with self.lock:
            for line in (ANSI.sub("", s) for s in lines):
                if m := STAGE_START.search(line):
                    self.running.add(m[1])
                    self.stages[m[1]].started = now
                elif (m := STAGE_DONE.search(line)) and m[1] in self.running:
                    self.running.discard(m[1])
                    cost = self.stages[m[1]]
                    cost.seconds = now - (cost.started or now)

    def charge(self, s: Sample) -> None:
        with self.lock:
            for name in self.running or {"(start-up and end)"}:
                c = self.stages[name]
                c.peak_rss_mib = max(c.peak_rss_mib, s.rss_mib)
                c.peak_pss_mib = max(c.peak_pss_mib, s.pss_mib)
                c.peak_store_mib = max(c.peak_store_mib, s.store_mib)
            self.peak = Sample(
                max(self.peak.rss_mib, s.rss_mib),
                max(self.peak.pss_mib, s.pss_mib),
                max(self.peak.store_mib, s.store_mib),
                max(self.peak.processes, s.processes),
            )


CONTROL = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|([\r\n])")


def screen_lines(raw: str) -> list[str]:
    """The lines a terminal shows at the end: text written over in place (carriage returns, tqdm's cursor-up moves,
    line clears) kept as it last stood; colours dropped."""
    rows: list[list[str]] = [[]]
    row = col = 0
    pos = 0

    def put(text: str) -> None:
        nonlocal col
        line = rows[row]
        line.extend(" " * (col - len(line)))
        line[col : col + len(text)] = list(text)
        col += len(text)

    for m in CONTROL.finditer(raw):
        put(raw[pos : m.start()])
        pos = m.end()
        if m[3] == "\r":
            col = 0
        elif m[3] == "\n":
            row, col = row + 1, 0
            if row == len(rows):
                rows.append([])
        elif m[2] == "A":  # cursor up
            row = max(0, row - int(m[1] or 1))
        elif m[2] == "K":  # clear to the end of the line
            del rows[row][col:]
    put(raw[pos:])
    return [text for r in rows if (text := "".join(r).strip())]


BAR = re.compile(r"\d+%\|")


def progress_lines(lines: list[str]) -> dict[str, int]:
    """How many progress-bar lines each stage left on the screen (between its `▶` line and the next stage line)."""
    counts: dict[str, int] = {}
    stage = None
    for line in lines:
        if m := STAGE_START.search(line):
            stage = m[1]
            counts[stage] = 0
        elif STAGE_DONE.search(line):
            stage = None
        elif stage is not None and BAR.search(line):
            counts[stage] += 1
    return counts


def run(config: str, overrides: list[str], cwd: str, watch: Watch) -> tuple[int, float]:
    cmd = [str(Path(sys.executable).parent / "moeforge"), "run", "--config", config]
    for o in overrides:
        cmd += ["--set", o]
    primary, secondary = pty.openpty()
    # a terminal 120 columns wide: tqdm sizes its bars from the terminal (0 columns draws nothing)
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
    env = {**os.environ, "COLUMNS": "120", "PYTHONPATH": str(REPO), "TERM": os.environ.get("TERM", "xterm")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    root = psutil.Process(proc.pid)
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            watch.charge(sample_tree(root))
            stop.wait(1.0)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # the terminal closed: every process holding it has exited
            break
        if not data:
            break
        watch.feed(data)
    code = proc.wait()
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    os.close(primary)
    return code, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--keep-output", type=Path, help="write the terminal's raw bytes here")
    parser.add_argument("--cwd", type=Path, help="run in this directory (default: a fresh one, removed after)")
    args = parser.parse_args()
    watch = Watch()
    if args.cwd:
        args.cwd.mkdir(parents=True, exist_ok=True)
        code, seconds = run(args.config, args.overrides, str(args.cwd), watch)
    else:
        with tempfile.TemporaryDirectory(prefix="moeforge-footprint-") as cwd:
            code, seconds = run(args.config, args.overrides, cwd, watch)
    raw = watch.raw.decode("utf-8", "replace")
    if args.keep_output:
        args.keep_output.write_bytes(bytes(watch.raw))
    lines = screen_lines(raw)
    if code != 0:
        sys.exit("moeforge run failed ({}):\n{}".format(code, "\n".join(lines[-40:])))
    print("\n".join(lines))
    print(f"\n{'stage':<20} {'seconds':>8} {'peak rss+store MiB':>19} {'peak pss MiB':>13} {'store MiB':>10}")
    for name, c in watch.stages.items():
        print(f"{name:<20} {c.seconds:>8.0f} {c.peak_rss_mib:>19.0f} {c.peak_pss_mib:>13.0f} {c.peak_store_mib:>10.0f}")
    bar_lines = progress_lines(lines)
    warnings = [ln for ln in lines if WARNING.search(ln)]
    print(f"\nprogress-bar lines left per stage: {bar_lines}")
    print(f"warning-like lines: {len(warnings)}")
    for ln in warnings:
        print(f"  {ln}")
    p = watch.peak
    gib = f"peak rss+store {p.rss_mib / 1024:.2f} GiB, pss+store {p.pss_mib / 1024:.2f} GiB"
    print(f"whole run: {seconds / 60:.1f} min, {gib}")
    result(
        minutes=seconds / 60,
        peak_rss_store_gib=p.rss_mib / 1024,
        peak_pss_gib=p.pss_mib / 1024,
        peak_store_gib=p.store_mib / 1024,
        max_processes=float(p.processes),
        warning_lines=float(len(warnings)),
    )


if __name__ == "__main__":
    main()

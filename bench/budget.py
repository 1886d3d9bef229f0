#!/usr/bin/env python3
"""What one small task costs grit itself (issue 31): per task of W1 (a source
step imports N inputs, `upper` runs `tr a-z A-Z` on each, `reverse` runs `rev`
on each: 2N tasks), in dir and FUSE mode:

  - syscalls by grit (its threads and its FUSE server), not by the scripts:
    `strace -f -c` of the whole run less the same scripts run by xargs under
    strace, both divided by the tasks;
  - fsync/fdatasync calls (from the same strace), SQLite statements (a trace
    callback on every connection grit opens) and Python function calls (cProfile
    in every thread of grit's process; the FUSE server's are not counted), from a
    run inside this process;
  - grit's own CPU per task: grit's process and its FUSE server, not the
    scripts (bench/owncpu.py, as bench/compare.py reports it).

    bench/budget.py [--tasks 1000]

Prints a Markdown table; bench/RESULTS.md keeps a copy.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading

from compare import Grit, make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GRIT = os.path.join(ROOT, "grit.py")

def workdir(n: int) -> str:
    """W1's inputs and manifest, as bench/compare.py makes them."""
    work = tempfile.mkdtemp(prefix="grit-budget-")
    make_inputs(work, n)
    Grit("dir").manifest(work)
    return work


def strace_counts(argv: list[str], cwd: str) -> dict[str, int]:
    """Calls per syscall of a command and all its threads and children."""
    out = os.path.join(cwd, "strace.out")
    subprocess.run(["strace", "-f", "-c", "-o", out, *argv], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    counts = {}
    with open(out) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
                counts[fields[-1]] = int(fields[3])
    return counts


def scripts_alone(work: str, n: int) -> list[str]:
    """The same 2N scripts, run by xargs -P2 (what make would spend on them)."""
    script = os.path.join(work, "alone.sh")
    with open(script, "w") as f:
        f.write(f'cd {work} && mkdir -p alone && ls inputs | xargs -P2 -I{{}} sh -c '
                f'\'tr a-z A-Z < inputs/{{}} > alone/upper-{{}}\' && ls alone | '
                f'xargs -P2 -I{{}} sh -c \'rev alone/{{}} > alone/rev-{{}}\'\n')
    return ["sh", script]


def in_process(work: str, mode: str) -> tuple[int, int]:
    """(SQLite statements, Python function calls) of one run in this process."""
    import grit
    statements = [0]
    connect = sqlite3.connect

    def counting_connect(*args, **kw):
        db = connect(*args, **kw)
        db.set_trace_callback(lambda _: statements.__setitem__(0, statements[0] + 1))
        return db
    profiles: list[cProfile.Profile] = []

    def per_thread(*_):
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()
    sqlite3.connect = counting_connect
    threading.setprofile(per_thread)
    main = cProfile.Profile()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            main.enable()
            code = grit.main(["-manifest", os.path.join(work, "m.toml"), "-db",
                              os.path.join(work, "db-inproc"), "-run", "-quiet",
                              "-parallel", "2", "-output-mode", mode])
            main.disable()
    finally:
        sqlite3.connect = connect
        threading.setprofile(None)
    assert code == 0
    calls = 0
    for profile in [main, *profiles]:
        with contextlib.suppress(Exception):
            profile.disable()
        calls += pstats.Stats(profile).total_calls
    return statements[0], calls


def own_cpu(argv: list[str], cwd: str) -> float:
    """grit's own CPU seconds in a run (bench/owncpu.py)."""
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "owncpu.py"), "cpu.txt",
                    *argv[1:]], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    with open(os.path.join(cwd, "cpu.txt")) as f:
        return sum(map(float, f.read().split()[:2]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1000, help="N inputs: 2N tasks")
    n = ap.parse_args().tasks
    tasks = 2 * n
    print(f"| per task (W1, N = {n:,}, {tasks:,} tasks) | dir | fuse |")
    print("| --- | ---: | ---: |")
    rows: dict[str, list[str]] = {}
    for mode in ("dir", "fuse"):
        work = workdir(n)
        try:
            run = [sys.executable, GRIT, "-manifest", "m.toml", "-db", "db", "-run", "-quiet",
                   "-parallel", "2", "-output-mode", mode]
            total = strace_counts(run, work)
            alone = strace_counts(scripts_alone(work, n), work)
            own = {k: total.get(k, 0) - alone.get(k, 0) for k in total}
            shutil.rmtree(os.path.join(work, "db"))
            shutil.rmtree(os.path.join(work, "alone"))
            cpu = own_cpu(run, work)
            statements, calls = in_process(work, mode)
            top = sorted(own.items(), key=lambda kv: -kv[1])[:6]
            values = {
                "syscalls by grit": f"{sum(own.values()) / tasks:.0f}",
                "of which (top 6)": ", ".join(f"{k} {v / tasks:.1f}" for k, v in top),
                "fsync + fdatasync": f"{(own.get('fsync', 0) + own.get('fdatasync', 0)) / tasks:.2f}",
                "SQLite statements": f"{statements / tasks:.1f}",
                "Python function calls": f"{calls / tasks:.0f}",
                "grit's own CPU": f"{cpu / tasks * 1000:.2f} ms",
            }
            for key, value in values.items():
                rows.setdefault(key, []).append(value)
        finally:
            shutil.rmtree(work)
    for key, (dir_value, fuse_value) in rows.items():
        print(f"| {key} | {dir_value} | {fuse_value} |")


if __name__ == "__main__":
    main()

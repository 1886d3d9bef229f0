#!/usr/bin/env python3
"""What a picture of a run costs (issue 33), as figures.

  overhead  W1 (a source of N inputs, then `tr` and `rev` on each: 2N tasks) with
            this grit.py and with an older commit's (--against, default HEAD~1
            with `git show`), alternated --repeat times: median wall and grit's
            own CPU (bench/owncpu.py), and their ratios new/old
  report    a run of --report-tasks tasks (W1 with half as many inputs), then
            `-report`: seconds to write it and its size; then the page loaded
            in Debian's chromium (headless, through Playwright): seconds to its
            load event, and the marks and steps it shows

    bench/report.py [--n 2000] [--repeat 5] [--against REV] [--report-tasks 20000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import compare
from compare import Grit, make_inputs

ROOT = compare.ROOT


def w1(grit_py: str, n: int, base: str) -> tuple[float, float, str]:
    """One cold W1 run: (wall seconds, grit's own CPU seconds, its folder)."""
    work = tempfile.mkdtemp(dir=base)
    make_inputs(work, n)
    runner = Grit("fuse")
    runner.setup(work, n)
    compare.GRIT = grit_py
    wall, _ = runner.run(work)
    return wall, runner.cpu, work


def overhead(n: int, repeat: int, against: str, base: str) -> None:
    old = os.path.join(base, "old-grit.py")
    with open(old, "w") as f:
        f.write(subprocess.run(["git", "-C", ROOT, "show", f"{against}:grit.py"], check=True,
                               capture_output=True, text=True).stdout)
    new = os.path.join(ROOT, "grit.py")
    times: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    for i in range(repeat):
        for label, path in ((("old", old), ("new", new)) if i % 2 == 0 else
                            (("new", new), ("old", old))):
            times[label].append(w1(path, n, base)[:2])
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in times.items()}
    print(f"W1 N={n} ({2 * n} tasks), {repeat} alternated runs each, medians:")
    print(f"  {against}: {med['old'][0]:.2f} s wall, {med['old'][1]:.2f} s grit CPU")
    print(f"  this:  {med['new'][0]:.2f} s wall, {med['new'][1]:.2f} s grit CPU")
    print(f"  ratio: wall {med['new'][0] / med['old'][0]:.3f}x, "
          f"grit CPU {med['new'][1] / med['old'][1]:.3f}x")


def report(tasks: int, base: str) -> None:
    work = w1(os.path.join(ROOT, "grit.py"), tasks // 2, base)[2]
    page = os.path.join(base, "report.html")
    started = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "grit.py"), "-db",
                    os.path.join(work, "db"), "-report", page, "-quiet"], check=True)
    wrote = time.perf_counter() - started
    print(f"report of a {tasks}-task run: written in {wrote:.2f} s (grit's start included), "
          f"{os.path.getsize(page) / 1e6:.2f} MB")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        loads = []
        for _ in range(3):
            tab = browser.new_page()
            started = time.perf_counter()
            tab.goto("file://" + page, wait_until="load")
            loads.append(time.perf_counter() - started)
            marks = tab.evaluate("[...document.querySelectorAll('#timeline .mark')]"
                                 ".reduce((n, m) => n + +m.dataset.tasks, 0)")
            drawn = tab.evaluate("document.querySelectorAll('#timeline .mark').length")
            tab.close()
        browser.close()
    print(f"chromium: loaded in {statistics.median(loads):.2f} s (median of 3); the timeline "
          f"counts {marks} task(s) in {drawn} mark(s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--against", default="HEAD~1")
    ap.add_argument("--report-tasks", type=int, default=20000)
    ap.add_argument("--skip-overhead", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as base:
        if not args.skip_overhead:
            overhead(args.n, args.repeat, args.against, base)
        report(args.report_tasks, base)


if __name__ == "__main__":
    main()

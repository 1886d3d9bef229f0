#!/usr/bin/env python3
"""Gather steps: how soon a gather over many resources starts, what it costs
grit's memory, and what a gather adds to W1.

  start  N small resources (~100 bytes, a source step) and a gather step over
         all of them. Measured from -verbose's stream, on one clock: from the
         line saying the source's files are committed to the gather script's
         first line; and the peak RSS of the run's largest process (grit, or
         its FUSE server), with the script's own time apart.
  W1+G   compare.py's W1 (N inputs, `tr` then `rev` on each) with a gather
         step over every `rev-*` output (`cat | wc -l`), against W1 alone
         plus what make takes for the same `cat | wc -l` over N files.
         Runs are ordered W1, W1+G, W1+G, W1 (drift cancels).

    bench/gather.py [--start-n 50000 (0: skip)] [--w1-n 10000] [--modes fuse,dir] [--skip-w1]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import GRIT, Grit, Make, make_inputs, sh  # noqa: E402

GATHER = '''
[[step]]
name = "total"
inputs = ["{pattern}"]
gather = true
script = \'\'\'
echo gather-started >&2
cut -f2 "$INPUT_LIST" | xargs cat | wc -l > "$OUTPUT_DIR/lines"
echo gather-finished >&2
\'\'\'
'''


def timed_lines(cmd: list[str], cwd: str) -> tuple[dict[str, float], int]:
    """Run grit -verbose; when each marker line first arrived (monotonic
    seconds) and the peak RSS in MiB of the largest process (/usr/bin/time)."""
    rss_file = os.path.join(cwd, "rss")
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", rss_file] + cmd, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[str, float] = {}
    for line in proc.stderr:
        now = time.monotonic()
        for marker in ("new, 0 changed", "gather-started", "gather-finished"):
            if marker in line and marker not in seen:
                seen[marker] = now
    if proc.wait():
        sys.exit(f"grit failed in {cwd}")
    with open(rss_file) as f:
        return seen, int(f.read().split()[-1]) // 1024


def start(n: int, mode: str) -> tuple[float, float, int]:
    """(seconds from commit to the gather's start, script seconds, peak RSS MiB)."""
    work = tempfile.mkdtemp(prefix="grit-gather-")
    try:
        make_inputs(work, n)
        with open(os.path.join(work, "m.toml"), "w") as f:
            f.write(f'[[step]]\nname = "docs"\nfiles = ["{work}/inputs/in-*"]\n'
                    + GATHER.format(pattern="in-*"))
        seen, rss = timed_lines([sys.executable, GRIT, "-manifest", "m.toml", "-db", "db",
                                 "-run", "-verbose", "-output-mode", mode], work)
        return (seen["gather-started"] - seen["new, 0 changed"],
                seen["gather-finished"] - seen["gather-started"], rss)
    finally:
        shutil.rmtree(work)


class GritGather(Grit):
    """W1 with a gather step over every rev-* output."""

    def manifest(self, work: str, bump: str = "") -> None:
        super().manifest(work, bump)
        with open(os.path.join(work, "m.toml"), "a") as f:
            f.write(GATHER.format(pattern="rev-*"))


def w1(runner: Grit, n: int) -> float:
    work = tempfile.mkdtemp(prefix="grit-gather-w1-")
    try:
        make_inputs(work, n)
        runner.setup(work, n)
        return runner.run(work)[0]
    finally:
        shutil.rmtree(work)


def make_cat_wc(n: int) -> float:
    """make builds W1's outputs, then the timed part: `cat | wc -l` over them."""
    work = tempfile.mkdtemp(prefix="grit-gather-make-")
    try:
        make_inputs(work, n)
        Make().setup(work, n)
        Make().run(work)
        return sh("find rev -type f | xargs cat | wc -l", work)[0]
    finally:
        shutil.rmtree(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start-n", type=int, default=50000)
    ap.add_argument("--w1-n", type=int, default=10000)
    ap.add_argument("--modes", default="fuse,dir")
    ap.add_argument("--skip-w1", action="store_true")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if args.start_n:  # --start-n 0 skips this part
        print(f"| gather over N = {args.start_n:,} | commit → script start | script "
              "(reads every input) | peak RSS |\n| --- | --- | --- | --- |")
    for mode in modes if args.start_n else ():
        after, took, rss = start(args.start_n, mode)
        print(f"| grit ({mode}) | {after:.3f} s | {took:.2f} s | {rss} MiB |", flush=True)
    if args.skip_w1:
        return
    n = args.w1_n
    cat_wc = make_cat_wc(n)
    print(f"\n| N = {n:,} | W1 | W1 + gather | make's cat, wc | ratio W1+G / (W1 + make's) |"
          "\n| --- | --- | --- | --- | --- |")
    for mode in modes:
        plain, gathered = Grit(mode), GritGather(mode)
        a1, b1, b2, a2 = w1(plain, n), w1(gathered, n), w1(gathered, n), w1(plain, n)
        alone, both = statistics.mean([a1, a2]), statistics.mean([b1, b2])
        print(f"| grit ({mode}) | {alone:.2f} s | {both:.2f} s | {cat_wc:.2f} s | "
              f"{both / (alone + cat_wc):.3f}x |", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Fan-out benchmark: grit next to `make -j2` doing the same per-file work.

A seed writes N distinct ~100-byte files; step A runs `tr a-z A-Z` on each,
step B runs `rev` on each A output (2N+1 tasks). Then a no-op rerun. Both
tools run in the same process of this script, one after the other, so the
ratios compare like with like on a noisy machine.

    bench/fanout.py [--sizes 1000,10000] [--mode dir] [--repeat 1]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIT = os.path.join(ROOT, "grit.py")

SEED = 'for i in $(seq 1 {n}); do printf "item %06d %s\\n" $i "$(printf "%080d" $i)" > {out}/in-$i; done'

MANIFEST = f'''
[[step]]
name = "seed"
script = \'{SEED.format(n="{n}", out="$OUTPUT_DIR")}\'

[[step]]
name = "upper"
inputs = ["in-*"]
script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/upper"'

[[step]]
name = "reverse"
inputs = ["upper"]
script = 'rev "$INPUT_FILE" > "$OUTPUT_DIR/reversed"'
'''

MAKEFILE = '''
N := {n}
IDS := $(shell seq 1 $(N))
all: $(IDS:%=rev/%)
in/stamp:
\tmkdir -p in upper rev
\t{seed}
\ttouch $@
in/in-%: in/stamp ;
upper/%: in/stamp
\ttr a-z A-Z < in/in-$* > $@
rev/%: upper/%
\trev $< > $@
'''


def timed(cmd: list[str], cwd: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stderr}")
    return time.perf_counter() - started


def bench_grit(n: int, work: str, mode: str) -> tuple[float, float]:
    with open(os.path.join(work, "m.toml"), "w") as f:
        f.write(MANIFEST.replace("{n}", str(n)))
    cmd = [sys.executable, GRIT, "-manifest", "m.toml", "-db", "db", "-run", "-parallel", "2",
           "-output-mode", mode]
    return timed(cmd, work), timed(cmd, work)


def bench_make(n: int, work: str) -> tuple[float, float]:
    with open(os.path.join(work, "Makefile"), "w") as f:
        f.write(MAKEFILE.format(n=n, seed=SEED.format(n=n, out="in").replace("$", "$$")))
    cmd = ["make", "-j2", "-s"]
    return timed(cmd, work), timed(cmd, work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--mode", default="dir", help="grit -output-mode")
    ap.add_argument("--repeat", type=int, default=1, help="runs per size; medians are printed")
    args = ap.parse_args()
    print(f"{'N':>7} {'tasks':>6} | {'make s':>7} {'grit s':>7} {'ratio':>6} | "
          f"{'make noop':>9} {'grit noop':>9} {'ratio':>6}")
    for n in (int(s) for s in args.sizes.split(",")):
        rows = []
        for _ in range(args.repeat):
            base = tempfile.mkdtemp(prefix="grit-bench-")
            try:
                os.mkdir(os.path.join(base, "make"))
                os.mkdir(os.path.join(base, "grit"))
                make = bench_make(n, os.path.join(base, "make"))
                grit = bench_grit(n, os.path.join(base, "grit"), args.mode)
                rows.append((make, grit))
            finally:
                shutil.rmtree(base)
        make_run = statistics.median(r[0][0] for r in rows)
        make_noop = statistics.median(r[0][1] for r in rows)
        grit_run = statistics.median(r[1][0] for r in rows)
        grit_noop = statistics.median(r[1][1] for r in rows)
        print(f"{n:>7} {2 * n + 1:>6} | {make_run:7.2f} {grit_run:7.2f} {grit_run / make_run:5.2f}x"
              f" | {make_noop:9.3f} {grit_noop:9.3f} {grit_noop / make_noop:5.2f}x", flush=True)


if __name__ == "__main__":
    main()

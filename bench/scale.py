#!/usr/bin/env python3
"""Scale benchmark (W5): reruns against a database of 10^6 resources.

The database is built fast by a documented bulk path: grit runs a real
pipeline once (seed and a source step -> upper), then this script inserts N
more live resources (emitted by the seed's task) and their finished `upper`
tasks with plain SQL in grit's schema, as if grit had processed them. Then it
times a no-op rerun, a dry run (it copies the metadata into memory) and a
rerun after one new input file, and reports peak RSS. Ratios are against the
same on a 1,000-resource database measured in the same run.

    bench/scale.py [--resources 1000000]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIT = os.path.join(ROOT, "grit.py")

MANIFEST = '''
[[step]]
name = "seed"
script = "echo item-1 > $OUTPUT_DIR/item-1"

[[step]]
name = "files"
files = ["inputs/item-*"]

[[step]]
name = "upper"
inputs = ["item-*"]
script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/upper"'
'''


def grit(work: str, *args: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, GRIT, "-manifest", "m.toml", "-db", "db", "-run",
                           "-quiet", *args], cwd=work, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"grit failed: {proc.stderr}")
    return time.perf_counter() - started


def build(work: str, extra: int) -> None:
    """A real run on two items, then `extra` more live resources emitted by the
    seed's task, each with its finished upper task, inserted in grit's schema."""
    os.mkdir(os.path.join(work, "inputs"))
    with open(os.path.join(work, "inputs", "item-a"), "w") as f:
        f.write("item a\n")
    with open(os.path.join(work, "m.toml"), "w") as f:
        f.write(MANIFEST)
    grit(work)
    db = sqlite3.connect(os.path.join(work, "db", "metadata.sqlite"))
    digest, seed_task = db.execute("SELECT hash, task_id FROM resource WHERE name = 'item-1'"
                                   ).fetchone()
    upper = db.execute("SELECT id FROM step WHERE name = 'upper'").fetchone()[0]
    first = db.execute("SELECT max(id) FROM resource").fetchone()[0] + 1
    ids = range(first, first + extra)
    with db:
        db.executemany("INSERT INTO resource (id, name, hash, size, task_id, created_at, live) "
                       "VALUES (?, ?, ?, 7, ?, '', 1)",
                       ((i, f"item-bulk-{i}", digest, seed_task) for i in ids))
        db.executemany("INSERT INTO emission VALUES (?, ?)", ((seed_task, i) for i in ids))
        db.executemany("INSERT INTO task (step_id, input_resource_id, status, live) "
                       "VALUES (?, ?, 'done', 1)", ((upper, i) for i in ids))
    db.close()


def measure(extra: int) -> dict:
    work = tempfile.mkdtemp(prefix="grit-scale-")
    try:
        build(work, extra)
        noop = statistics.median(grit(work) for _ in range(3))
        dry = statistics.median(grit(work, "-dry-run") for _ in range(3))
        with open(os.path.join(work, "inputs", "item-b"), "w") as f:
            f.write("item b\n")
        one_new = grit(work)  # the source imports item-b: 1 task runs
        return {"noop": noop, "dry": dry, "one_new": one_new,
                "rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    finally:
        shutil.rmtree(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resources", type=int, default=1_000_000)
    args = ap.parse_args()
    small = measure(1000)
    large = measure(args.resources)
    print(f"{'resources':>10} | {'no-op s':>8} | {'dry run s':>9} | {'one new input s':>15} | "
          "peak RSS MiB")
    for n, r in ((1000, small), (args.resources, large)):
        print(f"{n:>10} | {r['noop']:8.3f} | {r['dry']:9.3f} | {r['one_new']:15.3f} | "
              f"{r['rss_mib']:.0f}")
    print(f"ratio {args.resources:,} / 1,000: no-op {large['noop'] / small['noop']:.2f}x, "
          f"dry run {large['dry'] / small['dry']:.2f}x, "
          f"one new input {large['one_new'] / small['one_new']:.2f}x "
          f"(targets: no-op <= 0.3 s, one new input <= 0.5 s + its task)")


if __name__ == "__main__":
    main()

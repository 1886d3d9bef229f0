#!/usr/bin/env python3
"""How fast `-run -watch` brings a result up to date (issue 34).

A source step of --files files (~100 bytes each, in one folder) and `tr a-z A-Z`
on each. After the first round, one file is changed --repeat times (a second
apart); each time, the seconds from the write to the moment its downstream
result is live in the database (read-only SQLite, polled every 5 ms). The
task's own time (its script) is printed beside it: the rest is grit's.

    bench/watch.py [--files 10000] [--repeat 10] [--output-mode fuse|dir]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = '''
[[step]]
name = "src"
files = ["inputs/*"]
[[step]]
name = "up"
inputs = ["in-*"]
script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/up-$GRIT_INPUT_NAME"'
'''


def found(db: str, query: str, *params) -> bool:
    """Whether the query's first row holds a true value (false while the
    database is not there yet)."""
    try:
        con = sqlite3.connect(f"file:{db}/metadata.sqlite?mode=ro", uri=True)
        try:
            row = con.execute(query, params).fetchone()
            return bool(row and row[0])
        finally:
            con.close()
    except sqlite3.Error:
        return False


def live(db: str, name: str, digest: str) -> bool:
    return found(db, "SELECT 1 FROM resource WHERE name = ? AND hash = ? AND live = 1",
                 name, digest)


def first_round_done(db: str) -> bool:
    return found(db, "SELECT finished_at FROM run WHERE id = 1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--output-mode", default="fuse")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        os.makedirs(f"{work}/inputs")
        for i in range(args.files):
            with open(f"{work}/inputs/in-{i}", "w") as f:
                f.write(f"item {i:06d} " + "x" * 88 + "\n")
        with open(f"{work}/m.toml", "w") as f:
            f.write(MANIFEST)
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "grit.py"), "-manifest",
                                 "m.toml", "-db", "db", "-run", "-watch", "-quiet",
                                 "-output-mode", args.output_mode], cwd=work)
        try:
            started = time.monotonic()
            while not first_round_done(f"{work}/db"):
                time.sleep(0.05)
            print(f"first round: {args.files} files, {args.files} tasks in "
                  f"{time.monotonic() - started:.1f} s")
            time.sleep(1)
            latencies, own = [], []
            for k in range(args.repeat):
                text = f"changed {k} " + "y" * 90 + "\n"
                digest = hashlib.sha256(text.upper().encode()).hexdigest()
                written = time.monotonic()
                with open(f"{work}/inputs/in-{k}", "w") as f:
                    f.write(text)
                while not live(f"{work}/db", f"up-in-{k}", digest):
                    time.sleep(0.005)
                latencies.append(time.monotonic() - written)
                con = sqlite3.connect(f"file:{work}/db/metadata.sqlite?mode=ro", uri=True)
                own.append(con.execute("SELECT duration FROM task WHERE id = (SELECT max(id) "
                                       "FROM task)").fetchone()[0])
                con.close()
                time.sleep(1)
        finally:
            proc.terminate()
            proc.wait()
    print(f"one changed file of {args.files}: result live after {statistics.median(latencies):.3f} s "
          f"(median of {args.repeat}; min {min(latencies):.3f}, max {max(latencies):.3f}); "
          f"the task itself {statistics.median(own):.3f} s")


if __name__ == "__main__":
    main()

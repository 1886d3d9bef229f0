#!/usr/bin/env python3
"""Output capture benchmark: FUSE mode next to dir mode, in the same run.

  big:   one task writes 1 GiB with `dd bs=1M`
  small: one task writes 2,000 small files

Prints throughput for the big file (MB/s, including hashing and storing in
LMDB), the per-file cost of small files, and the FUSE/dir ratios.

    bench/capture.py [--size-mib 1024] [--files 2000] [--repeat 3]
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


def run_once(script: str, mode: str) -> float:
    work = tempfile.mkdtemp(prefix="grit-bench-")
    try:
        with open(os.path.join(work, "m.toml"), "w") as f:
            f.write(f"[[step]]\nname = \"w\"\nscript = '''\n{script}\n'''\n")
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, GRIT, "-manifest", "m.toml", "-db", "db", "-run",
                               "-output-mode", mode, "-quiet"], cwd=work,
                              capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        if proc.returncode:
            sys.exit(f"grit failed in {mode} mode: {proc.stderr}")
        return elapsed
    finally:
        shutil.rmtree(work)


def median(script: str, mode: str, repeat: int) -> float:
    return statistics.median(run_once(script, mode) for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    big = f"dd if=/dev/zero of=$OUTPUT_DIR/big bs=1M count={args.size_mib} status=none"
    small = (f"i=0; while [ $i -lt {args.files} ]; do echo $i > $OUTPUT_DIR/f-$i; "
             f"i=$((i+1)); done")
    empty = "true"
    base = {m: median(empty, m, args.repeat) for m in ("fuse", "dir")}
    print(f"grit start-up and one empty task: fuse {base['fuse']:.3f} s, dir {base['dir']:.3f} s")
    rates = {}
    for mode in ("fuse", "dir"):
        t = median(big, mode, args.repeat) - base[mode]
        rates[mode] = args.size_mib * 1.048576 / t
        print(f"{args.size_mib} MiB, dd bs=1M, {mode:>4}: {t:6.2f} s  {rates[mode]:7.0f} MB/s")
    print(f"big file throughput fuse/dir: {rates['fuse'] / rates['dir']:.2f}x (target >= 0.6x)")
    per_file = {}
    for mode in ("fuse", "dir"):
        t = median(small, mode, args.repeat) - base[mode]
        per_file[mode] = t / args.files * 1e6
        print(f"{args.files} small files, {mode:>4}: {t:6.2f} s  {per_file[mode]:6.0f} us/file")
    extra = per_file["fuse"] - per_file["dir"]
    print(f"small files: fuse costs {extra:+.0f} us/file over dir (target <= 250)")


if __name__ == "__main__":
    main()

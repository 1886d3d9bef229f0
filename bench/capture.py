#!/usr/bin/env python3
"""Output capture benchmark: FUSE mode next to dir mode, in the same run.

  big:   one task writes 1 GiB with `dd bs=1M`
  small: one task writes 2,000 small files

Prints throughput for the big file (MB/s, including hashing and storing in
LMDB), the per-file cost of small files, and the FUSE/dir ratios.

    bench/capture.py [--size-mib 1024] [--files 2000] [--repeat 3]

The two modes alternate within each repeat (medians of each).
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


def medians(script: str, repeat: int) -> dict[str, float]:
    """Median time per mode, the modes alternated (fuse, dir, dir, fuse, …) so
    that a machine slowing down mid-run weighs on both alike."""
    times: dict[str, list[float]] = {"fuse": [], "dir": []}
    for i in range(repeat):
        for mode in ("fuse", "dir") if i % 2 == 0 else ("dir", "fuse"):
            times[mode].append(run_once(script, mode))
    return {mode: statistics.median(t) for mode, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="0: no big file")
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--grit", default=GRIT, help="the grit.py to run")
    args = ap.parse_args()
    globals()["GRIT"] = os.path.abspath(args.grit)
    big = f"dd if=/dev/zero of=$OUTPUT_DIR/big bs=1M count={args.size_mib} status=none"
    small = (f"i=0; while [ $i -lt {args.files} ]; do echo $i > $OUTPUT_DIR/f-$i; "
             f"i=$((i+1)); done")
    base = medians("true", args.repeat)
    print(f"grit start-up and one empty task: fuse {base['fuse']:.3f} s, dir {base['dir']:.3f} s")
    if args.size_mib:
        took = medians(big, args.repeat)
        rates = {m: args.size_mib * 1.048576 / (took[m] - base[m]) for m in took}
        for mode, rate in rates.items():
            print(f"{args.size_mib} MiB, dd bs=1M, {mode:>4}: {took[mode] - base[mode]:6.2f} s"
                  f"  {rate:7.0f} MB/s")
        print(f"big file throughput fuse/dir: {rates['fuse'] / rates['dir']:.2f}x (target >= 0.6x)")
    took = medians(small, args.repeat)
    per_file = {m: (took[m] - base[m]) / args.files * 1e6 for m in took}
    for mode, us in per_file.items():
        print(f"{args.files} small files, {mode:>4}: {took[mode] - base[mode]:6.2f} s  {us:6.0f} us/file")
    extra = per_file["fuse"] - per_file["dir"]
    print(f"small files: fuse costs {extra:+.0f} us/file over dir (target <= 250)")


if __name__ == "__main__":
    main()

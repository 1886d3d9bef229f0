#!/usr/bin/env python3
"""-executor slurm against grit's local executor, and against one job per task.

W1 of bench/compare.py (N inputs of ~100 bytes; `tr a-z A-Z` on each, then `rev`
on each result: 2N tasks), cold, on a two-node cluster (2 CPUs each) that
tests/slurm-cluster.sh starts in a temp folder:

  local      grit -run (the local executor, -parallel 2)
  slurm      grit -run -executor slurm (array jobs; -parallel: the cluster's CPUs)
  per-task   one sbatch job per task, the way Snakemake's Slurm plugin submits by
             default: every `tr` job, then every `rev` job after it (afterok), at
             --per-task-n inputs (it is slow), next to grit's slurm run at that N
  fan-out    a seed writing --fan-out-n items, a step over each, a gather step,
             with -work-dir on local disk, then on a folder that
             tests/sshfs-share.sh shares as a network filesystem would: the
             coordinator and the nodes each on a sshfs mount of their own, which
             caches listings for 20 s (sshfs's default)
  node down  slurm W1 again, with grit-node2 taken down (scontrol) 2.5 s in, its
             elements running: the run must finish by itself with every task done
             once (grit's defaults: it looks at squeue every 30 s)

Each pair runs alternately (ABBA) --repeat times; medians and ratios from the
same run. Prints a Markdown table (bench/RESULTS.md keeps a copy). Needs root
(the nodes run in a mount namespace of their own).

    bench/slurm.py [--n 1000] [--per-task-n 100] [--fan-out-n 500] [--repeat 2] [--grit PATH]
                   [--w1-only]
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from compare import Grit, make_inputs  # noqa: E402  (compare.py's W1: inputs, manifest)



def timed(argv: list[str], cwd: str, env: dict) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(argv)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def grit_run(grit: str, n: int, executor: str, env: dict, node_down: bool = False) -> float:
    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".bench-slurm-") as work:
        make_inputs(work, n)
        Grit("auto").manifest(work)  # writes m.toml
        extra = ["-executor", "slurm"] if executor == "slurm" else ["-parallel", "2"]
        if node_down:  # 2.5 s in, grit-node2 goes down; it is back once the run ends
            down = threading.Timer(2.5, subprocess.run, (["scontrol", "update",
                                                          "nodename=grit-node2", "state=down",
                                                          "reason=bench"],), {"env": env})
            down.start()
        try:
            took = timed([sys.executable, grit, "-manifest", "m.toml", "-db", "db", "-run",
                          "-quiet", *extra], work, env)
        finally:
            if node_down:
                down.join()
                subprocess.run(["scontrol", "update", "nodename=grit-node2", "state=resume"],
                               env=env, capture_output=True)
        if node_down:
            done = sqlite3.connect(os.path.join(work, "db", "metadata.sqlite")).execute(
                "SELECT count(*), sum(status = 'done') FROM task").fetchone()
            assert done[0] == done[1] >= 2 * n, f"{done[1]} of {done[0]} tasks done after a node died"
        return took


FAN_OUT = """
[[step]]
name = "seed"
script = 'for i in $(seq 1 {n}); do echo "item $i" > $OUTPUT_DIR/item-$i; done'
[[step]]
name = "upper"
inputs = ["item-*"]
script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/up-$GRIT_INPUT_NAME"'
[[step]]
name = "total"
inputs = ["up-*"]
gather = true
script = 'cat "$INPUT_DIR"/* | sort > "$OUTPUT_DIR/total"'
"""


def fan_out_run(grit: str, n: int, work_dir: str, env: dict) -> float:
    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".bench-slurm-") as work:
        with open(os.path.join(work, "m.toml"), "w") as f:
            f.write(FAN_OUT.format(n=n))
        return timed([sys.executable, grit, "-manifest", "m.toml", "-db", "db", "-run",
                      "-quiet", "-executor", "slurm", "-work-dir", work_dir], work, env)


def per_task_run(n: int, env: dict) -> float:
    """One sbatch job per task; the rev job of an input waits for its tr job."""
    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".bench-slurm-") as work:
        make_inputs(work, n)
        os.mkdir(os.path.join(work, "out"))
        started = time.perf_counter()
        last = ""
        for i in range(1, n + 1):
            first = subprocess.run(
                ["sbatch", "--parsable", "-o", "/dev/null", "--wrap",
                 f"tr a-z A-Z < inputs/in-{i} > out/upper-{i}"],
                cwd=work, env=env, capture_output=True, text=True, check=True).stdout.strip()
            last = subprocess.run(
                ["sbatch", "--parsable", "-o", "/dev/null", f"--dependency=afterok:{first}",
                 "--wrap", f"rev out/upper-{i} > out/rev-{i}"],
                cwd=work, env=env, capture_output=True, text=True, check=True).stdout.strip()
        while True:  # done when no job of this user is left
            left = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True,
                                  text=True, check=True).stdout.split()
            if not left:
                break
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
        assert last and len(os.listdir(os.path.join(work, "out"))) == 2 * n
        return elapsed


def abba(a, b, repeat: int) -> tuple[float, float]:
    """Medians of a and b, run a b b a ... so drift hits both alike."""
    times: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(repeat):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for key in order:
            times[key].append((a if key == "a" else b)())
    return statistics.median(times["a"]), statistics.median(times["b"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--per-task-n", type=int, default=100)
    ap.add_argument("--fan-out-n", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--grit", default=os.path.join(ROOT, "grit.py"))
    ap.add_argument("--w1-only", action="store_true", help="only W1 cold, local and slurm")
    args = ap.parse_args()
    tests = os.path.join(ROOT, "tests")
    cluster, share = tempfile.mkdtemp(prefix="grit-bench-slurm-"), tempfile.mkdtemp(
        prefix="grit-bench-share-")
    env = dict(os.environ)
    try:
        namespace = subprocess.run([os.path.join(tests, "sshfs-share.sh"), "start", share],
                                   capture_output=True, text=True, check=True).stdout.strip()
        env["SLURM_CONF"] = subprocess.run(
            [os.path.join(tests, "slurm-cluster.sh"), "start", cluster, "2"],
            capture_output=True, text=True, check=True,
            env=dict(env, GRIT_SLURMD_NAMESPACE=namespace)).stdout.strip()
        local, slurm = abba(lambda: grit_run(args.grit, args.n, "local", env),
                            lambda: grit_run(args.grit, args.n, "slurm", env), args.repeat)
        if not args.w1_only:
            down = grit_run(args.grit, args.n, "slurm", env, node_down=True)
            per_task, slurm_small = abba(
                lambda: per_task_run(args.per_task_n, env),
                lambda: grit_run(args.grit, args.per_task_n, "slurm", env), args.repeat)
            disk, shared = abba(
                lambda: fan_out_run(args.grit, args.fan_out_n, os.path.join(cluster, "work"), env),
                lambda: fan_out_run(args.grit, args.fan_out_n, os.path.join(share, "work"), env),
                args.repeat)
    finally:
        subprocess.run([os.path.join(tests, "slurm-cluster.sh"), "stop", cluster])
        subprocess.run([os.path.join(tests, "sshfs-share.sh"), "stop", share])
    print("| workload | N | baseline | seconds | grit slurm | seconds | ratio |")
    print("| --- | ---: | --- | ---: | --- | ---: | ---: |")
    print(f"| W1 cold | {args.n} | grit local | {local:.2f} | grit slurm | {slurm:.2f} | "
          f"{slurm / local:.2f}x local |")
    if args.w1_only:
        return
    print(f"| W1 cold, grit-node2 down at 2.5 s | {args.n} | grit local | {local:.2f} | grit slurm "
          f"| {down:.2f} | {down / local:.2f}x local |")
    print(f"| W1 cold | {args.per_task_n} | one job per task | {per_task:.2f} | grit slurm | "
          f"{slurm_small:.2f} | {per_task / slurm_small:.1f}x faster |")
    print(f"| fan-out + gather | {args.fan_out_n} | work dir on local disk | {disk:.2f} | work dir "
          f"on sshfs, nodes on their own mount | {shared:.2f} | {shared / disk:.2f}x |")


if __name__ == "__main__":
    main()

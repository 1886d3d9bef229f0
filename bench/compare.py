#!/usr/bin/env python3
"""grit next to make, xargs, GNU parallel and Snakemake, on identical work.

N input files of ~100 bytes; step A runs `tr a-z A-Z` on each, step B `rev` on
each A output (2N tasks, plus grit's seed task that reads the inputs).

  W1  cold run
  W2  no-op rerun right after
  W3  one new input and one changed input, then rerun
  W4  one task writes 1 GiB, the next computes its sha256 (grit and make only); the
      bytes come from /dev/urandom, or with --w4-from file from a file in the page
      cache (as big data comes from disk, the network or a decompressor, with no
      CPU spent making it); --w4-gib sets the size
  W5  the same with two readers, sha256 and md5 (the second reads it from the store)

Medians of --repeat runs; each runner's time and peak RSS (largest process)
next to make -j2's, measured in the same run. Results are printed as a
Markdown table (bench/RESULTS.md keeps a copy).

    bench/compare.py [--sizes 1000,10000] [--repeat 3] [--snakemake-max 1000] [--w4] [--w5]
                     [--w4-from urandom|file] [--w4-gib 1]
                     [--runners make,grit-fuse,grit-dir,xargs,parallel] [--grit PATH]
                     [--as-script]

grit runs as installed grit runs (pip, pipx and Nix compile it once): its module
imported, the bytecode cached beside it; --as-script runs `python3 grit.py`,
which compiles its 8,500 lines at every start (0.15 s here).
--grit runs another grit.py (an older commit's, say) in place of this one;
--seed-copy imports grit's inputs the way a grit without source steps must.

Snakemake comes from a bench-only venv (.bench-venv, made on first use);
GNU parallel from the system (apt-get install parallel).
"""
from __future__ import annotations

import argparse
import atexit
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIT = os.path.join(ROOT, "grit.py")  # --grit replaces it
OWNCPU = os.path.join(ROOT, "bench", "owncpu.py")
BENCH_VENV = os.path.join(ROOT, ".bench-venv")
AS_SCRIPT = False  # --as-script


def grit_command(cpu_file: str = os.devnull) -> str:
    """The shell words that start grit (through bench/owncpu.py, which writes
    grit's own CPU to cpu_file), arguments to follow."""
    script = " --script" if AS_SCRIPT else ""
    return f"{shlex.quote(sys.executable)} {OWNCPU}{script} {cpu_file} {shlex.quote(GRIT)}"


def sh(cmd: str, cwd: str) -> tuple[float, int]:
    """Run a shell command; (wall seconds, peak RSS in MiB of its largest process)."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "sh", "-c", cmd], cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode:
        sys.exit(f"failed in {cwd}: {cmd}\n{proc.stderr[-2000:]}")
    return elapsed, int(proc.stderr.strip().splitlines()[-1]) // 1024


def make_inputs(work: str, n: int) -> None:
    os.makedirs(os.path.join(work, "inputs"))
    for i in range(1, n + 1):
        with open(os.path.join(work, "inputs", f"in-{i}"), "w") as f:
            f.write(f"item {i:06d} " + "x" * 88 + "\n")


def change_inputs(work: str, n: int) -> None:
    """W3: one new input and one changed input."""
    with open(os.path.join(work, "inputs", f"in-{n + 1}"), "w") as f:
        f.write("a brand new input\n")
    time.sleep(0.01)  # make compares mtimes
    with open(os.path.join(work, "inputs", "in-1"), "a") as f:
        f.write("changed\n")


class Grit:
    """A source step imports the inputs (each -run stats them, reads only new or
    changed files); --seed-copy uses the seed step that copies them in instead
    (the only way before source steps: W3 then bumps the seed's script)."""

    seed_copy = False

    def __init__(self, mode: str) -> None:
        self.name = f"grit ({mode})"
        self.mode = mode

    def manifest(self, work: str, bump: str = "") -> None:
        source = f'''
[[step]]
name = "seed"
files = ["{work}/inputs/in-*"]
''' if not self.seed_copy else f'''
[[step]]
name = "seed"
script = """{bump}
if [ -n "$GRIT_PREVIOUS_START" ]; then
  find {work}/inputs -type f -newermt "$GRIT_PREVIOUS_START" -exec cp -t "$OUTPUT_DIR" {{}} +
else
  cp {work}/inputs/* "$OUTPUT_DIR/"
fi
"""
'''
        with open(os.path.join(work, "m.toml"), "w") as f:
            f.write(source + '''
[[step]]
name = "upper"
inputs = ["in-*"]
script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/upper-$GRIT_INPUT_NAME"'
[[step]]
name = "reverse"
inputs = ["upper-*"]
script = 'rev "$INPUT_FILE" > "$OUTPUT_DIR/rev-$GRIT_INPUT_NAME"'
''')

    def setup(self, work: str, n: int) -> None:
        self.manifest(work, bump="# v1")

    def run(self, work: str) -> tuple[float, int]:
        """Through bench/owncpu.py, which leaves grit's own CPU in cpu.txt."""
        took = sh(f"{grit_command('cpu.txt')} -manifest m.toml -db db -run -quiet "
                  f"-parallel 2 -output-mode {self.mode}", work)
        with open(os.path.join(work, "cpu.txt")) as f:
            grit_s, server_s = map(float, f.read().split()[:2])
        self.cpu = grit_s + server_s
        return took

    def changed(self, work: str) -> None:
        if self.seed_copy:
            self.manifest(work, bump="# v2: inputs changed")


class Make:
    name = "make -j2"

    def setup(self, work: str, n: int) -> None:
        with open(os.path.join(work, "Makefile"), "w") as f:
            f.write("IN := $(wildcard inputs/in-*)\n"
                    "all: $(IN:inputs/%=rev/%)\n"
                    "upper rev:\n\tmkdir -p $@\n"
                    "upper/%: inputs/% | upper\n\ttr a-z A-Z < $< > $@\n"
                    "rev/%: upper/% | rev\n\trev $< > $@\n")

    def run(self, work: str) -> tuple[float, int]:
        return sh("make -j2 -s", work)

    def changed(self, work: str) -> None:
        pass


class ShellScript:
    """A runner that is one shell command, with its own stale check."""

    name = ""
    SCRIPT = ""

    def setup(self, work: str, n: int) -> None:
        pass

    def run(self, work: str) -> tuple[float, int]:
        return sh(self.SCRIPT, work)

    def changed(self, work: str) -> None:
        pass


class Xargs(ShellScript):
    """Two xargs -P2 passes, each with a stale check: [ out -nt in ] || redo."""

    name = "xargs -P2"
    SCRIPT = ('mkdir -p upper rev; cd inputs && ls | xargs -P2 -I{} sh -c '
              '"[ ../upper/{} -nt {} ] || tr a-z A-Z < {} > ../upper/{}" && cd ../upper && '
              'ls | xargs -P2 -I{} sh -c "[ ../rev/{} -nt {} ] || rev {} > ../rev/{}"')


class Parallel(ShellScript):
    """GNU parallel with --joblog --resume: jobs already logged are skipped by
    sequence number, so inputs are listed in version order (a new one comes
    last); a changed input is not redone, only the new one runs."""

    name = "GNU parallel -j2"
    SCRIPT = ("mkdir -p upper rev; ls -v inputs | parallel -j2 --joblog upper.log --resume "
              "'tr a-z A-Z < inputs/{} > upper/{}' && ls -v upper | parallel -j2 --joblog "
              "rev.log --resume 'rev upper/{} > rev/{}'")


class Snakemake:
    name = "snakemake --cores 2"

    def setup(self, work: str, n: int) -> None:
        with open(os.path.join(work, "Snakefile"), "w") as f:
            f.write('IDS, = glob_wildcards("inputs/{id}")\n'
                    'rule all:\n    input: expand("rev/{id}", id=IDS)\n'
                    'rule upper:\n    input: "inputs/{id}"\n    output: "upper/{id}"\n'
                    '    shell: "tr a-z A-Z < {input} > {output}"\n'
                    'rule rev:\n    input: "upper/{id}"\n    output: "rev/{id}"\n'
                    '    shell: "rev {input} > {output}"\n')

    def run(self, work: str) -> tuple[float, int]:
        return sh(f"{BENCH_VENV}/bin/snakemake --cores 2 --quiet all", work)

    def changed(self, work: str) -> None:
        pass


def ensure_snakemake() -> bool:
    if not os.path.exists(f"{BENCH_VENV}/bin/snakemake"):
        subprocess.run([sys.executable, "-m", "venv", BENCH_VENV], check=True)
        if subprocess.run([f"{BENCH_VENV}/bin/pip", "install", "-q", "snakemake"]).returncode:
            return False
    return True


def workloads(runner, n: int) -> dict:
    """W1, W2, W3 for one runner in a fresh directory: {workload: (seconds, MiB)}."""
    work = tempfile.mkdtemp(prefix="grit-compare-")
    try:
        make_inputs(work, n)
        runner.setup(work, n)
        cold = runner.run(work)
        cpu = getattr(runner, "cpu", None)  # grit's own, in W1
        noop = runner.run(work)
        change_inputs(work, n)
        runner.changed(work)
        incremental = runner.run(work)
        check_outputs(runner, work, n)
        return {"W1": cold, "W2": noop, "W3": incremental, "cpu": cpu}
    finally:
        shutil.rmtree(work)


def check_outputs(runner, work: str, n: int) -> None:
    """Every runner must have produced the same final answer for the new input."""
    if isinstance(runner, Grit):
        out = subprocess.run([sys.executable, GRIT, "-db", "db", "-export", f"rev-upper-in-{n + 1}"],
                             cwd=work, capture_output=True, text=True)
        assert out.returncode == 0, f"{runner.name}: no result for the new input"
    else:
        assert os.path.exists(os.path.join(work, "rev", f"in-{n + 1}")), runner.name


W4_SOURCE = {"path": "/dev/urandom", "gib": 1}  # set by main(): where W4's bytes come from


def w4_source(kind: str, gib: int) -> None:
    """With kind "file": a file of `gib` GiB of random bytes, read once so that
    it is in the page cache (make and grit read it alike)."""
    W4_SOURCE["gib"] = gib
    if kind == "file":
        folder = tempfile.mkdtemp(prefix="grit-w4-source-")
        atexit.register(shutil.rmtree, folder, True)
        path = os.path.join(folder, "source")
        subprocess.run(f"head -c {gib}G /dev/urandom > {path} && cat {path} > /dev/null",
                       shell=True, check=True)
        W4_SOURCE["path"] = path


class DiskPeak:
    """The most disk used on `path`'s filesystem beyond what it used at the
    start, sampled every 50 ms while inside (W4: where the bytes are copied)."""

    def __init__(self, path: str) -> None:
        self.path, self.peak, self._done = path, 0, threading.Event()
        self._start = shutil.disk_usage(path).used

    def __enter__(self) -> "DiskPeak":
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, shutil.disk_usage(self.path).used - self._start)

    def __exit__(self, *exc: object) -> None:
        self._done.set()


DISK_PEAKS: dict[str, list[int]] = {}  # runner -> peak bytes of each W4/W5 run


def w4(runner_name: str, readers: int = 1) -> tuple[float, int]:
    """One task writes W4_SOURCE's bytes; `readers` tasks then read them
    (sha256sum, md5sum): with two, the second reads the object out of the store (W5)."""
    tools = ["sha256sum", "md5sum"][:readers]
    make_big = f"head -c {W4_SOURCE['gib']}G {W4_SOURCE['path']}"
    work = tempfile.mkdtemp(prefix="grit-w4-")
    try:
        if runner_name == "make -j2":
            with open(os.path.join(work, "Makefile"), "w") as f:
                f.write(f"all: {' '.join(tools)}\n" +
                        "".join(f"{t}: big\n\t{t} big > {t}\n" for t in tools) +
                        f"big:\n\t{make_big} > big\n")
            with DiskPeak(work) as disk:
                result = sh("make -j2 -s", work)
            DISK_PEAKS.setdefault(runner_name, []).append(disk.peak)
            return result
        mode = runner_name.split("(")[1].rstrip(")")
        with open(os.path.join(work, "m.toml"), "w") as f:
            f.write(f'[[step]]\nname = "big"\nscript = "{make_big} > $OUTPUT_DIR/big"\n' +
                    "".join(f'[[step]]\nname = "{t}"\ninputs = ["big"]\n'
                            f'script = "{t} $INPUT_FILE > $OUTPUT_DIR/{t}"\n' for t in tools))
        with DiskPeak(work) as disk:
            result = sh(f"{grit_command()} -manifest m.toml -db db -run -quiet "
                        f"-output-mode {mode}", work)
        DISK_PEAKS.setdefault(runner_name, []).append(disk.peak)
        return result
    finally:
        shutil.rmtree(work)


def median(rows: list[dict], key: str) -> tuple[float, int]:
    return (statistics.median(r[key][0] for r in rows), max(r[key][1] for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--snakemake-max", type=int, default=1000,
                    help="largest N to run Snakemake at (it is slow)")
    ap.add_argument("--w4", action="store_true", help="also run W4 (1 GiB)")
    ap.add_argument("--w5", action="store_true", help="also run W5 (1 GiB, two readers)")
    ap.add_argument("--w4-from", choices=("urandom", "file"), default="urandom",
                    help="W4/W5's bytes: /dev/urandom, or a file in the page cache")
    ap.add_argument("--w4-gib", type=int, default=1, help="W4/W5's size in GiB")
    ap.add_argument("--runners", default="make,grit-fuse,grit-dir,xargs,parallel,snakemake",
                    help="which runners, make first (the baseline of the ratios)")
    ap.add_argument("--grit", default=GRIT, help="the grit.py to run")
    ap.add_argument("--seed-copy", action="store_true",
                    help="grit imports the inputs with a copying seed, not a source step "
                         "(for a grit.py older than source steps)")
    ap.add_argument("--as-script", action="store_true",
                    help="run `python3 grit.py`, compiled at every start, not grit as installed")
    args = ap.parse_args()
    globals()["GRIT"] = os.path.abspath(args.grit)
    globals()["AS_SCRIPT"] = args.as_script
    if not args.as_script:  # the bytecode is written once, before anything is timed
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run(f"{grit_command()} -h", shell=True, capture_output=True, check=True)
    if args.w4 or args.w5:
        w4_source(args.w4_from, args.w4_gib)
    Grit.seed_copy = args.seed_copy
    every = {"make": Make(), "grit-fuse": Grit("fuse"), "grit-dir": Grit("dir"),
             "xargs": Xargs(), "parallel": Parallel()}
    wanted = args.runners.split(",")
    runners = [every[name] for name in wanted if name in every]
    have_snakemake = "snakemake" in wanted and ensure_snakemake()
    print(f"# grit compared, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    print("| N | runner | W1 cold | ratio | W2 no-op | W3 one new + one changed | peak RSS "
          "| grit's own CPU per task (W1) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in (int(x) for x in args.sizes.split(",") if x):
        chosen = runners + ([Snakemake()] if have_snakemake and n <= args.snakemake_max else [])
        runs: dict[str, list[dict]] = {r.name: [] for r in chosen}
        for i in range(args.repeat):  # alternated, so a machine slowing down weighs on all
            for runner in chosen if i % 2 == 0 else chosen[::-1]:
                if not (isinstance(runner, Snakemake) and i):  # Snakemake is slow: once
                    runs[runner.name].append(workloads(runner, n))
        base = None
        for runner in chosen:
            rows = runs[runner.name]
            w1, w2, w3 = (median(rows, k) for k in ("W1", "W2", "W3"))
            base = base or w1[0]
            rss = max(w1[1], w2[1], w3[1])
            cpus = [r["cpu"] for r in rows if r["cpu"] is not None]
            cpu = f"{statistics.median(cpus) / (2 * n) * 1000:.2f} ms" if cpus else ""
            print(f"| {n:,} | {runner.name} | {w1[0]:.2f} s | {w1[0] / base:.2f}x | "
                  f"{w2[0]:.3f} s | {w3[0]:.3f} s | {rss} MiB | {cpu} |", flush=True)
        each = "; ".join(name + " " + "/".join(f"{r['W1'][0]:.2f}" for r in rows)
                         for name, rows in runs.items())
        print(f"\n(W1 runs at N = {n:,}: {each})\n", flush=True)
    size = f"{args.w4_gib} GiB from {'a cached file' if args.w4_from == 'file' else 'urandom'}"
    for flag, readers, title in ((args.w4, 1, f"W4: {size}, then sha256"),
                                 (args.w5, 2, f"W5: {size}, then sha256 and md5")):
        if not flag:
            continue
        print(f"\n| {title} | time | ratio | peak RSS | peak disk | ratio |\n"
              "| --- | --- | --- | --- | --- | --- |")
        DISK_PEAKS.clear()
        names = ["make -j2", "grit (fuse)", "grit (dir)"]
        runs: dict[str, list] = {name: [] for name in names}
        for i in range(args.repeat):  # alternated, so a machine slowing down weighs on all
            for name in names if i % 2 == 0 else names[::-1]:
                runs[name].append(w4(name, readers))
        base = base_disk = None
        for name in names:
            t = statistics.median(r[0] for r in runs[name])
            rss = max(r[1] for r in runs[name])
            disk = max(DISK_PEAKS[name])
            base, base_disk = base or t, base_disk or disk
            print(f"| {name} | {t:.2f} s | {t / base:.2f}x | {rss} MiB | {disk / 2**30:.2f} GiB "
                  f"| {disk / base_disk:.2f}x |", flush=True)
        print(f"\n(runs: {', '.join(f'{n} ' + '/'.join(f'{r[0]:.2f}' for r in runs[n]) for n in names)};"
              f" as {'root' if os.geteuid() == 0 else 'an ordinary user'})", flush=True)

if __name__ == "__main__":
    main()

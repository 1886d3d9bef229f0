#!/usr/bin/env python3
"""Run grit and write down the CPU grit itself spent (issue 31): its own process
(all threads, Python's start and grit's import included, the scripts not) and
its FUSE server, whose times are read from /proc while it is a zombie, just
before grit reaps it.

    bench/owncpu.py [--script] CPU_FILE GRIT_PY ARGS...

grit's module is imported, its bytecode cached, as an installed grit's is;
--script runs grit.py as a script instead (compiled at every start).

CPU_FILE gets one line: "<grit seconds> <FUSE server seconds>".
"""
from __future__ import annotations

import importlib.util
import os
import resource
import runpy
import sys

TICK = os.sysconf("SC_CLK_TCK")
server_seconds = [0.0]
SCRIPTS: set[int] = set()  # grit's children that are not its FUSE server
_waitpid, _posix_spawn = os.waitpid, os.posix_spawn


def times_of_exited(pid: int, options: int) -> None:
    """utime + stime of a child that has exited and is not reaped yet."""
    try:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | (options & os.WNOHANG)) is None:
            return  # still running (WNOHANG)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return
    server_seconds[0] += (int(fields[11]) + int(fields[12])) / TICK


def waitpid(pid: int, options: int) -> tuple[int, int]:
    if pid > 0 and pid not in SCRIPTS:
        times_of_exited(pid, options)
    return _waitpid(pid, options)


def posix_spawn(*args, **kw) -> int:
    pid = _posix_spawn(*args, **kw)
    SCRIPTS.add(pid)
    return pid




def main() -> None:
    as_script = sys.argv[1] == "--script"
    cpu_file, grit_py, *args = sys.argv[1 + as_script:]
    os.waitpid = waitpid
    os.posix_spawn = posix_spawn
    sys.argv = [grit_py, *args]
    code = 0
    try:
        if as_script:
            runpy.run_path(grit_py, run_name="__main__")
        else:
            spec = importlib.util.spec_from_file_location("grit", grit_py)
            module = sys.modules["grit"] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.exit(module.main())
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (1 if e.code else 0)
    own = resource.getrusage(resource.RUSAGE_SELF)
    with open(cpu_file, "w") as f:
        f.write(f"{own.ru_utime + own.ru_stime:.4f} {server_seconds[0]:.4f} "
                f"{own.ru_utime:.4f} {own.ru_stime:.4f}\n")
    sys.exit(code)


if __name__ == "__main__":
    main()

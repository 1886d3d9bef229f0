"""grit.pyz: built by build_zipapp.sh, run with `python3.X -I grit.pyz` under every
CPython 3.9-3.13 on this machine, in a clean HOME, with a cold and a warm cache."""
import base64
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import EXAMPLES, ROOT, fuse_problem, require_fuse

MAX_PYZ_BYTES = 4 * 1024 * 1024


def find_pythons(minors) -> dict[str, str]:
    """One interpreter per CPython minor version: python3.X on PATH, or one that
    pyenv installed (under $PYENV_ROOT, default ~/.pyenv)."""
    pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = {}
    for minor in minors:
        candidates = sorted(glob.glob(os.path.join(pyenv, "versions", f"3.{minor}.*", "bin",
                                                   "python3")))
        on_path = shutil.which(f"python3.{minor}")
        candidates += [on_path] if on_path else []
        if candidates:
            found[f"3.{minor}"] = candidates[0]
    return found


def pythons():
    """The supported CPythons 3.9-3.13 found here, this one at least."""
    found = find_pythons(range(9, 14))
    found.setdefault(f"{sys.version_info.major}.{sys.version_info.minor}", sys.executable)
    return found


OLD_PYTHONS = find_pythons(range(6, 9))


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    """Fetch the wheels, then build offline from them, as the Nix build does."""
    base = tmp_path_factory.mktemp("pyz")
    for args in (["--download", str(base / "wheels")],
                 ["--wheels", str(base / "wheels"), "-o", str(base / "grit.pyz")]):
        proc = subprocess.run([str(ROOT / "build_zipapp.sh"), *args], capture_output=True,
                              text=True, timeout=600,
                              env=dict(os.environ, PYTHON=sys.executable))  # the venv has pip
        if proc.returncode and args[0] == "--download":
            pytest.skip("cannot fetch the wheels grit.pyz is built from (no PyPI here?): "
                        + (proc.stderr.strip().splitlines() or ["no message"])[-1])
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((base / "wheels").iterdir())) == 12  # 10 lmdb wheels, tomli, mfusepy
    return base / "grit.pyz"


def run_pyz(python, pyz, cwd, home, *args, env=None):
    clean = {"PATH": os.environ["PATH"], "HOME": str(home), **(env or {})}
    return subprocess.run([python, "-I", str(pyz), *args], cwd=cwd, env=clean,
                          capture_output=True, text=True, timeout=120)


def test_pyz_is_small_and_executable(pyz):
    assert pyz.stat().st_size <= MAX_PYZ_BYTES
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    proc = subprocess.run([str(pyz), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("grit ")


@pytest.mark.parametrize("version", sorted(pythons()))
def test_quickstart_cold_and_warm_cache(pyz, tmp_path, version):
    python = pythons()[version]
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "workflow.toml").write_bytes((EXAMPLES / "quickstart.toml").read_bytes())
    times = []
    for run in ("cold", "warm"):
        db = f"db-{run}"
        started = time.monotonic()
        proc = run_pyz(python, pyz, tmp_path, home, "-manifest", "workflow.toml", "-db", db,
                       "-run", "-verbose")
        times.append(time.monotonic() - started)
        assert proc.returncode == 0, proc.stderr
        assert "3 task(s) run, 0 failed, 4 resource(s) created" in proc.stderr
        mode = "fuse" if fuse_problem() is None else "dir"
        assert f"output mode: {mode}" in proc.stderr
        listing = run_pyz(python, pyz, tmp_path, home, "-db", db, "-export", "processed")
        digest = listing.stdout.split("\t")[0]
        content = run_pyz(python, pyz, tmp_path, home, "-db", db, "-export-hash", digest)
        assert content.stdout == "INPUT DATA\n"
        if run == "cold":  # grit's bytecode, compiled once for this Python
            [code] = (home / ".cache" / "grit").glob("grit-*.code")
            written = code.stat()
    cached = sorted(p.name for p in (home / ".cache" / "grit").iterdir())
    assert len(cached) == 2 and cached[0].startswith("grit-") and cached[1].startswith(
        "lmdb-1.7.5-"), cached
    assert (code.stat().st_ino, code.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    print(f"python {version}: cold {times[0]:.3f} s, warm {times[1]:.3f} s")


def test_fuse_mode_where_only_libfuse3_can_be_loaded(pyz, tmp_path):
    """libfuse2 made unloadable (a private mount namespace binds /dev/null over
    it, as on hosts that ship only libfuse3): the pyz runs in FUSE mode on libfuse3."""
    require_fuse()
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("hiding libfuse2 needs root and unshare (a private mount namespace)")
    hidden = sorted(set(map(os.path.realpath, glob.glob("/usr/lib/*/libfuse.so.2*")
                            + glob.glob("/lib/*/libfuse.so.2*"))))
    (tmp_path / "workflow.toml").write_bytes((EXAMPLES / "quickstart.toml").read_bytes())
    script = "".join(f"mount --bind /dev/null {p} && " for p in hidden) + (
        f"! {sys.executable} -c 'import ctypes; ctypes.CDLL(\"libfuse.so.2\")' 2>/dev/null && "
        f"exec {sys.executable} -I {pyz} -manifest workflow.toml -db db -run -verbose "
        "-output-mode fuse")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PATH": os.environ["PATH"],
                                                       "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "output mode: fuse (libfuse3, writeback cache)" in proc.stderr
    assert "3 task(s) run, 0 failed" in proc.stderr


def test_slurm_nodes_run_the_pyz_copied_into_the_work_dir(pyz, tmp_path, cluster):
    (tmp_path / "workflow.toml").write_bytes((EXAMPLES / "quickstart.toml").read_bytes())
    proc = run_pyz(sys.executable, pyz, tmp_path, tmp_path, "-manifest", "workflow.toml",
                   "-db", "db", "-run", "-executor", "slurm", "-verbose",
                   env={"SLURM_CONF": cluster["SLURM_CONF"]})
    assert proc.returncode == 0, proc.stderr
    copy = tmp_path / "grit-work" / "grit.pyz"
    assert f"nodes run grit as: python3 {copy}" in proc.stderr
    assert copy.read_bytes() == pyz.read_bytes()
    assert "3 task(s) run, 0 failed, 4 resource(s) created" in proc.stderr


def test_concurrent_first_runs_share_one_extraction(pyz, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    procs = [subprocess.Popen([sys.executable, "-I", str(pyz), "-db", f"db{i}", "-export", "x"],
                              cwd=tmp_path, env={"PATH": os.environ["PATH"], "HOME": str(home)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(6)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 2 and "no grit database at db" in err  # got as far as grit
    cached = sorted(d.name for d in (home / ".cache" / "grit").iterdir())
    assert len(cached) == 2 and cached[0].startswith("grit-") and cached[1].startswith(
        "lmdb-"), cached  # no half-written extraction or bytecode left


def test_damaged_cached_bytecode_is_compiled_again(pyz, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    run = [sys.executable, "-I", str(pyz), "-db", "db", "-export", "x"]
    assert "no grit database at db" in subprocess.run(run, cwd=tmp_path, env=env,
                                                      capture_output=True, text=True).stderr
    [code] = (home / ".cache" / "grit").glob("grit-*.code")
    good = code.read_bytes()
    code.write_bytes(good[:len(good) // 2])  # cut short, as by a full disk
    proc = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "no grit database at db" in proc.stderr, proc.stderr
    assert code.read_bytes() == good


def test_unwritable_cache_falls_back_to_a_private_directory(pyz, tmp_path):
    (tmp_path / "workflow.toml").write_bytes((EXAMPLES / "quickstart.toml").read_bytes())
    proc = run_pyz(sys.executable, pyz, tmp_path, tmp_path, "-manifest", "workflow.toml",
                   "-db", "db", "-run", env={"XDG_CACHE_HOME": "/dev/null/cannot"})
    assert proc.returncode == 0, proc.stderr


def test_database_made_by_the_pyz_opens_with_grit_py(pyz, tmp_path):
    (tmp_path / "workflow.toml").write_bytes((EXAMPLES / "quickstart.toml").read_bytes())
    assert run_pyz(sys.executable, pyz, tmp_path, tmp_path, "-manifest", "workflow.toml",
                   "-db", "db", "-run").returncode == 0
    proc = subprocess.run([sys.executable, str(ROOT / "grit.py"), "-db", "db", "-export",
                           "sorted"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "\tsorted\t" in proc.stdout


def test_flake_pins_exactly_the_wheels_the_pyz_is_built_from(pyz):
    """flake.nix fetches the same files (by name and SRI hash) for packages.grit-pyz."""
    pinned = dict(re.findall(r'"([^"]+\.(?:whl|tar\.gz))" "(sha256-[^"]+)"',
                             (ROOT / "flake.nix").read_text()))
    downloaded = {
        wheel.name: "sha256-" + base64.b64encode(hashlib.sha256(wheel.read_bytes()).digest()).decode()
        for wheel in (pyz.parent / "wheels").iterdir()}
    assert pinned == downloaded


@pytest.mark.parametrize("version", sorted(OLD_PYTHONS) or [
    pytest.param("3.6-3.8", marks=pytest.mark.skip(reason="no CPython 3.6-3.8 on this machine"))])
def test_an_old_python_gets_one_line_saying_what_is_needed(pyz, tmp_path, version):
    proc = run_pyz(OLD_PYTHONS[version], pyz, tmp_path, tmp_path, "--version")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [
        f"grit.pyz needs Python 3.9 or newer; this is Python {version} ({OLD_PYTHONS[version]})"]

"""Helpers shared by the tests: run grit as a user would, in a temp directory."""
from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
GRIT = str(ROOT / "grit.py")
EXAMPLES = ROOT / "examples"
SLURM_SCRIPT = str(ROOT / "tests" / "slurm-cluster.sh")
sys.path.insert(0, str(ROOT))


# tests/run runs the suite in two pytest-xdist workers (`--dist loadgroup`).
# Tests that share something outside their tmp_path run in one worker, one
# after another: the Slurm cluster (a session fixture: one per worker) and
# the ordinary user that tests create with useradd, with its venv in /tmp.
SHARED = {"cluster": "slurm", "other_user": "other-user", "other_python": "other-user"}


@pytest.fixture(autouse=True)
def alone_or_together(request, tmp_path_factory):
    """Under two workers, a test marked `alone` (it measures something the
    whole machine shares: the page cache) runs while no other test does. A
    gate lock ahead of the turn lock keeps new tests from starving it."""
    if not hasattr(request.config, "workerinput"):
        yield
        return
    folder = tmp_path_factory.getbasetemp().parent  # the workers' common folder
    alone = request.node.get_closest_marker("alone") is not None
    with open(folder / "gate.lock", "a") as gate, open(folder / "turn.lock", "a") as turn:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(turn, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        groups = {SHARED[f] for f in getattr(item, "fixturenames", ()) if f in SHARED}
        if item.module.__name__ == "test_slurm_cluster":
            groups.add("slurm")  # starts clusters of its own beside the session's
        if groups:
            item.add_marker(pytest.mark.xdist_group(sorted(groups)[0]))


def wait_for(predicate, timeout: float = 20.0) -> bool:
    """Poll until predicate() is true; False if it never was within timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def mounts_under(path) -> list[str]:
    """Mount points at or below `path` (FUSE mounts a run left behind)."""
    root = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(root)]


def processes_using(path):
    """PIDs whose command line or working directory mentions `path`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if int(pid) != os.getpid() and (str(path) in cmd or cwd.startswith(str(path))):
            found.append(int(pid))
    return found


class Grit:
    """A working directory with a manifest and a database, and grit to run in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest = path / "workflow.toml"
        self.db = path / "db"
        self.started: list[subprocess.Popen] = []  # by popen(): stopped when the test ends

    def write(self, toml: str) -> Path:
        self.manifest.write_text(textwrap.dedent(toml))
        return self.manifest

    def __call__(self, *args: str, timeout: float = 120, env: dict | None = None,
                 check: int | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, GRIT, *args], cwd=self.path,
                              capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, **(env or {})))
        if check is not None:
            assert proc.returncode == check, proc.stderr + proc.stdout
        return proc

    def run(self, *extra: str, check: int | None = 0, **kw) -> subprocess.CompletedProcess:
        return self("-manifest", str(self.manifest), "-db", str(self.db), "-run", *extra,
                    check=check, **kw)

    def popen(self, *extra: str, **kw) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, GRIT, "-manifest", str(self.manifest),
                                 "-db", str(self.db), "-run", *extra], cwd=self.path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
        self.started.append(proc)
        return proc

    def stop_started(self) -> None:
        """Runs a test started and left running (it failed before it stopped them):
        Ctrl-C, so they unmount and cancel their jobs; killed if that takes a minute."""
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(2)
                try:
                    proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()

    def export(self, name: str) -> list[tuple[str, str, str]]:
        proc = self("-db", str(self.db), "-export", name, check=0)
        return [tuple(line.split("\t")) for line in proc.stdout.splitlines()]

    def content(self, digest: str) -> bytes:
        proc = subprocess.run([sys.executable, GRIT, "-db", str(self.db), "-export-hash", digest],
                              capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def contents(self, name: str) -> list[bytes]:
        """Content of every resource of that name, oldest first."""
        return [self.content(h) for h, _, _ in self.export(name)] if self.has(name) else []

    def has(self, name: str) -> bool:
        return self("-db", str(self.db), "-export", name).returncode == 0

    def status(self) -> dict:
        """What `-status -json` says."""
        return json.loads(self("-db", str(self.db), "-status", "-json", check=0).stdout)

    def tasks(self, step: str, version: int | None = None) -> dict:
        """{"pending", "done", "failed"} task counts of a step's latest version
        (or of `version`), from -status -json."""
        [row] = [s for s in self.status()["steps"] if s["name"] == step and (
            s["latest"] if version is None else s["version"] == version)]
        return row["tasks"]

    def count(self, pattern: str) -> int:
        """Resources whose name is or matches `pattern`, from -status -json."""
        names = self.status()["resources"]["names"]
        return sum(n for name, n in names.items() if fnmatch.fnmatchcase(name, pattern))

    def log(self, task_id: int) -> dict:
        """What `-log TASK -json` says."""
        return json.loads(self("-db", str(self.db), "-log", str(task_id), "-json", check=0).stdout)

    def sql(self, query: str, *params) -> list[tuple]:
        """Raw SQL, for what no grit command shows (crash tests checking the database itself)."""
        db = sqlite3.connect(f"file:{self.db / 'metadata.sqlite'}?mode=ro", uri=True)
        try:
            return db.execute(query, params).fetchall()
        finally:
            db.close()

    def sql_if_ready(self, query: str, *params) -> list[tuple] | None:
        """sql(), or None while the database or its schema does not exist yet
        (a run killed at start-up leaves an empty metadata file)."""
        try:
            return self.sql(query, *params)
        except sqlite3.OperationalError:
            return None

    def resources(self) -> set[tuple[str, str]]:
        return set(self.sql("SELECT name, hash FROM resource"))


@pytest.fixture
def grit(tmp_path: Path) -> Iterator[Grit]:
    g = Grit(tmp_path)
    yield g
    g.stop_started()


_fuse_problem: list = []


def fuse_problem() -> str | None:
    """Why FUSE cannot be used on this machine (None if it can), found once by
    running grit with -output-mode fuse."""
    if not _fuse_problem:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            g = Grit(Path(d))
            g.write('[[step]]\nname = "s"\nscript = "echo ok > $OUTPUT_DIR/ok"\n')
            proc = g.run("-output-mode", "fuse", check=None)
            _fuse_problem.append(None if proc.returncode == 0 else proc.stderr.strip())
    return _fuse_problem[0]


def require_fuse() -> None:
    """Skip when FUSE is unavailable, except in CI (GRIT_REQUIRE_FUSE=1): fail there."""
    problem = fuse_problem()
    if problem:
        if os.environ.get("GRIT_REQUIRE_FUSE") == "1":
            pytest.fail(f"FUSE is required here (GRIT_REQUIRE_FUSE=1) but unusable: {problem}")
        pytest.skip(f"FUSE unavailable on this machine: {problem}")


@pytest.fixture(params=["fuse", "dir"])
def output_mode(request) -> str:
    """Run the test once with each output mode."""
    if request.param == "fuse":
        require_fuse()
    return request.param


def require_slurm() -> None:
    """Skip where Slurm is not installed, except in CI (GRIT_REQUIRE_SLURM=1): fail there."""
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(c)]
    if missing:
        if os.environ.get("GRIT_REQUIRE_SLURM") == "1":
            pytest.fail(f"Slurm is required here (GRIT_REQUIRE_SLURM=1) but {missing} are missing")
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing; "
                    "tests/bootstrap.sh installs it as root on Debian/Ubuntu)")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """SLURM_CONF of a running two-node cluster (grit-node1, grit-node2: 2 CPUs
    each); its daemons are stopped however the tests end."""
    require_slurm()
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([SLURM_SCRIPT, "start", str(folder), "2"], capture_output=True,
                             text=True,
                             timeout=120, env=dict(os.environ, GRIT_SLURM_MIN_JOB_AGE="2"))
    try:
        assert started.returncode == 0, started.stderr
        yield {"SLURM_CONF": started.stdout.strip(), "folder": folder}
    finally:
        subprocess.run([SLURM_SCRIPT, "stop", str(folder)], timeout=120)

"""Executors are plugged in by name: a new one is a subclass of grit.Executor
registered in grit.EXECUTORS, and the manifest parser (its [NAME] table), the
CLI (-executor NAME and its own flags) and the scheduler take it from there
with no edit of theirs. Shown with a trivial executor that runs each script in
a thread of grit's own process, over a plain directory."""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import tempfile

import pytest

import grit
from conftest import EXAMPLES


@dataclasses.dataclass
class InProcessSettings:
    shell: str = "sh"


class InProcess(grit.Executor):
    """One script at a time, in a thread; its outputs are the files it leaves."""

    settings = InProcessSettings
    flags = {"scratch": ("DIR", "where scripts run (default: a temporary folder)")}
    ran: list[str] = []

    def __init__(self, db, shell: str, scratch: str) -> None:
        self.db, self.shell, self.scratch = db, shell, scratch
        self.pool = concurrent.futures.ThreadPoolExecutor(1)

    @classmethod
    def for_run(cls, opts, manifest, db, console):
        return cls(db, manifest.executors["inprocess"].shell,
                   opts.executor_flags.get("scratch") or tempfile.mkdtemp())

    def __exit__(self, *exc):
        self.pool.shutdown()

    def submit(self, spec):
        return self.pool.submit(self.run, spec)

    def run(self, spec):
        out = tempfile.mkdtemp(dir=self.scratch)
        input_file = os.path.join(self.scratch, f"input-{spec.task_id}")
        with open(input_file, "wb") as f:
            f.writelines(self.db.objects.open(spec.input_hash) if spec.input_hash else ())
        env = dict(os.environ, OUTPUT_DIR=out, INPUT_FILE=input_file if spec.input_hash else "")
        done = subprocess.run([self.shell, "-c", spec.script], env=env, capture_output=True)
        self.ran.append(spec.step)
        if done.returncode:
            return grit.TaskResult(spec.task_id, exit_code=done.returncode, error="failed")
        outputs = [grit.Output(name, *self.db.objects.put_file(os.path.join(out, name)))
                   for name in sorted(os.listdir(out))]
        shutil.rmtree(out)
        return grit.TaskResult(spec.task_id, exit_code=0, outputs=outputs, started_at=grit.utc_now())

    def running(self):
        return collections.Counter()


@pytest.fixture
def inprocess():
    grit.EXECUTORS["inprocess"] = InProcess
    InProcess.ran = []
    yield InProcess
    del grit.EXECUTORS["inprocess"]


def test_a_registered_executor_runs_the_quick_start(inprocess, tmp_path, capsys):
    manifest = tmp_path / "workflow.toml"
    manifest.write_text(EXAMPLES.joinpath("quickstart.toml").read_text()
                        + '\n[inprocess]\nshell = "/bin/sh"\n')
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    db = str(tmp_path / "db")
    assert grit.main(["-manifest", str(manifest), "-db", db, "-run", "-executor", "inprocess",
                      "-scratch", str(scratch)]) == 0
    assert sorted(inprocess.ran) == ["process", "start", "transform"]
    capsys.readouterr()
    assert grit.main(["-db", db, "-export", "processed"]) == 0
    digest = capsys.readouterr().out.split("\t")[0]
    assert b"".join(grit.Database.for_reading(db).objects.open(digest)) == b"INPUT DATA\n"
    # the same database, run locally: nothing left to do, the results are the same
    assert grit.main(["-manifest", str(manifest), "-db", db, "-run", "-dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("0 task(s) would start")


def test_a_registered_executor_brings_its_table_and_its_flags(inprocess, tmp_path, capsys):
    manifest = tmp_path / "workflow.toml"
    manifest.write_text(EXAMPLES.joinpath("quickstart.toml").read_text()
                        + '\n[inprocess]\nshel = "sh"\n')
    base = ["-manifest", str(manifest), "-db", str(tmp_path / "db"), "-run"]
    assert grit.main(base + ["-executor", "inprocess"]) == grit.EXIT_USAGE
    assert '[inprocess]: unknown key "shel" (did you mean "shell"?)' in capsys.readouterr().err
    manifest.write_text(EXAMPLES.joinpath("quickstart.toml").read_text())
    assert grit.main(base + ["-scratch", str(tmp_path)]) == grit.EXIT_USAGE
    assert "-scratch goes with -executor inprocess" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grit.main(["--help"])
    assert "-scratch DIR" in capsys.readouterr().out
    del grit.EXECUTORS["inprocess"]
    with pytest.raises(SystemExit) as stop:  # unregistered: not a choice any more
        grit.main(base + ["-executor", "inprocess"])
    grit.EXECUTORS["inprocess"] = InProcess
    assert stop.value.code == grit.EXIT_USAGE


@pytest.mark.parametrize("mode", ["dir", "fuse"])
def test_runs_in_one_process_leave_no_descriptor_open(tmp_path, mode):
    """A program that runs grit.main again and again (the property tests do)
    must not run out of file descriptors: each run closes what it opened, and
    leaves the environment (which later runs and their scripts inherit) as it was."""
    if mode == "fuse":
        from conftest import require_fuse
        require_fuse()
    manifest = tmp_path / "workflow.toml"
    manifest.write_text('[[step]]\nname = "seed"\n'
                        'script = "for i in 1 2 3 4 5 6; do echo $i > $OUTPUT_DIR/n-$i; done"\n'
                        '[[step]]\nname = "copy"\ninputs = ["n-*"]\n'
                        'script = "cat $INPUT_FILE > $OUTPUT_DIR/c-$GRIT_INPUT_NAME"\n')

    def run(i: int) -> None:
        assert grit.main(["-manifest", str(manifest), "-db", str(tmp_path / f"db{i}"), "-run",
                          "-quiet", "-output-mode", mode]) == 0

    environment = dict(os.environ)
    run(0)  # what stays open for good (imported libraries) is open after the first
    before = len(os.listdir("/proc/self/fd"))
    for i in range(1, 4):
        run(i)
    assert len(os.listdir("/proc/self/fd")) == before
    assert dict(os.environ) == environment

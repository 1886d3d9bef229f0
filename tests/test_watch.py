"""-run -watch: after every kind of change to the files or the manifest, the
live results become a clean run's, without a rerun by hand; bursts make one
run; an idle watch costs nothing; Ctrl-C exits 130 with nothing lost."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GRIT, Grit, wait_for

MANIFEST = '''
[[step]]
name = "src"
files = ["data/**/*.txt"]
[[step]]
name = "up"
inputs = ["*.txt", "*/*.txt"]
script = """! grep -q fail "$INPUT_FILE" || exit 3
tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/up-$(basename "$GRIT_INPUT_NAME" .txt)""""
[[step]]
name = "count"
inputs = ["up-*"]
gather = true
script = 'cat "$INPUT_DIR"/up-* | wc -l > "$OUTPUT_DIR/lines"'
'''


def live(grit: Grit, db: Path) -> set[tuple[str, str]]:
    out = grit("-db", str(db), "-export", "*", "-live", check=None).stdout
    return {tuple(line.split("\t")[:2]) for line in out.splitlines()}


def clean_run(grit: Grit, tmp_path: Path) -> set[tuple[str, str]]:
    """What a clean run on the files and manifest as they are now makes."""
    db = tmp_path.parent / f"{tmp_path.name}-clean-{time.monotonic_ns()}"  # not watched
    grit("-manifest", str(grit.manifest), "-db", str(db), "-run", check=None)
    return live(grit, db)


def runs(grit: Grit) -> list[dict]:
    rows = grit.sql_if_ready("SELECT id, finished_at, started FROM run ORDER BY id")
    return [dict(zip(("id", "finished_at", "started"), row)) for row in rows or []]


def watching(grit: Grit, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, GRIT, "-manifest", str(grit.manifest), "-db",
                             str(grit.db), "-run", "-watch", *extra], cwd=grit.path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: any(r["finished_at"] for r in runs(grit)), 60), "no first run"
    return proc


def settled(grit: Grit, expected: set, timeout: float = 30) -> bool:
    """The watch's live results become `expected`, and no round is going on."""
    return wait_for(lambda: live(grit, grit.db) == expected
                    and all(r["finished_at"] for r in runs(grit)), timeout)


def stop(proc: subprocess.Popen, sig=signal.SIGINT) -> str:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    return err


@pytest.fixture
def data(grit):
    folder = grit.path / "data"
    (folder / "sub").mkdir(parents=True)
    for name, text in {"a.txt": "alpha\n", "b.txt": "beta\n", "sub/c.txt": "gamma\n"}.items():
        (folder / name).write_text(text)
    grit.write(MANIFEST)
    return folder


@pytest.mark.parametrize("mode", ["fuse", "dir"])
def test_every_kind_of_change_makes_the_live_results_a_clean_runs(grit, data, tmp_path, mode):
    if mode == "fuse" and not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse does not exist here")
    proc = watching(grit, "-output-mode", mode)
    try:
        steps = [
            ("edit", lambda: (data / "a.txt").write_text("alpha two\n")),
            ("add", lambda: (data / "d.txt").write_text("delta\n")),
            ("add in a new folder", lambda: ((data / "new").mkdir(),
                                             (data / "new" / "e.txt").write_text("eps\n"))),
            ("delete", lambda: (data / "b.txt").unlink()),
            ("rename", lambda: (data / "d.txt").rename(data / "sub" / "d2.txt")),
            ("revert", lambda: (data / "a.txt").write_text("alpha\n")),
            ("a task that fails", lambda: (data / "f.txt").write_text("fail\n")),
            ("edit the manifest", lambda: grit.write(MANIFEST.replace("wc -l", "wc -c"))),
        ]
        for what, change in steps:
            change()
            expected = clean_run(grit, tmp_path)
            assert settled(grit, expected), f"after {what}: not a clean run's results"
        before = len(runs(grit))
        os.utime(data / "a.txt")  # touched, not changed: a round that runs no task (nor
        assert wait_for(lambda: len(runs(grit)) > before  # the failed one again)
                        and runs(grit)[-1]["finished_at"], 30)
        assert runs(grit)[-1]["started"] == 0
        # the read-only commands work beside the watch, which holds the run lock
        for command in (["-status"], ["-log", "1"], ["-runs"], ["-export-tar", "*", "-"],
                        ["-report", str(tmp_path / "now.html")]):
            grit("-db", str(grit.db), *command, check=0)
        assert "is in use by another grit run" in grit("-db", str(grit.db), "-gc",
                                                       check=2).stderr
        before = len(runs(grit))
        grit.write("this is [[ not TOML")  # one line, and a round on the last good one
        assert wait_for(lambda: len(runs(grit)) > before and runs(grit)[-1]["finished_at"], 30)
        (data / "a.txt").write_text("alpha three\n")
        grit.write(MANIFEST.replace("wc -l", "wc -c"))
        assert settled(grit, clean_run(grit, tmp_path)), "after a broken then fixed manifest"
    finally:
        err = stop(proc)
    assert err.count("the watch keeps the manifest it last read") == 1, err
    assert "interrupted: the watch stopped between runs" in err
    assert "watching 5 file(s) in 4 folder(s); last run " in err  # data, sub, new, the manifest's
    assert "task " in err and "(up) failed: exit status 3" in err


def test_a_burst_of_writes_makes_at_most_two_runs(grit, data, tmp_path):
    proc = watching(grit)
    try:
        before = len(runs(grit))
        for i in range(200):  # 200 writes in one second, as an rsync would
            (data / f"burst-{i % 50}.txt").write_text(f"item {i}\n")
            time.sleep(0.005)
        assert settled(grit, clean_run(grit, tmp_path))
        assert 1 <= len(runs(grit)) - before <= 2, runs(grit)
    finally:
        stop(proc)


def own_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children still running (the FUSE server)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def test_an_idle_watch_over_ten_thousand_files_uses_under_one_percent_of_a_core(grit, tmp_path):
    data = grit.path / "data"
    for d in range(10):
        (data / f"d{d}").mkdir(parents=True)
        for i in range(1000):
            (data / f"d{d}" / f"f{i}.txt").write_text(f"{d} {i}\n")
    grit.write('[[step]]\nname = "src"\nfiles = ["data/**/*.txt"]\n')
    proc = watching(grit)
    try:
        start = own_cpu_seconds(proc.pid)
        time.sleep(30)  # the measurement itself: CPU over 30 s of doing nothing
        used = own_cpu_seconds(proc.pid) - start
        assert used < 0.3, f"{used:.2f} s of CPU in 30 s idle"
    finally:
        stop(proc, signal.SIGTERM)


def test_ctrl_c_during_a_round_exits_130_and_loses_nothing(grit, data, tmp_path):
    grit.write(MANIFEST.replace("tr a-z A-Z", "sleep 0.3; tr a-z A-Z"))
    proc = watching(grit)
    for i in range(8):
        (data / f"more-{i}.txt").write_text(f"more {i}\n")
    assert wait_for(lambda: len(runs(grit)) >= 2, 30)  # a round with tasks is going on
    err = stop(proc)
    assert "interrupted" in err
    finished = grit.sql("SELECT count(*) FROM task WHERE status = 'done'")[0][0]
    grit.run()  # the rest, and nothing done twice
    assert live(grit, grit.db) == clean_run(grit, tmp_path)
    assert grit.sql("SELECT count(*) FROM task WHERE status = 'done'")[0][0] >= finished
    assert "-watch goes with -run, not with -dry-run" in grit.run("-watch", "-dry-run",
                                                                 check=2).stderr


def test_polling_where_inotify_is_not_used_says_so_once_and_still_sees_changes(grit, data,
                                                                               tmp_path):
    os.environ["GRIT_WATCH_POLL"] = "0.2"  # as on a network filesystem
    try:
        proc = watching(grit)
    finally:
        del os.environ["GRIT_WATCH_POLL"]
    try:
        (data / "a.txt").write_text("alpha polled\n")
        assert settled(grit, clean_run(grit, tmp_path))
        (data / "sub" / "c.txt").unlink()
        assert settled(grit, clean_run(grit, tmp_path))
    finally:
        err = stop(proc)
    assert err.count("-watch: GRIT_WATCH_POLL is 0.2; looking for changes every 0.2 s "
                     "instead") == 1, err

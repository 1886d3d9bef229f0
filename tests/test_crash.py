"""The run lock, kill -9 then resume, and Ctrl-C / SIGTERM."""
import os
import signal
import time

import pytest

from conftest import wait_for

SLOW = '''
[[step]]
name = "seed"
script = "for i in $(seq 1 {n}); do echo $i > $OUTPUT_DIR/n-$i; done"
[[step]]
name = "work"
inputs = ["n-*"]
script = """
sleep {delay}
echo "w $(cat $INPUT_FILE)" > $OUTPUT_DIR/w-$(cat $INPUT_FILE)
echo "$$" > {pids}/$GRIT_TASK_ID
"""
[[step]]
name = "more"
inputs = ["w-*"]
script = "rev $INPUT_FILE > $OUTPUT_DIR/r"
'''


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_second_run_fails_at_once_and_export_still_works(grit, tmp_path):
    (tmp_path / "pids").mkdir()
    grit.write(SLOW.format(n=4, delay=1, pids=tmp_path / "pids"))
    first = grit.popen("-parallel", "1")
    try:
        assert wait_for(lambda: grit.has("n-1"))
        second = grit.run(check=2)
        assert first.poll() is None  # it failed at once, not after waiting for the first
        assert "is in use by another grit run (pid" in second.stderr
        assert grit.export("n-1")[0][1] == "n-1"  # read-only access while it runs
    finally:
        first.communicate(timeout=60)
    assert first.returncode == 0


def test_export_during_a_run_sees_only_committed_resources(grit, output_mode, tmp_path):
    written = tmp_path / "written"
    grit.write(f'''
[[step]]
name = "seed"
script = "echo early > $OUTPUT_DIR/early"
[[step]]
name = "slow"
inputs = ["early"]
script = "echo late > $OUTPUT_DIR/late; touch {written}; sleep 2"
''')
    proc = grit.popen("-output-mode", output_mode)
    try:
        assert wait_for(written.exists)
        assert [r[1] for r in grit.export("early")] == ["early"]  # committed: visible now
        late = grit("-db", str(grit.db), "-export", "late", check=1)  # written, not committed
        assert late.stderr == f'grit: error: no resource named "late" in {grit.db}\n'
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == 0 and [r[1] for r in grit.export("late")] == ["late"]


def test_two_runs_started_together_exactly_one_proceeds(grit, tmp_path):
    (tmp_path / "pids").mkdir()
    grit.write(SLOW.format(n=2, delay=0.5, pids=tmp_path / "pids"))
    procs = [grit.popen() for _ in range(2)]
    codes = sorted(p.wait(timeout=60) for p in procs)
    assert codes == [0, 2]


def clean_resources(grit, tmp_path, manifest):
    other = tmp_path / "clean"
    other.mkdir()
    (other / "pids").mkdir()
    from conftest import Grit
    g = Grit(other)
    g.write(manifest.replace(str(tmp_path / "pids"), str(other / "pids")))
    g.run()
    return g.resources()


@pytest.mark.parametrize("kill_after", [0.3, 0.9, 1.6])
def test_kill_9_then_resume_gives_a_clean_runs_resources(grit, tmp_path, kill_after):
    (tmp_path / "pids").mkdir()
    manifest = SLOW.format(n=12, delay=0.2, pids=tmp_path / "pids")
    grit.write(manifest)
    proc = grit.popen("-parallel", "2")
    time.sleep(kill_after)
    proc.kill()
    proc.wait()
    grit.run()
    assert grit.resources() == clean_resources(grit, tmp_path, manifest)
    # every task of each step done exactly once
    assert [(s["name"], s["tasks"]) for s in grit.status()["steps"]] == [
        ("seed", {"pending": 0, "done": 1, "failed": 0}),
        ("work", {"pending": 0, "done": 12, "failed": 0}),
        ("more", {"pending": 0, "done": 12, "failed": 0})]
    for _, digest in grit.resources():  # every object readable
        grit.content(digest)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_scripts_exits_130_and_next_run_resumes(grit, tmp_path, sig):
    pids = tmp_path / "pids"
    pids.mkdir()
    grit.write(SLOW.format(n=6, delay=30, pids=pids).replace(
        "sleep {delay}".format(delay=30), "echo $$ > {}/$GRIT_TASK_ID; sleep 30".format(pids)))
    proc = grit.popen("-parallel", "3")
    assert wait_for(lambda: len(os.listdir(pids)) == 3)
    script_pids = [int((pids / f).read_text()) for f in os.listdir(pids)]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=15)  # scripts sleep 30 s: they were stopped
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not any(alive(p) for p in script_pids)
    assert grit.tasks("work")["pending"] == 6
    assert grit.count("w-*") == 0
    # resume with a fast script: the same tasks finish (a new version would re-run all)
    grit.write(SLOW.format(n=6, delay=0, pids=pids))
    grit.run()
    assert grit.count("w-*") == 6


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_seed(grit, output_mode, sig, tmp_path):
    marker = tmp_path / "seed-started"
    grit.write(f'''
[[step]]
name = "seed"
script = "touch {marker}; for i in $(seq 1 300); do echo $i > $OUTPUT_DIR/n-$i; sleep 0.01; done"
[[step]]
name = "use"
inputs = ["n-*"]
script = "cat $INPUT_FILE > $OUTPUT_DIR/copy"
''')
    proc = grit.popen("-output-mode", output_mode)
    assert wait_for(marker.exists)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=15)  # the seed would take 3 s more
    assert proc.returncode == 130, err
    assert grit.tasks("seed") == {"pending": 1, "done": 0, "failed": 0}
    assert grit.status()["resources"]["count"] == 0
    with open("/proc/self/mountinfo") as f:
        assert str(grit.db) not in f.read()
    grit.run("-output-mode", output_mode)  # resumes: the seed runs again, then the rest
    assert grit.count("n-*") == 300


def test_scripts_that_ignore_sigterm_are_killed_after_the_grace(grit, tmp_path):
    started_marker = tmp_path / "started"
    grit.write(f'''
[[step]]
name = "stubborn"
script = "trap '' TERM; touch {started_marker}; sleep 60; echo x > $OUTPUT_DIR/x"
''')
    proc = grit.popen()
    assert wait_for(started_marker.exists)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)  # it sleeps 60 s: SIGKILL came after the grace
    assert proc.returncode == 130, err
    assert grit.tasks("stubborn") == {"pending": 1, "done": 0, "failed": 0}

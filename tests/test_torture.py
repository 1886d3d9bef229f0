"""kill -9 at 20 moments of a 201-task pipeline, resuming each time: the end
state equals a clean run's, with nothing lost or duplicated."""
import time

import pytest

from conftest import Grit, mounts_under, require_fuse, wait_for

KILL_POINTS = 20
PIPELINE = '''
[[step]]
name = "seed"
script = "for i in $(seq 1 100); do echo item-$i > $OUTPUT_DIR/item-$i; done"
[[step]]
name = "upper"
inputs = ["item-*"]
parallel = 3
script = "sleep 0.05; tr a-z A-Z < $INPUT_FILE > $OUTPUT_DIR/upper"
[[step]]
name = "reverse"
inputs = ["upper"]
script = "rev $INPUT_FILE > $OUTPUT_DIR/reversed"
'''


@pytest.mark.parametrize("mode", ["dir", "fuse"])
def test_kill_9_at_many_moments(tmp_path, mode):
    if mode == "fuse":
        require_fuse()
    clean = Grit(tmp_path / "clean")
    clean.path.mkdir()
    clean.write(PIPELINE)
    clean.run("-output-mode", mode, "-parallel", "2")

    grit = Grit(tmp_path / "killed")
    grit.path.mkdir()
    grit.write(PIPELINE)
    hit = {"early": 0, "middle": 0}  # kills before any downstream task was done / among them
    for i in range(KILL_POINTS):
        proc = grit.popen("-output-mode", mode, "-parallel", "2")
        # Kill once the pipeline got to its i-th tenth of the tasks (the first
        # during start-up), a little after: start-up, the seed, FUSE writes, a
        # task's exit before its commit, commits. Progress, not a clock, sets the
        # moment, so a slow machine is hit all along the run as a fast one is.
        wait_for(lambda: proc.poll() is not None or done_tasks(grit) >= 10 * i, timeout=60)
        time.sleep(0.01 * (i % 5))
        proc.kill()
        proc.wait()
        counts = grit.sql_if_ready(
            "SELECT total(status != 'done'), "
            "total(status = 'done' AND input_resource_id IS NOT NULL) FROM task")
        unfinished, downstream_done = counts[0] if counts else (1, 0)
        if unfinished and not downstream_done:
            hit["early"] += 1  # registration, the seed, or just after its commit
        elif unfinished:
            hit["middle"] += 1  # tasks running, exiting, committing
    # the kills really hit unfinished work, spread over the run
    assert hit["early"] >= 1 and hit["middle"] >= 5 and sum(hit.values()) >= 15, hit
    wait_for(lambda: not mounts_under(grit.db), timeout=10)
    grit.run("-output-mode", mode, "-parallel", "2")

    assert grit.resources() == clean.resources()
    # each task done exactly once for its step version, none left pending or failed
    assert grit.sql("SELECT s.name, count(*) FROM task t JOIN step s ON s.id = t.step_id "
                    "WHERE t.status = 'done' GROUP BY s.name ORDER BY s.name") == [
        ("reverse", 100), ("seed", 1), ("upper", 100)]
    assert grit.sql("SELECT count(*) FROM task WHERE status != 'done'") == [(0,)]
    # every resource was made by a task that finished
    assert grit.sql("SELECT count(*) FROM resource r JOIN task t ON t.id = r.task_id "
                    "WHERE t.status != 'done'") == [(0,)]
    verify = grit("-db", str(grit.db), "-verify", check=0)  # every object readable, intact
    assert "0 problem(s)" in verify.stderr
    assert mounts_under(grit.db) == []
    # objects stored by killed tasks are left unreferenced: -gc removes them
    grit("-db", str(grit.db), "-gc", check=0)
    from grit import ObjectStore
    store = ObjectStore(str(grit.db / "objects"), readonly=True)
    stored = store.hashes()
    store.close()
    referenced = {r[0] for r in grit.sql("SELECT hash FROM resource UNION SELECT stdout_hash "
                                         "FROM task UNION SELECT stderr_hash FROM task") if r[0]}
    assert stored == referenced
    assert grit.resources() == clean.resources()


@pytest.mark.parametrize("mode", ["dir", "fuse"])
def test_kill_9_after_the_script_exits_before_its_commit(tmp_path, mode):
    """The window in which a finished script's 30 MB of output is being stored:
    either the task is done and its resources exist, or neither."""
    if mode == "fuse":
        require_fuse()
    exited = tmp_path / "exited"
    grit = Grit(tmp_path)
    grit.write(f'''
[[step]]
name = "seed"
script = "head -c 30000000 /dev/urandom > $OUTPUT_DIR/big; echo s > $OUTPUT_DIR/small; touch {exited}"
''')
    in_window = 0
    for _ in range(3):
        exited.unlink(missing_ok=True)
        proc = grit.popen("-output-mode", mode)
        deadline = time.monotonic() + 30
        while not exited.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.kill()
        proc.wait()
        done = grit.sql("SELECT count(*) FROM task WHERE status = 'done'") == [(1,)]
        resources = grit.sql("SELECT count(*) FROM resource")[0][0]
        assert resources == (2 if done else 0)
        in_window += not done
        if done:
            break
    assert in_window >= 1  # at least one kill landed between the exit and the commit
    grit.run("-output-mode", mode)
    assert sorted(n for n, _ in grit.resources()) == ["big", "small"]
    assert grit.sql("SELECT count(*) FROM task") == [(1,)]
    wait_for(lambda: not mounts_under(grit.db), timeout=10)
    assert mounts_under(grit.db) == []


def done_tasks(grit: Grit) -> int:
    counts = grit.sql_if_ready("SELECT count(*) FROM task WHERE status = 'done'")
    return counts[0][0] if counts else 0

"""-executor slurm against a real two-node cluster (tests/slurm-cluster.sh):
real sbatch, squeue and scancel, array elements running `grit -worker` on the node."""
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, SLURM_SCRIPT, Grit, require_slurm, wait_for

# The tests look at squeue every second and give a finished element 3 s for its
# records; the defaults (30 s each) suit real clusters.
FAST = {"GRIT_SLURM_POLL": "1", "GRIT_SLURM_GRACE": "3"}

FAN_OUT = '''
    [[step]]
    name = "seed"
    script = """
    for i in 1 2 3 4 5 6 7 8; do echo "item $i" > $OUTPUT_DIR/item; done
    printf 'b\\na\\nc\\n' > $OUTPUT_DIR/list
    """
    [[step]]
    name = "upper"
    inputs = ["item", "list"]
    script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/up-$GRIT_INPUT_NAME"'
    [[step]]
    name = "split"
    inputs = ["up-list"]
    script = 'split -l 1 "$INPUT_FILE" "$OUTPUT_DIR/part-"'
    [[step]]
    name = "total"
    inputs = ["up-*", "part-*"]
    gather = true
    script = 'cat "$INPUT_DIR"/* | sort > "$OUTPUT_DIR/total"'
'''


# Objects of 1 MiB or more travel as files: the coordinator links its input
# into the job folder, the node copies it in, and the coordinator renames the
# node's result from the work dir into its store (one filesystem here).
LARGE = '''
    [[step]]
    name = "seed"
    script = "yes seed | head -c 3000000 > $OUTPUT_DIR/big; echo small > $OUTPUT_DIR/small"
    [[step]]
    name = "double"
    inputs = ["big"]
    script = 'cat "$INPUT_FILE" "$INPUT_FILE" > "$OUTPUT_DIR/double"'
    [[step]]
    name = "sum"
    inputs = ["double", "small"]
    gather = true
    script = 'cat "$INPUT_DIR/double" "$INPUT_DIR/small" | sha256sum > "$OUTPUT_DIR/sum"'
'''


@pytest.fixture(autouse=True)
def _a_clean_cluster_after(request):
    """Whatever a test leaves (a job waiting for a file it never got, a node it took
    down) is cleared before the next one: one failure does not starve the rest."""
    yield
    if "cluster" in request.fixturenames:
        cluster = request.getfixturevalue("cluster")
        env = dict(os.environ, SLURM_CONF=cluster["SLURM_CONF"])
        subprocess.run(["scancel", "--user", "root"], env=env, timeout=60, capture_output=True)
        subprocess.run(["scontrol", "update", "nodename=grit-node[1-2]", "state=resume"],
                       env=env, timeout=60, capture_output=True)  # fails where none is down
        assert wait_for(lambda: not squeue(cluster, "-o", "%i"), 60)


def on_slurm(grit: Grit, cluster, *extra, check=0, env=None, timeout=180):
    env = dict(FAST, SLURM_CONF=cluster["SLURM_CONF"], **(env or {}))
    return grit.run("-executor", "slurm", *extra, check=check, env=env, timeout=timeout)


def popen_on_slurm(grit: Grit, cluster, *extra, env=None) -> subprocess.Popen:
    return grit.popen("-executor", "slurm", *extra,
                      env=dict(os.environ, **dict(FAST, SLURM_CONF=cluster["SLURM_CONF"],
                                                  **(env or {}))))


def live(grit: Grit) -> set[tuple[str, str]]:
    """The live (name, hash) set, through -export '*' -live."""
    out = grit("-db", str(grit.db), "-export", "*", "-live", check=0).stdout
    return {(line.split("\t")[1], line.split("\t")[0]) for line in out.splitlines()}


def squeue(cluster, *args) -> str:
    return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SLURM_CONF=cluster["SLURM_CONF"]),
                          check=True).stdout


def our_jobs(cluster, grit: Grit) -> str:
    """This test's jobs that squeue shows pending or running (grit names them grit-*)."""
    return "".join(line for line in squeue(cluster, "-o", "%j %T\n").splitlines(True)
                   if line.startswith("grit-"))


def local_twin(tmp_path, manifest: str, mode: str = "auto") -> set[tuple[str, str]]:
    twin = Grit(tmp_path / "local")
    twin.path.mkdir()
    twin.write(manifest)
    twin.run("-output-mode", mode)
    return live(twin)


@pytest.mark.parametrize("example", ["quickstart", "fan-out", "large"])
def test_same_results_as_the_local_executor(grit, cluster, tmp_path, example):
    manifest = {"quickstart": (EXAMPLES / "quickstart.toml").read_text(), "fan-out": FAN_OUT,
                "large": LARGE}[example]
    grit.write(manifest)
    proc = on_slurm(grit, cluster, "-verbose")
    assert "slurm: job " in proc.stderr and "0 failed" in proc.stderr
    assert live(grit) == local_twin(tmp_path, manifest)
    if example == "fan-out":  # rewriting one name in a loop: 8 resources, as locally
        assert grit.count("item") == 8
    # what each task used, measured on its node (-trace's TSV)
    header, *rows = [line.split("\t") for line in grit(
        "-db", str(grit.db), "-trace", check=0).stdout.splitlines()]
    rows = [dict(zip(header, row)) for row in rows]
    assert rows and {r["node"] for r in rows} <= {"grit-node1", "grit-node2"}
    assert all(r["cpu_user"] != "-" and r["status"] == "done" for r in rows)
    if example == "large":  # big and double, as read-only files; nothing damaged
        assert len(os.listdir(grit.db / "files")) == 2
        assert "0 problem(s)" in grit("-db", str(grit.db), "-verify").stderr
    assert not (grit.path / "grit-work").exists() or not any(
        (grit.path / "grit-work").glob("*/jobs/*"))  # job folders go once the run is done
    assert "0 task(s) run" in on_slurm(grit, cluster).stderr  # nothing twice


def test_a_failing_script_fails_its_task_with_exit_status_and_stderr(grit, cluster):
    grit.write('''
        [[step]]
        name = "seed"
        script = "echo a > $OUTPUT_DIR/a; echo b > $OUTPUT_DIR/b"
        [[step]]
        name = "check"
        inputs = ["a", "b"]
        script = """
        if [ "$GRIT_INPUT_NAME" = b ]; then echo "checking b" >&2; echo "b is bad" >&2; exit 3; fi
        cp $INPUT_FILE $OUTPUT_DIR/ok
        """
    ''')
    proc = on_slurm(grit, cluster, check=1)
    assert "exit status 3: b is bad" in proc.stderr
    [failed] = grit.status()["failed_tasks"]
    assert failed["exit_code"] == 3 and failed["error"] == "exit status 3: b is bad"
    log = grit.log(failed["task"])
    assert log["stderr"] == "checking b\nb is bad\n"
    assert grit.contents("ok") == [b"a\n"]


def test_an_impossible_cpus_fails_the_task_and_leaves_no_job(grit, cluster):
    grit.write('''
        [[step]]
        name = "seed"
        cpus = 64
        script = "echo a > $OUTPUT_DIR/a"
    ''')
    proc = on_slurm(grit, cluster, check=1, timeout=120)
    [failed] = grit.status()["failed_tasks"]
    assert "Slurm cannot run job" in failed["error"] or "sbatch failed" in failed["error"], \
        failed["error"]
    assert "1 failed" in proc.stderr
    assert our_jobs(cluster, grit) == ""


def test_a_task_over_its_time_limit_fails_with_slurm_timeout(grit, cluster):
    grit.write('''
        [[step]]
        name = "slow"
        time = 1
        script = "sleep 600; echo never > $OUTPUT_DIR/x"
    ''')  # time = 1 s: Slurm's least time limit, one minute
    proc = on_slurm(grit, cluster, check=1, timeout=300)
    [failed] = grit.status()["failed_tasks"]
    assert "ended TIMEOUT" in failed["error"], failed["error"]
    assert "1 failed" in proc.stderr and our_jobs(cluster, grit) == ""


def test_ctrl_c_cancels_the_jobs_and_leaves_the_tasks_pending(grit, cluster, tmp_path):
    marker = f"sleep 300.{os.getpid()}"  # a sleep of this test's own
    grit.write(f'''
        [[step]]
        name = "seed"
        script = "for i in 1 2 3 4 5 6; do echo $i > $OUTPUT_DIR/n-$i; done"
        [[step]]
        name = "wait"
        inputs = ["n-*"]
        batch = 2
        script = "touch {tmp_path}/started-$GRIT_TASK_ID; {marker}"
    ''')
    # grit itself asks squeue once a minute here: -status asks it for the present
    proc = popen_on_slurm(grit, cluster, "-verbose", env={"GRIT_SLURM_POLL": "60"})
    assert wait_for(lambda: len(list(tmp_path.glob("started-*"))) >= 3, 60)
    env = {"SLURM_CONF": cluster["SLURM_CONF"]}
    status = grit("-db", str(grit.db), "-status", env=env).stdout
    [job] = [line for line in status.splitlines() if line.startswith("slurm job")]  # not seed's
    assert ": wait, 6 task(s) in 3 element(s), 0 result(s) written: 0 queued, 3 running now" \
        in job, status
    away = grit("-db", str(grit.db), "-status", env=dict(env, PATH="/nonexistent")).stdout
    assert "3 element(s), 0 result(s) written: 0 queued, 0 running at submission, " in away \
        and "(squeue: squeue is not on PATH)" in away, away  # how old its figures are
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 130, stderr
    assert len(re.findall(r"queued task \d+ wait", stderr)) == 6  # at submission
    starts = re.findall(r"start task \d+ wait on grit-node\d \(Slurm job \d+_(\d)\)", stderr)
    assert set(starts[:3]) == {"0", "1", "2"}, stderr  # as each element's worker started one
    assert our_jobs(cluster, grit) == ""
    assert wait_for(lambda: subprocess.run(["pgrep", "-f", marker]).returncode == 1, 20)
    tasks = grit.tasks("wait")
    assert tasks["done"] == 0 and tasks["pending"] == 6
    assert grit.status()["slurm_jobs"] == []


# Eight tasks in four elements of two: two elements on each node at once.
ON_TWO_NODES = '''
    [[step]]
    name = "seed"
    script = "for i in 1 2 3 4 5 6 7 8; do echo $i > $OUTPUT_DIR/n-$i; done"
    [[step]]
    name = "work"
    inputs = ["n-*"]
    batch = 2
    script = """
    echo "$GRIT_TASK_ID $SLURMD_NODENAME" >> {ran}
    {wait}
    rev $INPUT_FILE > $OUTPUT_DIR/r-$GRIT_INPUT_NAME
    """
'''


def test_kill_9_of_the_coordinator_then_rerun_runs_no_task_twice(grit, cluster, tmp_path):
    ran = tmp_path / "ran.log"
    grit.write(ON_TWO_NODES.format(ran=ran, wait="sleep 2"))
    proc = popen_on_slurm(grit, cluster)
    assert wait_for(lambda: ran.exists() and ran.read_text().strip(), 60)
    proc.kill()  # kill -9: the jobs go on without it
    proc.wait(timeout=10)
    jobs = grit.status()["slurm_jobs"]
    assert jobs and all(j["slurm_id"] for j in jobs)  # the database knows them
    proc = on_slurm(grit, cluster)
    assert "adopted" in proc.stderr
    ids = [line.split()[0] for line in ran.read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 8  # each task ran exactly once
    assert grit.tasks("work")["done"] == 8 and grit.count("r-*") == 8
    # The cluster's own record: the killed run's job ran to completion, and no
    # element of any job ran more than the 4 that 8 tasks in chunks of 2 need.
    log = (cluster["folder"] / "jobcomp.log").read_text()
    first = [line for line in log.splitlines() if f"ArrayJobId={jobs[-1]['slurm_id']} " in line]
    assert first and all("JobState=COMPLETED" in line for line in first)
    assert live(grit) == local_twin(tmp_path, ON_TWO_NODES.format(ran=os.devnull, wait=""))


def test_jobs_purged_from_squeue_before_a_look_still_deliver(grit, cluster):
    # MinJobAge is 2 s on the test cluster and squeue is looked at only every 60 s
    # here: the records alone carry the results.
    grit.write(FAN_OUT)
    proc = on_slurm(grit, cluster, "-work-dir", "shared", env={"GRIT_SLURM_POLL": "60"})
    assert "0 failed" in proc.stderr and grit.count("total") == 1
    [work] = (grit.path / "shared").iterdir()  # -work-dir: this database's folder in it
    assert list((work / "jobs").iterdir()) == []


def test_a_node_without_fuse_uses_plain_directories_and_says_so(grit, cluster, tmp_path):
    grit.write(FAN_OUT)
    # What the array elements inherit makes libfuse unloadable on the node.
    proc = on_slurm(grit, cluster, env={"FUSE_LIBRARY_PATH": "/nonexistent/libfuse3.so.3"})
    assert "FUSE is not available" in proc.stderr and "using plain output" in proc.stderr
    assert live(grit) == local_twin(tmp_path, FAN_OUT, mode="dir")
    assert grit.count("item") == 1  # dir mode sees only a rewritten name's last content


def test_dry_run_shows_the_array_jobs_it_would_submit(grit, cluster):
    grit.write(FAN_OUT.replace('name = "upper"', 'name = "upper"\n    batch = 3\n    mem = "200M"'))
    on_slurm(grit, cluster, "-step", "seed")
    proc = on_slurm(grit, cluster, "-dry-run", "-json")
    [upper] = [s for s in json.loads(proc.stdout)["steps"] if s["name"] == "upper"]
    assert upper["slurm_job"] == {"elements": 3, "batch": 3,
                                  "sbatch": ["--cpus-per-task=1", "--mem=200M"]}
    text = on_slurm(grit, cluster, "-dry-run").stdout
    assert "upper: an array job of 3 element(s) of up to 3 task(s)" in text


def test_sbatch_is_retried_while_the_controller_is_down(grit, cluster):
    conf = cluster["SLURM_CONF"]
    grit.write('[[step]]\nname = "seed"\nscript = "echo a > $OUTPUT_DIR/a"\n')
    pid = int((cluster["folder"] / "slurmctld.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: subprocess.run(["kill", "-0", str(pid)],
                                           capture_output=True).returncode != 0, 30)
    try:
        proc = popen_on_slurm(grit, cluster, "-verbose", "-parallel", "2")  # no sinfo first
        time.sleep(11)  # sbatch gives up after ~9 s: grit's first try fails, its next succeeds
    finally:
        subprocess.run(["slurmctld", "-f", conf], env=dict(os.environ, SLURM_CONF=conf),
                       check=True, timeout=60)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "Unable to contact slurm controller" in stderr and "trying again" in stderr
    assert grit.contents("a") == [b"a\n"]


def test_parallel_caps_the_elements_of_all_the_runs_jobs(grit, cluster, tmp_path):
    running = tmp_path / "running"
    running.mkdir()
    step = '''
        [[step]]
        name = "{name}"
        inputs = ["{inputs}"]
        batch = 1
        script = """
        touch {running}/$GRIT_TASK_ID; ls {running} | wc -l > $OUTPUT_DIR/seen-$GRIT_TASK_ID
        sleep 1; rm {running}/$GRIT_TASK_ID; cp $INPUT_FILE $OUTPUT_DIR/{name}-$GRIT_INPUT_NAME
        """
    '''
    grit.write('[[step]]\nname = "seed"\nscript = "for i in 1 2 3 4 5; do echo $i > '
               '$OUTPUT_DIR/n-$i; done"\n'
               + step.format(name="a", inputs="n-*", running=running)
               + step.format(name="b", inputs="a-*", running=running))
    on_slurm(grit, cluster, "-parallel", "2")  # the cluster has 4 CPUs: 4 would fit
    names = [n for n in grit.status()["resources"]["names"] if n.startswith("seen-")]
    seen = [int(c) for name in names for c in grit.contents(name)]
    assert len(seen) == 10 and max(seen) <= 2, seen


def scontrol(cluster, *args, check=True) -> None:
    subprocess.run(["scontrol", *args], env=dict(os.environ, SLURM_CONF=cluster["SLURM_CONF"]),
                   check=check, timeout=60, capture_output=True)




def test_a_node_taken_down_mid_run_its_tasks_run_again_elsewhere(grit, cluster, tmp_path):
    ran, go = tmp_path / "ran.log", tmp_path / "go"
    manifest = ON_TWO_NODES.format(ran=ran, wait=f"while [ ! -e {go} ]; do sleep 0.1; done")
    grit.write(manifest)
    proc = popen_on_slurm(grit, cluster)
    try:
        assert wait_for(lambda: ran.exists() and "grit-node2" in ran.read_text(), 60)
        scontrol(cluster, "update", "nodename=grit-node2", "state=down", "reason=grit-test")
        go.touch()  # the tasks on node 1 finish; those on node 2 were killed with it
        _, stderr = proc.communicate(timeout=120)  # far less than Slurm's requeue delay
    finally:
        proc.kill()
        # back in service (ReturnToService=2 may have done it: then this fails)
        scontrol(cluster, "update", "nodename=grit-node2", "state=resume", check=False)
    assert proc.returncode == 0, stderr
    lost = [line for line in stderr.splitlines() if "run again in a new job" in line]
    assert lost and all("ended REQUEUED" in line or "ended NODE_FAIL" in line for line in lost)
    tasks = grit.tasks("work")
    assert tasks == {"pending": 0, "done": 8, "failed": 0}, tasks
    runs = [line.split()[0] for line in ran.read_text().splitlines()]
    assert len(runs) > 8 and set(runs) == {str(t) for t in range(2, 10)}  # the lost ones again
    assert live(grit) == local_twin(tmp_path, ON_TWO_NODES.format(ran=os.devnull, wait=""))


def test_an_element_cancelled_from_outside_fails_its_tasks_in_one_line(grit, cluster, tmp_path):
    ran, go = tmp_path / "ran.log", tmp_path / "go"
    grit.write(ON_TWO_NODES.format(ran=ran, wait=f"while [ ! -e {go} ]; do sleep 0.1; done"))
    proc = popen_on_slurm(grit, cluster)
    try:
        assert wait_for(lambda: ran.exists() and len(ran.read_text().splitlines()) == 4, 60)
        [job] = [j["slurm_id"] for j in grit.status()["slurm_jobs"] if j["step"] == "work"]
        subprocess.run(["scancel", f"{job}_1"], env=dict(os.environ, SLURM_CONF=cluster[
            "SLURM_CONF"]), check=True, timeout=60)
        assert wait_for(lambda: f"{job}_1 " not in squeue(cluster, "-o", "%i "), 60)
        go.touch()
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("grit: error:")]
    assert len(errors) == 2 and "9 task(s) run, 2 failed" in errors[1], errors  # and the summary
    assert errors[0].startswith(f"grit: error: Slurm job {job}_1 ended CANCELLED: its 2 task(s) "
                                "failed: "), errors[0]
    assert "CANCELLED" in errors[0].split("failed: ", 1)[1]  # the element's own last line
    failed = grit.status()["failed_tasks"]
    assert len(failed) == 2 and grit.tasks("work")["done"] == 6
    for task in failed:  # each task's log carries the reason
        assert f"Slurm job {job}_1 ended CANCELLED" in grit.log(task["task"])["error"]


def test_a_local_run_after_a_killed_slurm_run_cancels_its_jobs_and_takes_their_results(
        grit, cluster, tmp_path):
    ran = tmp_path / "ran.log"
    # a lock held while the script runs (freed when it is killed): two at once say so
    grit.write(ON_TWO_NODES.format(ran=ran, wait=f"exec 9> {tmp_path}/lock-$GRIT_TASK_ID; "
                                                 f'flock -n 9 || echo "twice at once" >> {ran}; '
                                                 "sleep 2"))
    proc = popen_on_slurm(grit, cluster)
    assert wait_for(lambda: results_written(grit, "work") >= 2, 60)
    proc.kill()  # kill -9: the elements go on without it
    proc.wait(timeout=10)
    committed = grit.tasks("work")["done"]  # by the killed run
    local = grit.run("-parallel", "2", env={"SLURM_CONF": cluster["SLURM_CONF"]})
    [line] = [x for x in local.stderr.splitlines() if "earlier -executor slurm run" in x]
    took, here = (int(x) for x in re.findall(r"took in (\d+) finished task\(s\), cancelled "
                                               r"the rest; (\d+) of their task\(s\) run here",
                                               line)[0])
    assert committed + took >= 2 and committed + took + here == 8, (committed, line)
    assert our_jobs(cluster, grit) == "" and grit.status()["slurm_jobs"] == []
    events = ran.read_text().splitlines()
    assert "twice at once" not in events, events
    ran_here = {e.split()[0] for e in events if len(e.split()) == 1}  # no $SLURMD_NODENAME
    assert len(ran_here) == here, events  # what Slurm finished did not run again
    assert grit.tasks("work") == {"pending": 0, "done": 8, "failed": 0}
    assert live(grit) == local_twin(tmp_path, ON_TWO_NODES.format(ran=os.devnull, wait=""))


def test_a_local_run_runs_again_what_failed_in_the_slurm_jobs_it_cancels(grit, cluster, tmp_path):
    """A failure an element wrote before its job was cancelled may be the cancel's
    doing (a script whose scratch space went first): the local run that cancels
    the jobs runs that task again instead of taking the failure in."""
    ran, fail = tmp_path / "ran.log", tmp_path / "fail"
    grit.write(f'''
        [[step]]
        name = "seed"
        script = "echo 1 > $OUTPUT_DIR/n-1; echo 2 > $OUTPUT_DIR/n-2"
        [[step]]
        name = "work"
        inputs = ["n-*"]
        script = """
        echo "$GRIT_INPUT_NAME ${{SLURMD_NODENAME:-here}}" >> {ran}
        if [ -n "$SLURMD_NODENAME" ]; then
            [ "$GRIT_INPUT_NAME" = n-2 ] && sleep 600
            while [ ! -e {fail} ]; do sleep 0.1; done
            exit 3
        fi
        rev $INPUT_FILE > $OUTPUT_DIR/r-$GRIT_INPUT_NAME
        """
    ''')
    proc = popen_on_slurm(grit, cluster)
    try:
        assert wait_for(lambda: ran.exists() and len(ran.read_text().splitlines()) == 2, 60)
        proc.send_signal(signal.SIGSTOP)  # it takes in nothing more
        fail.touch()
        # n-1's failure written, beside the seed's result (a job may run tasks
        # of later steps handed to it)
        assert wait_for(lambda: sum(j.get("results", 0) for j in grit.status()["slurm_jobs"])
                        >= 2, 60)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert grit.tasks("work")["failed"] == 0  # written by the element, never committed
    local = grit.run("-parallel", "2", env={"SLURM_CONF": cluster["SLURM_CONF"]})
    assert "took in 0 finished task(s), cancelled the rest; 2 of their task(s) run here" \
        in local.stderr, local.stderr
    assert sorted(e for e in ran.read_text().splitlines() if e.endswith(" here")) == \
        ["n-1 here", "n-2 here"]
    assert grit.tasks("work") == {"pending": 0, "done": 2, "failed": 0}
    assert our_jobs(cluster, grit) == ""


def test_a_failed_task_runs_again_on_slurm_with_the_resources_of_its_attempt(grit, cluster):
    grit.write('''
        [[step]]
        name = "seed"
        retries = 1
        cpus = [1, 2]
        script = """
        echo "try $GRIT_ATTEMPT with $SLURM_CPUS_PER_TASK CPU(s)" >&2
        [ "$GRIT_ATTEMPT" = 2 ] || exit 7
        echo ok > $OUTPUT_DIR/x
        """
    ''')
    proc = on_slurm(grit, cluster)
    assert "attempt 1 of 2: exit status 7: try 1 with 1 CPU(s); trying again" in proc.stderr
    log = grit.log(1)
    assert log["stderr"] == "try 2 with 2 CPU(s)\n" and log["status"] == "done"
    assert [a["stderr"] for a in log["attempts"]] == ["try 1 with 1 CPU(s)\n"]


def test_an_element_slurm_starts_again_runs_only_its_tasks_without_a_result(
        grit, cluster, tmp_path):
    ran, go = tmp_path / "ran.log", tmp_path / "go"
    # The first task an element runs ends at once, its second waits for go.
    first = f"{tmp_path}/first-$SLURM_ARRAY_JOB_ID-$SLURM_ARRAY_TASK_ID"
    grit.write(ON_TWO_NODES.format(ran=ran, wait=f'mkdir {first} 2>/dev/null || '
                                                  f'while [ ! -e {go} ]; do sleep 0.1; done'))
    proc = popen_on_slurm(grit, cluster)
    assert wait_for(lambda: ran.exists() and len(ran.read_text().splitlines()) == 8, 60)
    [job] = [j for j in grit.status()["slurm_jobs"] if j["step"] == "work"]
    assert wait_for(lambda: results_written(grit, "work") == 4, 30)
    proc.kill()  # kill -9: nothing of grit's steps in while Slurm starts the element again
    proc.wait(timeout=10)
    element = f"{job['slurm_id']}_0"
    scontrol(cluster, "requeue", element)

    def started_again() -> bool:  # now, not in Slurm's 2 minutes (asked until it takes)
        scontrol(cluster, "update", f"jobid={element}", "StartTime=now", check=False)
        return wait_for(lambda: len(ran.read_text().splitlines()) == 9, 1)  # its second task
    assert wait_for(started_again, 120)
    go.touch()
    on_slurm(grit, cluster)
    runs = collections.Counter(line.split()[0] for line in ran.read_text().splitlines())
    assert sorted(runs.values()) == [1] * 7 + [2], runs  # only the one without a result again
    assert grit.tasks("work") == {"pending": 0, "done": 8, "failed": 0}
    assert live(grit) == local_twin(tmp_path, ON_TWO_NODES.format(ran=os.devnull, wait=""))


def results_written(grit, step: str) -> int:
    """The results the step's Slurm jobs wrote into the work dir, as -status says
    (0 while the run has not made its database yet)."""
    status = grit("-db", str(grit.db), "-status", "-json", check=None)
    return 0 if status.returncode else sum(job.get("results", 0) for job in json.loads(
        status.stdout)["slurm_jobs"] if job["step"] == step)


SHARE_SCRIPT = str(Path(SLURM_SCRIPT).with_name("sshfs-share.sh"))


@pytest.fixture(scope="module")
def shared_work(tmp_path_factory):
    """A work dir on a network filesystem that caches listings (tests/sshfs-share.sh):
    the coordinator's mount serves the same listing for an hour, and a cluster of
    its own whose nodes see the folder through a mount of their own."""
    require_slurm()
    missing = [c for c in ("sshd", "sshfs", "unshare", "nsenter")
               if not shutil.which(c, path=os.environ["PATH"] + ":/usr/sbin")]
    if missing:
        if os.environ.get("GRIT_REQUIRE_SLURM") == "1":
            pytest.fail(f"{missing} are missing (tests/bootstrap.sh installs them)")
        pytest.skip(f"{', '.join(missing)} missing (tests/bootstrap.sh installs them as root)")
    share, nodes = tmp_path_factory.mktemp("share"), tmp_path_factory.mktemp("slurm-share")
    try:
        started = subprocess.run([SHARE_SCRIPT, "start", str(share)], capture_output=True,
                                 text=True, timeout=120,
                                 env=dict(os.environ, GRIT_SSHFS_OPTIONS="dcache_timeout=3600"))
        assert started.returncode == 0, started.stderr
        cluster = subprocess.run([SLURM_SCRIPT, "start", str(nodes), "2"], capture_output=True,
                                 text=True, timeout=120,
                                 env=dict(os.environ, GRIT_SLURM_MIN_JOB_AGE="2",
                                          GRIT_SLURMD_NAMESPACE=started.stdout.strip()))
        assert cluster.returncode == 0, cluster.stderr
        yield {"SLURM_CONF": cluster.stdout.strip(), "work": share / "work", "folder": nodes}
    finally:
        subprocess.run([SLURM_SCRIPT, "stop", str(nodes)], timeout=120)
        subprocess.run([SHARE_SCRIPT, "stop", str(share)], timeout=120)


def test_results_arrive_through_a_work_dir_whose_listings_lag(grit, shared_work, tmp_path):
    """The records/ listing the coordinator sees never changes during the run:
    it finds each element's records by name."""
    grit.write(FAN_OUT)
    proc = on_slurm(grit, shared_work, "-work-dir", str(shared_work["work"]))
    assert "0 failed" in proc.stderr, proc.stderr
    assert live(grit) == local_twin(tmp_path, FAN_OUT)


def test_tasks_go_to_elements_that_already_run_rather_than_a_new_job(grit, cluster, tmp_path):
    """An element done with its chunk waits a moment for more, and while -parallel
    has no free slot busy elements take further tasks: a step's start-up is paid once."""
    manifest = '''
        [[step]]
        name = "seed"
        script = "for i in $(seq 1 40); do echo $i > $OUTPUT_DIR/n-$i; done"
        [[step]]
        name = "upper"
        inputs = ["n-*"]
        script = "sleep 0.1; tr 0-9 a-j < $INPUT_FILE > $OUTPUT_DIR/u-$GRIT_INPUT_NAME"
        [[step]]
        name = "reverse"
        inputs = ["u-*"]
        script = "rev $INPUT_FILE > $OUTPUT_DIR/r-$GRIT_INPUT_NAME"
    '''
    grit.write(manifest)
    proc = on_slurm(grit, cluster, "-parallel", "2", "-verbose")
    handed = re.findall(r"slurm: job \d+_\d takes (\d+) more task\(s\) of (\w+)", proc.stderr)
    assert sum(int(n) for n, step in handed if step == "reverse") > 0, proc.stderr
    assert grit.tasks("reverse") == {"pending": 0, "done": 40, "failed": 0}
    assert live(grit) == local_twin(tmp_path, manifest)


def test_watch_runs_each_round_on_slurm(grit, cluster):
    import hashlib
    data = grit.path / "data"
    data.mkdir()
    (data / "a.txt").write_text("alpha\n")
    grit.write('[[step]]\nname = "src"\nfiles = ["data/*.txt"]\n'
               '[[step]]\nname = "up"\ninputs = ["*.txt"]\n'
               'script = \'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/up"\'\n')
    proc = popen_on_slurm(grit, cluster, "-watch")
    try:
        def up_is(text: str) -> bool:
            digest = hashlib.sha256(text.encode()).hexdigest()
            return (digest, "up") in {tuple(line.split("\t")[:2]) for line in grit(
                "-db", str(grit.db), "-export", "up", "-live", check=None).stdout.splitlines()}
        assert wait_for(lambda: up_is("ALPHA\n"), 120)
        (data / "a.txt").write_text("beta\n")
        assert wait_for(lambda: up_is("BETA\n"), 120)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    runs = json.loads(grit("-db", str(grit.db), "-runs", "-json", check=0).stdout)
    assert len(runs) >= 2 and {r["executor"] for r in runs} == {"slurm"}
    header, *rows = [line.split("\t") for line in grit(  # the first round ran on the nodes
        "-db", str(grit.db), "-trace", "-run", str(runs[-1]["id"]), check=0).stdout.splitlines()]
    assert {dict(zip(header, row))["node"] for row in rows} <= {"grit-node1", "grit-node2"}

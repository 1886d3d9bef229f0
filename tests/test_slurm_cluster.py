"""The two-node Slurm cluster the Slurm tests run against (tests/slurm-cluster.sh):
real munged, slurmctld and a slurmd per node, started in a temp folder and stopped by pid."""
import os
import subprocess

from conftest import SLURM_SCRIPT as SCRIPT, require_slurm, wait_for


def slurm(cluster, *argv) -> str:
    env = dict(os.environ, SLURM_CONF=cluster["SLURM_CONF"])
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=True,
                          timeout=60).stdout


def test_an_array_job_runs_on_both_nodes_and_leaves_a_completion_record(cluster, tmp_path):
    job = slurm(cluster, "sbatch", "--parsable", "--array=0-2", "-o", f"{tmp_path}/out-%a",
                "--cpus-per-task=2", "--wrap",
                "echo element $SLURM_ARRAY_TASK_ID on $SLURMD_NODENAME").strip()
    assert wait_for(lambda: all((tmp_path / f"out-{i}").exists() and
                                (tmp_path / f"out-{i}").read_text() for i in range(3)), 60)
    said = [(tmp_path / f"out-{i}").read_text().split() for i in range(3)]
    assert [s[:2] for s in said] == [["element", str(i)] for i in range(3)]
    assert {s[3] for s in said} == {"grit-node1", "grit-node2"}  # a whole node each
    log = cluster["folder"] / "jobcomp.log"
    assert wait_for(lambda: log.exists() and log.read_text().count(
        f"ArrayJobId={job} ") == 3, 60)
    assert log.read_text().count("JobState=COMPLETED") >= 3
    # MinJobAge=2: the finished job leaves squeue
    assert wait_for(lambda: job not in slurm(cluster, "squeue", "-h", "-t", "all", "-o", "%F"), 60)


def test_start_is_idempotent_and_stop_leaves_no_daemon(tmp_path):
    require_slurm()
    folder = tmp_path / "cluster"
    try:
        first = subprocess.run([SCRIPT, "start", str(folder), "2"], capture_output=True,
                               text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        pids = {d: int((folder / f"{d}.pid").read_text()) for d in (
            "munged", "slurmctld", "slurmd-grit-node1", "slurmd-grit-node2")}
        nodes = slurm({"SLURM_CONF": first.stdout.strip()}, "sinfo", "-h", "-N", "-o", "%N %c %t")
        assert nodes.split("\n")[:2] == ["grit-node1 2 idle", "grit-node2 2 idle"], nodes
        again = subprocess.run([SCRIPT, "start", str(folder), "2"], capture_output=True,
                               text=True, timeout=120)
        assert again.returncode == 0 and again.stdout == first.stdout
        assert {d: int((folder / f"{d}.pid").read_text()) for d in pids} == pids  # same daemons
    finally:
        subprocess.run([SCRIPT, "stop", str(folder)], timeout=120)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie not yet reaped is gone too
            return f.read().split(") ")[1].startswith("Z")

    assert wait_for(lambda: all(gone(pid) for pid in pids.values()), 30)

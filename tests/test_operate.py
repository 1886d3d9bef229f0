"""Operating a database: -status, -log, -lineage, -dry-run, -delete, -prune,
-gc compaction, -export-tar and the progress view, end to end."""
import io
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from conftest import GRIT, wait_for

PIPELINE = '''
[[step]]
name = "seed"
script = """
for i in 1 2 3; do echo "item $i" > $OUTPUT_DIR/in-$i; done
echo seeded; echo "a warning" >&2
"""
[[step]]
name = "upper"
inputs = ["in-*"]
script = """
[ "$GRIT_INPUT_NAME" != "in-3" ] || [ -e {ok} ] || {{ echo "bad input three" >&2; exit 3; }}
tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/upper"
"""
[[step]]
name = "rev"
inputs = ["upper"]
script = 'rev "$INPUT_FILE" > "$OUTPUT_DIR/rev"'
'''

SLOW_FANOUT = '''
[[step]]
name = "seed"
script = "for i in $(seq 1 40); do echo $i > $OUTPUT_DIR/n-$i; done"
[[step]]
name = "slow"
inputs = ["n-*"]
parallel = 2
script = "sleep 0.1; cat $INPUT_FILE > $OUTPUT_DIR/out"
'''


def cmd(grit, *args, check=0):
    return grit("-db", str(grit.db), *args, check=check)


def as_json(grit, *args):
    return json.loads(cmd(grit, *args, "-json").stdout)


def pipeline(grit, tmp_path, succeed=False):
    grit.write(PIPELINE.format(ok=tmp_path / "ok"))
    if succeed:
        (tmp_path / "ok").touch()
    return grit.run(check=None)


def test_status_per_step_version_with_json(grit, tmp_path):
    assert pipeline(grit, tmp_path).returncode == 1      # in-3 fails in upper
    grit.write(PIPELINE.format(ok=tmp_path / "ok").replace("rev \"", "rev -- \""))
    (tmp_path / "ok").touch()
    grit.run()                                           # rev v2; upper's failure retried
    data = as_json(grit, "-status")
    steps = {(s["name"], s["version"]): s for s in data["steps"]}
    assert steps[("seed", 1)]["tasks"] == {"pending": 0, "done": 1, "failed": 0}
    assert steps[("upper", 1)]["tasks"] == {"pending": 0, "done": 3, "failed": 0}
    assert steps[("rev", 1)]["tasks"]["done"] == 2 and not steps[("rev", 1)]["latest"]
    assert steps[("rev", 2)]["tasks"]["done"] == 3 and steps[("rev", 2)]["latest"]
    assert data["resources"]["names"] == {"in-1": 1, "in-2": 1, "in-3": 1, "upper": 3, "rev": 3}
    assert data["resources"]["count"] == 9 and data["resources"]["deleted"] == 0
    assert data["run_in_progress"] is None
    assert data["size_bytes"]["metadata"] > 0 and data["size_bytes"]["objects"] > 0
    text = cmd(grit, "-status").stdout.splitlines()
    assert text[0].startswith(f"database {grit.db}:") and "no run in progress" in text[0]
    assert text[1].split() == ["step", "version", "pending", "done", "failed"]
    assert "rev v1 (old) 0 2 0" in [" ".join(line.split()) for line in text]
    assert "resources: 9 in 5 name(s), 9 live, 0 deleted; 9 object(s)" in "\n".join(text)


def done_tasks(grit):
    """Tasks done so far, by -status -json (0 until the database exists)."""
    proc = grit("-db", str(grit.db), "-status", "-json")
    return sum(s["tasks"]["done"] for s in json.loads(proc.stdout)["steps"]) \
        if proc.returncode == 0 else 0


def test_status_and_dry_run_during_and_after_an_interrupted_run(grit, tmp_path):
    grit.write(SLOW_FANOUT)
    proc = grit.popen()
    try:
        assert wait_for(lambda: done_tasks(grit) >= 2)
        live = as_json(grit, "-status")
        assert live["run_in_progress"] == proc.pid
        assert "a run is in progress" in cmd(grit, "-status").stdout
    finally:
        proc.kill()
        proc.wait()
    after = as_json(grit, "-status")
    assert after["run_in_progress"] is None
    slow = [s for s in after["steps"] if s["name"] == "slow"][0]["tasks"]
    assert slow["pending"] > 0 and slow["pending"] + slow["done"] == 40
    plan = json.loads(grit.run("-dry-run", "-json").stdout)
    assert plan["steps"][1] == {"name": "slow", "version": 1, "new_version": False,
                                "tasks": slow["pending"],
                                "reasons": {"left_pending": slow["pending"]}}
    assert as_json(grit, "-status") == after             # the dry run wrote nothing
    grit.run()
    assert json.loads(grit.run("-dry-run", "-json").stdout)["tasks"] == 0


def test_dry_run_says_what_and_why_and_writes_nothing(grit, tmp_path):
    grit.write(PIPELINE.format(ok=tmp_path / "ok"))
    fresh = grit.run("-dry-run")
    assert not grit.db.exists()                          # not even created
    lines = [" ".join(line.split()) for line in fresh.stdout.splitlines()]
    assert lines[0] == "dry run: nothing is run or written"
    assert "seed v1 (new) 1 task(s): 1 new step" in lines
    assert "upper v1 (new) 0 task(s)" in lines
    grit.run(check=1)                                    # in-3 fails in upper
    (tmp_path / "inputs").mkdir()
    grit.write(PIPELINE.format(ok=tmp_path / "ok").replace("rev \"", "rev -- \""))
    before = grit.status()
    plan = json.loads(grit.run("-dry-run", "-json").stdout)
    steps = {s["name"]: s for s in plan["steps"]}
    assert steps["seed"]["tasks"] == 0
    assert steps["upper"]["reasons"] == {"retry_failed": 1}
    assert steps["rev"] == {"name": "rev", "version": 2, "new_version": True, "tasks": 2,
                            "reasons": {"new_step_version": 2}}
    assert plan["tasks"] == 3
    assert grit.status() == before  # the dry run wrote nothing
    only = json.loads(grit.run("-dry-run", "-json", "-step", "upper").stdout)
    assert [s["name"] for s in only["steps"]] == ["upper"]


def test_log_by_task_id_and_by_resource_hash(grit, tmp_path):
    pipeline(grit, tmp_path)
    seed = cmd(grit, "-log", "1").stdout
    assert seed.startswith("task 1: seed v1, done, exit status 0 in ")
    assert "input:  none (a seed task)" in seed
    assert "--- stdout (7 B) ---\nseeded\n--- stderr (10 B) ---\na warning\n" in seed
    failed_id = grit.status()["failed_tasks"][0]["task"]
    failed = as_json(grit, "-log", str(failed_id))
    assert failed["status"] == "failed" and failed["exit_code"] == 3
    assert failed["stderr"] == "bad input three\n" and "exit status 3" in failed["error"]
    assert failed["input"]["name"] == "in-3" and failed["outputs"] == []
    assert failed["step"] == "upper" and failed["version"] == 1
    assert set(failed) == {"task", "step", "version", "status", "exit_code", "error", "duration",
                           "started_at", "finished_at", "input", "outputs", "stdout", "stderr",
                           "attempts", "run_id", "cpu_user", "cpu_system", "peak_rss",
                           "rss_under", "node"}
    digest = grit.export("rev")[0][0]
    by_hash = as_json(grit, "-log", digest[:10])
    assert by_hash["step"] == "rev" and [o["hash"] for o in by_hash["outputs"]] == [digest]
    missing = cmd(grit, "-log", "999", check=1)
    assert missing.stderr.strip() == f"grit: error: no task 999 in {grit.db}"
    bad = cmd(grit, "-log", "xyz", check=2)
    assert "needs a SHA-256 hash or a prefix" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_lineage_back_to_the_seed_and_descendants(grit, tmp_path):
    pipeline(grit, tmp_path, succeed=True)
    final = grit.export("rev")[0][0]
    text = cmd(grit, "-lineage", final).stdout.splitlines()
    assert text[0].startswith(f"rev {final} (")
    assert text[1].strip().startswith("made by task") and "(rev v1) from" in text[1]
    assert text[2].strip().startswith("upper ")
    assert text[4].strip().startswith("in-")
    assert text[5].strip().endswith("(seed v1), a seed task")
    chain = as_json(grit, "-lineage", final)["lineage"][0]
    names = []
    node = chain
    while node:
        names.append(node["resource"]["name"])
        node = node["produced_by"]["input"]
    assert names[0] == "rev" and names[1] == "upper" and names[2].startswith("in-")
    source = grit.export("in-2")[0][0]
    down = as_json(grit, "-lineage", source, "-descendants")["lineage"][0]["consumed_by"]
    assert [(c["step"], c["status"]) for c in down] == [("upper", "done")]
    upper_out = down[0]["outputs"][0]
    assert upper_out["resource"]["name"] == "upper"
    assert upper_out["consumed_by"][0]["outputs"][0]["resource"]["name"] == "rev"
    assert "descendants:" in cmd(grit, "-lineage", source, "-descendants").stdout


def test_delete_keeps_records_frees_objects_and_revives_on_reproduction(grit, tmp_path):
    pipeline(grit, tmp_path, succeed=True)
    digest = grit.export("in-1")[0][0]
    objects_before = grit.status()["resources"]["objects"]
    dry = cmd(grit, "-delete", digest, "-dry-run")
    assert "would delete 1 resource(s), 1 object(s) (7 B); 2 resource(s) derived" in dry.stderr
    assert grit.has("in-1")
    done = cmd(grit, "-delete", digest)
    assert "deleted 1 resource(s), 1 object(s)" in done.stderr
    assert not grit.has("in-1")
    assert cmd(grit, "-export-hash", digest, check=1).returncode == 1
    assert "deleted" in cmd(grit, "-lineage", digest).stdout    # the record stays
    assert grit.has("upper") and len(grit.export("upper")) == 3  # derived data is kept
    assert "0 problem(s)" in cmd(grit, "-verify").stderr
    assert "0 task(s) run" in grit.run().stderr                   # nothing to redo
    # a new consumer version does not see the deleted resource
    grit.write(PIPELINE.format(ok=tmp_path / "ok").replace("tr a-z", ": v2; tr a-z"))
    assert "2 task(s) run" in grit.run().stderr
    # producing the same content again brings it back, with its bytes
    grit.write(PIPELINE.format(ok=tmp_path / "ok").replace("seeded", "seeded again"))
    grit.run()
    assert grit.contents("in-1") == [b"item 1\n"]
    assert grit.status()["resources"]["objects"] == objects_before
    # by name: every resource of it
    assert "deleted 3 resource(s)" in cmd(grit, "-delete", "rev").stderr
    assert not grit.has("rev")
    assert cmd(grit, "-delete", "nothing-here", check=1).stderr.startswith("grit: error: no ")


def test_prune_keeps_the_newest(grit):
    for i in range(1, 5):
        grit.write(f'[[step]]\nname = "s"\nscript = "echo {i} > $OUTPUT_DIR/model"\n')
        grit.run()
    assert cmd(grit, "-prune", "model", check=2).stderr.startswith("grit: error: -prune NAME needs")
    dry = cmd(grit, "-prune", "model", "-keep", "1", "-dry-run")
    assert "would delete 3 resource(s)" in dry.stderr and len(grit.export("model")) == 4
    cmd(grit, "-prune", "model", "-keep", "1")
    assert grit.contents("model") == [b"4\n"]
    assert "deleted 0 resource(s)" in cmd(grit, "-prune", "model", "-keep", "1").stderr


def test_gc_compacts_the_object_store_and_survives_a_crash_mid_swap(grit):
    grit.write('''
        [[step]]
        name = "s"
        script = "for i in 1 2 3 4 5 6 7 8; do head -c 1000000 /dev/urandom > $OUTPUT_DIR/big-$i; done; echo small > $OUTPUT_DIR/small"
    ''')  # objects under 1 MiB: in LMDB
    grit.run()
    data = grit.db / "objects" / "data.mdb"
    before = data.stat().st_size
    for i in range(1, 9):
        cmd(grit, "-delete", f"big-{i}")
    gc = cmd(grit, "-gc")
    assert "compacted from" in gc.stderr
    assert data.stat().st_size < before / 4
    assert oct(data.stat().st_mode & 0o777) == "0o600"
    assert grit.contents("small") == [b"small\n"]
    assert "0 problem(s)" in cmd(grit, "-verify").stderr
    assert "not compacted" in cmd(grit, "-gc").stderr        # nothing left to gain
    # a -gc killed between its two renames: the next lock holder finishes the swap
    objects = grit.db / "objects"
    shutil.copytree(objects, grit.db / "objects.compact")
    objects.rename(grit.db / "objects.old")
    grit.run()
    assert objects.exists() and not (grit.db / "objects.old").exists()
    assert grit.contents("small") == [b"small\n"]
    # killed while copying: the partial copy is dropped
    (grit.db / "objects.compact").mkdir()
    (grit.db / "objects.compact" / "data.mdb").write_bytes(b"partial")
    cmd(grit, "-gc")
    assert not (grit.db / "objects.compact").exists()
    assert "0 problem(s)" in cmd(grit, "-verify").stderr


def test_export_tar_every_version_or_the_newest(grit, tmp_path):
    for i in (1, 2):
        grit.write(f'''
            [[step]]
            name = "s"
            script = "echo v{i} > $OUTPUT_DIR/model; mkdir $OUTPUT_DIR/d; echo x > $OUTPUT_DIR/d/f"
        ''')
        grit.run()
    cmd(grit, "-export-tar", "model", str(tmp_path / "all.tar"), "-all")
    with tarfile.open(tmp_path / "all.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members == {f"model/{h}": grit.content(h) for h, _, _ in grit.export("model")}
    assert sorted(members.values()) == [b"v1\n", b"v2\n"]
    cmd(grit, "-export-tar", "model", str(tmp_path / "live.tar"))  # live only, by default
    with tarfile.open(tmp_path / "live.tar") as tar:
        assert [tar.extractfile(m).read() for m in tar.getmembers()] == [b"v2\n"]
    out = subprocess.run([sys.executable, GRIT, "-db", str(grit.db), "-export-tar", "*", "-",
                          "-newest"], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        newest = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert newest == {"d/f": b"x\n", "model": b"v2\n"}
    bad = cmd(grit, "-export-tar", "model", str(tmp_path / "no" / "such" / "x.tar"), check=2)
    assert bad.stderr.startswith("grit: error: cannot write") and len(bad.stderr.splitlines()) == 1
    assert not (tmp_path / "no").exists()
    assert cmd(grit, "-export-tar", "nope-*", "-", check=1).stderr.startswith("grit: error: no")


def test_a_reader_that_stops_early_is_not_an_error(grit):
    """`grit … | head`: grit stops writing quietly, exit 0, as for -export-hash."""
    grit.write('[[step]]\nname = "s"\nscript = "seq 1 3000000 > $OUTPUT_DIR/nums"\n')
    grit.run()
    [(digest, _, _)] = grit.export("nums")
    for command in (["-export-hash", digest], ["-export-tar", "nums", "-"]):
        proc = subprocess.Popen([sys.executable, GRIT, "-db", str(grit.db), *command],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert len(proc.stdout.read(100)) == 100
        proc.stdout.close()  # like head -c 100
        assert proc.wait(timeout=60) == 0 and proc.stderr.read() == b"", command


def test_options_that_need_another_command_say_so(grit, tmp_path):
    pipeline(grit, tmp_path, succeed=True)
    for args, message in [(["-export", "rev", "-json"], "-json goes with -run or -status"),
                          (["-status", "-keep", "2"], "-keep goes with -prune"),
                          (["-status", "-gc"], "give exactly one of"),
                          (["-lineage", "abc"], "needs a SHA-256 hash")]:
        proc = cmd(grit, *args, check=2)
        assert message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert grit.run("-json", check=2).stderr.startswith("grit: error: -json goes with -run only")


# What each schema version added, newest first: undone, they turn today's
# database into an older grit's.
UNDO_SCHEMA = {  # newest first
    10: ["DROP TABLE run"]
    + [f"ALTER TABLE {table} DROP COLUMN {column}" for table in ("task", "attempt")
       for column in ("run_id", "cpu_user", "cpu_system", "peak_rss", "rss_under", "node")],
    9: ["DROP INDEX attempt_task", "DROP TABLE attempt",
        "ALTER TABLE slurm_job DROP COLUMN looked_at"],
    8: [],  # large objects as files: nothing in SQLite
    7: [],  # the object store's second header form: nothing in SQLite
    6: ["DROP TABLE slurm_job"],
    5: ["DROP INDEX gathered_resource", "DROP TABLE gathered", "DROP INDEX task_gather",
        "DROP INDEX task_seed",
        "CREATE UNIQUE INDEX task_seed ON task(step_id, run) WHERE input_resource_id IS NULL",
        "ALTER TABLE task DROP COLUMN input_set", "ALTER TABLE step DROP COLUMN gather"],
    4: ["DROP INDEX resource_live", "DROP INDEX task_input", "DROP INDEX task_seed",
        "CREATE UNIQUE INDEX task_seed ON task(step_id) WHERE input_resource_id IS NULL",
        "DROP TABLE emission", "DROP TABLE source_file",
        "ALTER TABLE step DROP COLUMN files", "ALTER TABLE step DROP COLUMN current",
        "ALTER TABLE resource DROP COLUMN live", "ALTER TABLE task DROP COLUMN run",
        "ALTER TABLE task DROP COLUMN live",
        "ALTER TABLE step ADD COLUMN scanned_resource_id INTEGER NOT NULL DEFAULT 0"],
    3: ["ALTER TABLE task DROP COLUMN passes"],
    2: ["ALTER TABLE resource DROP COLUMN deleted_at"],
}


@pytest.mark.parametrize("old", [1, 2, 3, 4, 5, 6, 7, 8, 9])
def test_an_old_database_is_upgraded_in_place(grit, tmp_path, old):
    pipeline(grit, tmp_path, succeed=True)
    import sqlite3
    db = sqlite3.connect(grit.db / "metadata.sqlite")
    for version, statements in UNDO_SCHEMA.items():
        if version > old:
            for statement in statements:
                db.execute(statement)
    db.execute(f"PRAGMA user_version = {old}")
    db.commit()
    db.close()
    resources = as_json(grit, "-status")["resources"]   # a read-only command upgrades it
    assert resources["count"] == 9 and resources["live"] == 9  # the live view, computed
    assert grit.sql("PRAGMA user_version") == [(10,)]
    assert as_json(grit, "-status")["slurm_jobs"] == []  # schema 6's table is there
    assert as_json(grit, "-log", "1")["attempts"] == []  # schema 9's table is there
    # what a task used was not measured before schema 10: unknown, not zero
    assert as_json(grit, "-log", "1")["cpu_user"] is None
    assert "used:   not measured" in cmd(grit, "-log", "1").stdout
    assert as_json(grit, "-runs") == []
    cmd(grit, "-delete", "rev")
    assert "0 task(s) run" in grit.run().stderr
    assert [r["id"] for r in as_json(grit, "-runs")] == [1]
    # tasks made before the upgrade have no passes: their descendants count from there
    grit.write(PIPELINE.format(ok=tmp_path / "ok").replace("tr a-z A-Z", "tr a-z A-Z | rev"))
    assert "6 task(s) run, 0 failed" in grit.run().stderr


def run_on_a_terminal(grit, env=None) -> str:
    """A -run with a terminal as stdout and stderr; everything it showed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: grit with a terminal as stderr
        os.execve(sys.executable, [sys.executable, GRIT, "-manifest", str(grit.manifest),
                                   "-db", str(grit.db), "-run"], {**os.environ, **(env or {})})
    screen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        try:
            chunk = os.read(fd, 65536) if ready else b""
        except OSError:
            break
        if ready and not chunk:
            break
        screen += chunk
    os.waitpid(pid, 0)
    return screen.decode(errors="replace")


def test_progress_on_a_terminal_shows_counts_rate_and_eta(grit):
    grit.write(SLOW_FANOUT)
    text = run_on_a_terminal(grit)
    assert "\r\x1b[K" in text                                  # a line rewritten in place
    assert "slow " in text and "/40" in text and "tasks/s, ETA " in text
    assert "41 task(s) run, 0 failed" in text


def test_colors_on_a_terminal_unless_no_color(grit):
    grit.write('[[step]]\nname = "s"\nscript = "echo oops >&2; exit 3"\n')
    colored = run_on_a_terminal(grit)
    assert "\x1b[31mgrit: error: \x1b[0m" in colored and "oops" in colored
    plain = run_on_a_terminal(grit, {"NO_COLOR": "1"})
    assert "grit: error: " in plain and "oops" in plain and "\x1b[3" not in plain


def test_thousands_of_tasks_print_a_few_lines(grit):
    grit.write('''
[[step]]
name = "seed"
script = "for i in $(seq 1 1500); do echo $i > $OUTPUT_DIR/n-$i; done"
[[step]]
name = "copy"
inputs = ["n-*"]
script = "cp $INPUT_FILE $OUTPUT_DIR/c"
''')
    lines = grit.run("-parallel", "4").stderr.splitlines()
    assert len(lines) <= 4 and lines[-1].startswith("1501 task(s) run, 0 failed"), lines


def test_many_failures_print_twenty_lines_and_status_lists_them_all(grit):
    grit.write('''
[[step]]
name = "seed"
script = "for i in $(seq 1 60); do echo $i > $OUTPUT_DIR/n-$i; done"
[[step]]
name = "bad"
inputs = ["n-*"]
script = "echo 'no such column' >&2; exit 3"
''')
    lines = grit.run(check=1).stderr.splitlines()
    failures = [line for line in lines if line.startswith("grit: error: task ")]
    assert len(failures) == 20 and all(line.endswith(
        "(bad) failed: exit status 3: no such column") for line in failures)
    assert lines[-2] == ("grit: error: 40 more failed task(s) not shown (-status lists them, "
                         "-log TASK shows one, -verbose shows all)")
    assert lines[-1].startswith("grit: error: 61 task(s) run, 60 failed")
    verbose = grit.run("-verbose", check=1).stderr  # retried: every failure shown
    assert verbose.count("(bad) failed: exit status 3") == 60 and "not shown" not in verbose
    status = as_json(grit, "-status")["failed_tasks"]
    ids = [t["task"] for t in status]
    assert ids == sorted(set(ids)) and len(ids) == 60
    assert status[0] == {"task": ids[0], "step": "bad", "version": 1, "exit_code": 3,
                         "error": "exit status 3: no such column", "current": True}
    text = cmd(grit, "-status").stdout.splitlines()
    at = text.index("failed tasks (-log TASK shows one):")
    assert text[at + 1].split() == [str(ids[0]), "bad", "v1:", "exit", "status", "3:", "no",
                                    "such", "column"]
    assert text[at + 21] == "  … and 40 more (-status -json lists all)"


def test_progress_is_plain_lines_off_a_terminal_and_nothing_when_quiet(grit):
    grit.write(SLOW_FANOUT)
    proc = grit.run(env={"GRIT_PROGRESS_SECONDS": "0.5"})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("progress: ")]
    assert 2 <= len(lines) <= 20 and "\r" not in proc.stderr
    assert "slow " in lines[-1] and "/40" in lines[-1]
    grit.write(SLOW_FANOUT.replace("sleep 0.1", "sleep 0.11"))
    quiet = grit.run("-quiet", env={"GRIT_PROGRESS_SECONDS": "0.5"})
    assert quiet.stderr == ""


def test_every_command_works_on_a_database_left_by_kill_9(grit, tmp_path):
    grit.write(SLOW_FANOUT)
    proc = grit.popen()
    try:
        assert wait_for(lambda: done_tasks(grit) >= 5)
    finally:
        proc.kill()  # SIGKILL: no cleanup at all
        proc.wait()
    pending = grit.sql("SELECT min(id) FROM task WHERE status = 'pending'")[0][0]
    assert pending is not None
    log = as_json(grit, "-log", str(pending))
    assert log["status"] == "pending" and log["stdout"] == "" and log["exit_code"] is None
    assert "pending" in cmd(grit, "-log", str(pending)).stdout
    out = grit.export("out")[0][0]
    assert "made by task" in cmd(grit, "-lineage", out, "-descendants").stdout
    cmd(grit, "-export-tar", "out", str(tmp_path / "out.tar"))
    with tarfile.open(tmp_path / "out.tar") as tar:
        assert len(tar.getmembers()) == len(grit.export("out"))
    assert "would delete" in cmd(grit, "-prune", "out", "-keep", "1", "-dry-run").stderr
    assert "removed" in cmd(grit, "-gc").stderr
    cmd(grit, "-delete", "n-1")   # by name: that name only, not "out" with the same bytes
    done = grit.run()
    assert "0 failed" in done.stderr
    status = as_json(grit, "-status")
    slow = [s for s in status["steps"] if s["name"] == "slow"][0]["tasks"]
    assert slow["pending"] == 0 and slow["failed"] == 0
    assert status["resources"]["deleted"] == 1
    assert "0 problem(s)" in cmd(grit, "-verify").stderr


def test_lineage_of_a_long_cycle_is_cut_not_crashed(grit):
    grit.write('''
        [[step]]
        name = "seed"
        script = "echo 0 > $OUTPUT_DIR/n"
        [[step]]
        name = "count"
        inputs = ["n"]
        cycle_limit = 200  # this cycle converges, after 151 passes
        script = "n=$(cat $INPUT_FILE); [ $n -ge 150 ] || echo $((n + 1)) > $OUTPUT_DIR/n"
    ''')
    grit.run()
    last = [h for h, _, _ in grit.export("n")][-1]
    first = grit.export("n")[0][0]
    data = as_json(grit, "-lineage", last)
    assert data["truncated"] is True
    depth, node = 0, data["lineage"][0]
    while node["produced_by"] and node["produced_by"]["input"]:
        node, depth = node["produced_by"]["input"], depth + 1
    assert depth == 100
    assert as_json(grit, "-lineage", first, "-descendants")["truncated"] is True
    assert "(cut: at most 100 links" in cmd(grit, "-lineage", first, "-descendants").stdout
    short = as_json(grit, "-lineage", grit.export("n")[3][0])
    assert short["truncated"] is False


def test_a_failed_task_is_shown_by_its_last_meaningful_stderr_line(grit):
    grit.write(r"""
        [[step]]
        name = "fetch"
        script = '''
        echo "exit status 1: 384" >&2
        for i in $(seq 1 120); do echo "noise $i" >&2; done
        printf '  %% Total  %% Received\r 50%%\r\033[31m' >&2
        echo "FATAL: the real reason" >&2
        printf '\033[0m\n\n' >&2
        exit 1
        '''
    """)
    run = grit.run(check=1)
    failed = [line for line in run.stderr.splitlines() if "(fetch) failed" in line]
    assert failed == ["grit: error: task 1 (fetch) failed: exit status 1: FATAL: the real reason"]
    assert "noise" not in run.stderr
    status = cmd(grit, "-status").stdout
    assert "fetch v1: exit status 1: FATAL: the real reason" in status
    log = cmd(grit, "-log", "1").stdout
    assert "noise 1\n" in log and "noise 120\n" in log and "exit status 1: 384" in log


def test_verbose_streams_script_output_as_it_arrives(grit, tmp_path):
    go = tmp_path / "go"
    grit.write(f'''
        [[step]]
        name = "talk"
        script = """
        echo first-line
        echo err-line >&2
        for i in $(seq 1 200); do [ -e {go} ] && break; sleep 0.1; done
        echo second-line
        echo done > $OUTPUT_DIR/done
        """
    ''')
    proc = grit.popen("-verbose")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))
    reader.start()
    try:
        # both lines show while the script still waits for us: streamed, not replayed at the end
        assert wait_for(lambda: any("[talk #1 stdout] first-line" in ln for ln in lines) and
                        any("[talk #1 stderr] err-line" in ln for ln in lines), timeout=15)
        assert not any("second-line" in ln for ln in lines)
    finally:
        go.touch()
        proc.wait(timeout=60)
        reader.join()
    assert proc.returncode == 0
    assert any("[talk #1 stdout] second-line" in ln for ln in lines)
    log = cmd(grit, "-log", "1").stdout
    assert "first-line\nsecond-line\n" in log and "err-line\n" in log


def test_a_closed_stderr_does_not_end_the_run(grit, tmp_path):
    """`grit -run -verbose 2>&1 | head -3`: the run finishes its work, console
    output dropped, and exits with the run's status."""
    grit.write('''
        [[step]]
        name = "seed"
        script = "for i in $(seq 1 30); do echo $i > $OUTPUT_DIR/n-$i; done"
        [[step]]
        name = "double"
        inputs = ["n-*"]
        script = "echo $(( $(cat $INPUT_FILE) * 2 )) > $OUTPUT_DIR/d; echo chatter"
    ''')
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before grit writes its first line
    try:
        proc = subprocess.run([sys.executable, GRIT, "-manifest", str(grit.manifest), "-db",
                               str(grit.db), "-run", "-verbose"], stderr=write_end,
                              stdout=subprocess.DEVNULL, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 0
    steps = {s["name"]: s["tasks"] for s in as_json(grit, "-status")["steps"]}
    assert steps["double"] == {"pending": 0, "done": 30, "failed": 0}
    assert len(grit.export("d")) == 30

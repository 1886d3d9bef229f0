"""What grit says is true: -dry-run counts what -run starts, -status puts the
failures that matter first, -lineage of a live resource runs through live
resources, a timed-out task keeps its record, and no warning is false. Each
test reproduces a report (issue 30) on the pipeline it names: a files source
`in/*.txt`, `len` writing `len/<name>.n` with `wc -c`, a gather `total`."""
import json
import re
import signal
import time

import pytest

from conftest import wait_for

PIPELINE = '''
[[step]]
name = "docs"
files = ["in/*.txt"]
[[step]]
name = "len"
inputs = ["*.txt"]
script = \'\'\'
{check}
wc -c < "$INPUT_FILE" > "$OUTPUT_DIR/len/$GRIT_INPUT_NAME.n"
\'\'\'
[[step]]
name = "total"
inputs = ["len/*"]
gather = true
script = \'\'\'
cat "$INPUT_DIR"/len/* | awk '{{s += $1}} END {{print s}}' > "$OUTPUT_DIR/total"
{slow}
\'\'\'
'''


def setup(grit, mode, files, check="mkdir -p $OUTPUT_DIR/len", slow=""):
    grit.mode = mode
    (grit.path / "in").mkdir(exist_ok=True)
    for name, text in files.items():
        (grit.path / "in" / name).write_text(text)
    grit.write(PIPELINE.format(check=check, slow=slow))


def dry(grit, *extra) -> dict[str, dict]:
    plan = json.loads(grit.run("-dry-run", "-json", *extra).stdout)
    return {s["name"]: s for s in plan["steps"]}


def started(grit, *extra, check=0) -> dict[str, int]:
    """Run; the tasks it started per step, from -verbose's `start task` lines."""
    proc = grit.run("-verbose", "-output-mode", grit.mode, *extra, check=check)
    counts: dict[str, int] = {}
    for step in re.findall(r"^start task \d+ (\S+)", proc.stderr, re.M):
        counts[step] = counts.get(step, 0) + 1
    grit.last = proc
    return counts


def agree(grit, *extra, check=0) -> dict[str, int]:
    """For each step with no unfinished work upstream of it (here: no step
    before it in the manifest has tasks), the dry run's count is what the run
    starts; returns what the run started."""
    plan = dry(grit, *extra)
    ran = started(grit, *extra, check=check)
    for name, step in plan.items():
        assert step["tasks"] == ran.get(name, 0), (name, plan, ran)
        if step["tasks"]:
            break
    return ran


@pytest.fixture
def mode(output_mode):
    """conftest's output_mode (each test once per mode; FUSE required in CI), shorter."""
    return output_mode


def test_dry_run_after_a_delete_counts_the_gather(grit, mode):
    setup(grit, mode, {"a.txt": "aa\n", "b.txt": "bbb\n"})
    agree(grit)
    (grit.path / "in" / "b.txt").unlink()
    plan = dry(grit)
    assert plan["total"]["tasks"] == 1 and plan["total"]["gather"]["inputs"] == 1
    assert agree(grit) == {"total": 1}
    assert grit.contents("total")[-1] == b"3\n"


def test_dry_run_after_a_revert_starts_nothing(grit, mode):
    setup(grit, mode, {"a.txt": "aa\n"})
    agree(grit)
    (grit.path / "in" / "a.txt").write_text("changed\n")
    assert agree(grit) == {"len": 1, "total": 1}
    (grit.path / "in" / "a.txt").write_text("aa\n")  # back: the old results come back
    plan = dry(grit)
    assert plan["len"]["tasks"] == 0 and plan["total"]["tasks"] == 0
    assert agree(grit) == {}


def test_dry_run_after_kill_9_in_a_gather_task(grit, mode):
    flag = grit.path / "slow"
    flag.touch()
    setup(grit, mode, {"a.txt": "aa\n", "b.txt": "b\n"},
          slow=f'touch "{grit.path}/gathering"; if [ -e "{flag}" ]; then sleep 60; fi')
    proc = grit.popen("-output-mode", mode)
    try:
        assert wait_for(lambda: (grit.path / "gathering").exists(), timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert grit.tasks("total")["pending"] == 1
    flag.unlink()  # the same manifest: the killed gather task is still to run
    plan = dry(grit)
    assert plan["total"]["tasks"] == 1 and plan["total"]["reasons"] == {"left_pending": 1}
    assert agree(grit) == {"total": 1}


def test_a_failed_task_whose_input_is_gone_is_not_retried(grit, mode):
    setup(grit, mode, {"a.txt": "aa\n", "bad.txt": "x\n"},
          check='mkdir -p $OUTPUT_DIR/len; case "$GRIT_INPUT_NAME" in bad*) exit 3;; esac')
    agree(grit, check=1)
    (grit.path / "in" / "bad.txt").unlink()
    plan = dry(grit)
    assert plan["len"]["tasks"] == 0 and plan["total"]["tasks"] == 0  # total's set: still {a}
    assert agree(grit) == {}
    assert "retrying" not in grit.last.stderr


def test_a_timed_out_task_keeps_its_start_duration_and_output(grit, output_mode):
    grit.write('''
    [[step]]
    name = "slow"
    timeout = 2
    script = 'echo starting >&2; echo out; sleep 30'
    ''')
    proc = grit.run("-output-mode", output_mode, "-verbose", check=1)
    assert "timed out after 2 s" in proc.stderr
    assert re.search(r"\[slow #1 stderr\] starting", proc.stderr)  # streamed as it came
    log = grit.log(1)
    assert log["status"] == "failed" and log["duration"] >= 2
    started, finished = (time.mktime(time.strptime(log[k][:19], "%Y-%m-%dT%H:%M:%S"))
                         for k in ("started_at", "finished_at"))
    assert finished - started >= 1  # it started when it started, not when it was killed
    assert log["stderr"] == "starting\n" and log["stdout"] == "out\n"
    assert log["error"].startswith("timed out after 2 s") and log["error"].endswith("starting")


def test_lineage_of_a_live_resource_runs_through_live_resources(grit, mode):
    setup(grit, mode, {"a.txt": "x\n"})
    grit.run("-output-mode", mode)
    (grit.path / "in" / "a.txt").write_text("y\n")  # same length: same `len` resource
    grit.run("-output-mode", mode)
    [(digest, _, _)] = grit.export("len/a.txt.n")
    chain = json.loads(grit("-db", str(grit.db), "-lineage", digest, "-json", check=0).stdout)
    source = chain["lineage"][0]["produced_by"]["input"]["resource"]
    assert source["live"] and grit.content(source["hash"]) == b"y\n"
    text = grit("-db", str(grit.db), "-lineage", digest, check=0).stdout
    assert "not live" not in text
    [old, _] = grit.export("a.txt")
    assert "not live" in grit("-db", str(grit.db), "-lineage", old[0], check=0).stdout


def test_status_lists_current_failures_first(grit, mode):
    (grit.path / "in").mkdir()
    for i in range(25):
        (grit.path / "in" / f"f{i:02}.txt").write_text(f"{i}\n")
    grit.write(PIPELINE.format(check="exit 1", slow=""))
    grit.run("-output-mode", mode, check=1)
    grit.write(PIPELINE.format(check='mkdir -p $OUTPUT_DIR/len; case "$GRIT_INPUT_NAME" in '
                                     'f07*) exit 2;; esac', slow=""))
    grit.run("-output-mode", mode, check=1)
    failed = grit.status()["failed_tasks"]
    assert failed[0]["current"] and failed[0]["exit_code"] == 2
    assert not any(f["current"] for f in failed[1:])
    text = grit("-db", str(grit.db), "-status", check=0).stdout.splitlines()
    first = text.index("failed tasks (-log TASK shows one):") + 1
    assert "len v2: exit status 2" in text[first]
    assert "(superseded, not retried)" in text[first + 1]
    header = [line for line in text if line.startswith("step ")][0]
    [old] = [line for line in text if line.startswith("len ") and "(old)" in line]
    end = header.index("pending") + len("pending")  # "(old)" keeps the columns
    assert old[end - 1].isdigit() and old[end] == " ", (header, old)


def test_no_unmatched_warning_after_ctrl_c(grit, mode):
    grit.write(f'''
    [[step]]
    name = "first"
    script = 'touch "{grit.path}/running"; sleep 30; echo x > "$OUTPUT_DIR/m"'
    [[step]]
    name = "last"
    inputs = ["m"]
    script = 'cat "$INPUT_FILE" > "$OUTPUT_DIR/out"'
    ''')
    proc = grit.popen("-output-mode", mode)
    assert wait_for(lambda: (grit.path / "running").exists())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "no resource matches" not in err


def test_step_leaving_out_a_source_says_so(grit):
    setup(grit, "dir", {"a.txt": "aa\n"})
    grit.run()
    (grit.path / "in" / "b.txt").write_text("b\n")
    proc = grit.run("-step", "len")
    assert "docs not walked: -step or -start leaves them out" in proc.stderr


def test_a_step_consuming_its_own_outputs_is_named_once(grit):
    grit.write('''
    [[step]]
    name = "seed"
    script = 'echo 1 > "$OUTPUT_DIR/n.txt"'
    [[step]]
    name = "grow"
    inputs = ["*.txt"]
    script = 'n=$(cat "$INPUT_FILE"); [ "$n" -lt 3 ] && echo $((n + 1)) > "$OUTPUT_DIR/n.txt"; true'
    ''')
    err = grit.run().stderr
    assert err.count('step "grow" consumed 2 resource(s) made by itself') == 1


def test_export_takes_patterns_and_newest_says_what_it_leaves_out(grit):
    grit.write('''
    [[step]]
    name = "fan"
    script = 'for i in 1 2 3; do echo $i > "$OUTPUT_DIR/part$i"; done; echo x > "$OUTPUT_DIR/x"'
    [[step]]
    name = "copy"
    inputs = ["part*"]
    script = 'cp "$INPUT_FILE" "$OUTPUT_DIR/out"'
    ''')
    grit.run()
    rows = grit("-db", str(grit.db), "-export", "p*", check=0).stdout.splitlines()
    assert [r.split("\t")[1] for r in rows] == ["part1", "part2", "part3"]
    proc = grit("-db", str(grit.db), "-export-tar", "*", str(grit.path / "t.tar"), "-newest",
                check=0)
    assert "-newest leaves out 2 older resource(s)" in proc.stderr

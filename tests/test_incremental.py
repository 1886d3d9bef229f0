"""Incrementality, versions, dedup, early cutoff, failures, -step/-start, the
task environment and scheduling, all through the command line."""
import hashlib
import os
import time

SEED_ITEMS = '''
[[step]]
name = "seed"
script = """
for i in {items}; do echo "item $i" > $OUTPUT_DIR/item-$i; done
"""

[[step]]
name = "upper"
inputs = ["item-*"]
script = """
tr a-z A-Z < $INPUT_FILE > $OUTPUT_DIR/upper
"""
'''


def count_tasks(grit, step):
    """Done tasks of every version of a step."""
    return sum(s["tasks"]["done"] for s in grit.status()["steps"] if s["name"] == step)


def test_noop_rerun_runs_nothing(grit):
    grit.write(SEED_ITEMS.format(items="1 2 3"))
    assert "4 task(s) run" in grit.run().stderr
    before = grit.resources()
    assert "0 task(s) run, 0 failed, 0 resource(s) created" in grit.run().stderr
    assert grit.resources() == before


def test_one_new_input_runs_one_task(grit):
    grit.write(SEED_ITEMS.format(items="1 2 3"))
    grit.run()
    grit.write(SEED_ITEMS.format(items="1 2 3 4"))
    proc = grit.run()
    # the new seed version re-emits 1..3 (same name and hash: nothing new) and item-4
    assert "new version: seed v2" in proc.stderr
    assert "2 task(s) run, 0 failed, 2 resource(s) created" in proc.stderr
    assert count_tasks(grit, "upper") == 4
    assert sorted(grit.contents("upper")) == [b"ITEM 1\n", b"ITEM 2\n", b"ITEM 3\n", b"ITEM 4\n"]


def test_changed_script_is_new_version_that_reprocesses_everything(grit):
    grit.write(SEED_ITEMS.format(items="1 2"))
    grit.run()
    grit.write(SEED_ITEMS.format(items="1 2").replace("tr a-z A-Z", "tr a-z A-Z | rev"))
    proc = grit.run()
    assert "new version: upper v2" in proc.stderr and "2 task(s) run" in proc.stderr
    assert grit.tasks("upper", 1)["done"] == 2 and grit.tasks("upper", 2)["done"] == 2


def test_changed_inputs_is_new_version_but_parallel_or_order_is_not(grit):
    base = '''
        [[step]]
        name = "seed"
        script = "echo a > $OUTPUT_DIR/a; echo b > $OUTPUT_DIR/b"
        [[step]]
        name = "use"
        inputs = {inputs}
        {extra}
        script = "cat $INPUT_FILE > $OUTPUT_DIR/copy"
    '''
    grit.write(base.format(inputs='["a"]', extra=""))
    grit.run()
    grit.write(base.format(inputs='["a"]', extra="parallel = 3"))
    assert "new version" not in grit.run().stderr
    slurm_keys = 'cpus = 2\n        mem = "1G"\n        time = 60\n        batch = 5'
    grit.write(base.format(inputs='["a"]', extra=slurm_keys))  # scheduling keys too
    assert "new version" not in grit.run().stderr
    grit.write(base.format(inputs='["b", "a"]', extra="parallel = 3"))
    proc = grit.run()
    assert "new version: use v2" in proc.stderr
    grit.write(base.format(inputs='["a", "b"]', extra=""))
    assert "new version" not in grit.run().stderr
    assert max(s["version"] for s in grit.status()["steps"] if s["name"] == "use") == 2


def test_identical_content_is_stored_once_and_cuts_off_downstream(grit):
    grit.write('''
        [[step]]
        name = "seed"
        script = "echo x > $OUTPUT_DIR/in-1; echo y > $OUTPUT_DIR/in-2; echo z > $OUTPUT_DIR/in-3"
        [[step]]
        name = "constant"
        inputs = ["in-*"]
        script = "echo same > $OUTPUT_DIR/out"
        [[step]]
        name = "after"
        inputs = ["out"]
        script = "echo ran >> $OUTPUT_DIR/log"
    ''')
    proc = grit.run("-verbose", "-parallel", "1")
    assert count_tasks(grit, "constant") == 3
    assert len(grit.export("out")) == 1          # (name, hash) is unique
    assert count_tasks(grit, "after") == 1      # early cutoff: no downstream rerun
    # -verbose says why: the scheduling decisions, task by task
    assert proc.stderr.count("constant: 3 new task(s) for resources matching ['in-*']") == 1
    assert proc.stderr.count("after: 1 new task(s)") == 1
    assert proc.stderr.count("1 already known (early cutoff: no new work)") == 2


def test_failed_task_keeps_no_outputs_others_finish_and_retry_next_run(grit, tmp_path):
    flag = tmp_path / "allow"
    grit.write(f'''
        [[step]]
        name = "seed"
        script = "for i in 1 2 3; do echo $i > $OUTPUT_DIR/n-$i; done"
        [[step]]
        name = "work"
        inputs = ["n-*"]
        script = """
        echo partial > $OUTPUT_DIR/partial-$(cat $INPUT_FILE)
        if [ "$(cat $INPUT_FILE)" = 2 ] && [ ! -e {flag} ]; then
            echo "cannot handle two" >&2; exit 3
        fi
        echo "done $(cat $INPUT_FILE)" > $OUTPUT_DIR/result
        """
    ''')
    proc = grit.run(check=1)
    assert "failed: exit status 3: cannot handle two" in proc.stderr
    assert "1 failed" in proc.stderr
    assert sorted(grit.contents("result")) == [b"done 1\n", b"done 3\n"]
    assert not grit.has("partial-2")  # the failed task's outputs are not kept
    [failed] = grit.status()["failed_tasks"]
    assert failed["exit_code"] == 3
    flag.touch()
    proc = grit.run()
    assert "1 task(s) run, 0 failed" in proc.stderr
    assert sorted(grit.contents("result")) == [b"done 1\n", b"done 2\n", b"done 3\n"]


def test_killed_by_signal_is_a_failure(grit):
    grit.write('''
        [[step]]
        name = "seed"
        script = "echo x > $OUTPUT_DIR/x; kill -KILL $$"
    ''')
    proc = grit.run(check=1)
    assert "killed by SIGKILL" in proc.stderr
    assert not grit.has("x")


PIPE = '''
[[step]]
name = "seed"
script = "echo a > $OUTPUT_DIR/a; echo b > $OUTPUT_DIR/b"
[[step]]
name = "pa"
inputs = ["a"]
script = "cat $INPUT_FILE > $OUTPUT_DIR/pa"
[[step]]
name = "fa"
inputs = ["pa"]
script = "cat $INPUT_FILE > $OUTPUT_DIR/fa"
[[step]]
name = "tb"
inputs = ["b"]
script = "cat $INPUT_FILE > $OUTPUT_DIR/tb"
'''


def test_step_filter_runs_only_those_steps(grit):
    grit.write(PIPE)
    grit.run("-step", "seed", "-step", "tb")
    assert grit.has("tb") and not grit.has("pa")
    grit.run()  # the rest catches up later
    assert grit.has("fa")


def test_start_runs_step_and_downstream_not_seed_or_siblings(grit):
    grit.write(PIPE)
    grit.run("-step", "seed")
    grit.run("-start", "pa")
    assert grit.contents("fa") == [b"a\n"]  # pa ran, and fa downstream of it
    assert not grit.has("tb")               # not the sibling
    grit.write(PIPE.replace("echo a >", "echo A >"))  # a new seed version that -start must not run
    proc = grit.run("-start", "pa")
    # its old output is not live any more, so pa has nothing to do until the seed runs
    assert "0 task(s) run" in proc.stderr and grit.contents("a") == [b"a\n"]


def test_unknown_step_is_a_usage_error(grit):
    grit.write(PIPE)
    proc = grit.run("-step", "tbb", check=2)
    assert proc.stderr.strip().splitlines() == [
        'grit: error: unknown step "tbb" in ' + str(grit.manifest) + ' (did you mean "tb"?)']
    assert grit.run("-start", "nope", check=2).stderr.count("\n") == 1


def test_glob_inputs_subdirectories_and_split_fanout(grit):
    grit.write('''
        [[step]]
        name = "seed"
        script = """
        seq 1 250 > $OUTPUT_DIR/numbers
        mkdir -p $OUTPUT_DIR/logs/deep
        echo one > $OUTPUT_DIR/logs/a.txt
        echo two > $OUTPUT_DIR/logs/deep/b.txt
        echo skip > $OUTPUT_DIR/logs/c.csv
        """
        [[step]]
        name = "split"
        inputs = ["numbers"]
        script = 'split -l 100 "$INPUT_FILE" $OUTPUT_DIR/part-'
        [[step]]
        name = "count"
        inputs = ["part-*"]
        script = 'wc -l < "$INPUT_FILE" | tr -d " " > $OUTPUT_DIR/count-$GRIT_INPUT_NAME'
        [[step]]
        name = "logs"
        inputs = ["logs/*.txt"]
        script = 'cp "$INPUT_FILE" "$OUTPUT_DIR/seen"'
    ''')
    grit.run()
    assert [n for _, n, _ in grit.export("part-ab")] == ["part-ab"]
    assert grit.contents("count-part-aa") == [b"100\n"]
    assert grit.contents("count-part-ac") == [b"50\n"]
    assert grit.contents("logs/deep/b.txt") == [b"two\n"]
    # fnmatch rules: * crosses "/", so logs/deep/b.txt matches logs/*.txt
    assert sorted(grit.contents("seen")) == [b"one\n", b"two\n"]


def test_task_environment(grit):
    grit.write('''
        [[step]]
        name = "seed"
        script = """
        echo "INPUT_FILE=${INPUT_FILE-unset}." > $OUTPUT_DIR/env
        echo "$GRIT_STEP $GRIT_TASK_ID [$GRIT_INPUT_NAME] [$GRIT_INPUT_HASH] $MY_VAR" >> $OUTPUT_DIR/env
        cat > $OUTPUT_DIR/stdin
        """
        [[step]]
        name = "look"
        inputs = ["env"]
        script = """
        stat -c %a "$INPUT_FILE" > $OUTPUT_DIR/mode
        echo "$GRIT_STEP [$GRIT_INPUT_NAME] $GRIT_INPUT_HASH" > $OUTPUT_DIR/info
        [ "$(cat $INPUT_FILE | head -c 11)" = "INPUT_FILE=" ] && echo ok > $OUTPUT_DIR/readable
        """
    ''')
    grit.run(env={"MY_VAR": "inherited"})
    env = grit.contents("env")[0].decode().splitlines()
    assert env[0] == "INPUT_FILE=."                      # set and empty for a seed task
    assert env[1].split()[0] == "seed" and env[1].endswith("[] [] inherited")
    assert grit.contents("stdin") == [b""]                 # stdin is /dev/null
    assert grit.contents("mode") == [b"600\n"]
    digest = grit.export("env")[0][0]
    assert grit.contents("info") == [f"look [env] {digest}\n".encode()]
    assert grit.contents("readable") == [b"ok\n"]


def test_seed_copies_only_files_changed_since_it_last_succeeded(grit, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in (1, 2, 3):
        (inputs / f"in-{i}").write_text(f"old {i}\n")
    old = time.time() - 60
    for f in inputs.iterdir():
        os.utime(f, (old, old))
    seed = f'''
        [[step]]
        name = "seed"
        script = """
        # {{bump}}
        echo "[$GRIT_PREVIOUS_START]" > $OUTPUT_DIR/since
        if [ -n "$GRIT_PREVIOUS_START" ]; then
          find {inputs} -type f -newermt "$GRIT_PREVIOUS_START" -exec cp -t "$OUTPUT_DIR" {{{{}}}} +
        else
          cp {inputs}/* "$OUTPUT_DIR/"
        fi
        """
        [[step]]
        name = "upper"
        inputs = ["in-*"]
        script = "tr a-z A-Z < $INPUT_FILE > $OUTPUT_DIR/upper"
    '''
    grit.write(seed.format(bump=1))
    grit.run()
    assert grit.contents("since") == [b"[]\n"]               # first run: copy everything
    started = grit.log(1)["started_at"]  # the seed task
    (inputs / "in-4").write_text("new 4\n")
    (inputs / "in-2").write_text("changed 2\n")
    grit.write(seed.format(bump=2))                        # a new seed version runs it again
    proc = grit.run()
    assert "3 task(s) run" in proc.stderr                 # seed + the new and the changed input
    assert f"[{started}]\n".encode() in grit.contents("since")
    assert sorted(grit.contents("upper")) == [b"CHANGED 2\n", b"NEW 4\n", b"OLD 1\n",
                                              b"OLD 2\n", b"OLD 3\n"]


def overlap_manifest(lock_dir, cap, cpus=1):
    return f'''
        [[step]]
        name = "seed"
        script = "for i in 1 2 3 4 5 6; do echo $i > $OUTPUT_DIR/n-$i; done"
        [[step]]
        name = "slow"
        inputs = ["n-*"]
        parallel = {cap}
        cpus = {cpus}
        script = """
        if mkdir {lock_dir} 2>/dev/null; then sleep 0.3; rmdir {lock_dir}
        else echo overlap > $OUTPUT_DIR/overlap-$GRIT_TASK_ID; sleep 0.3; fi
        """
    '''


def test_step_parallel_cap_is_respected(grit, tmp_path):
    grit.write(overlap_manifest(tmp_path / "lock", 1))
    grit.run("-parallel", "4")
    assert grit.count("overlap-*") == 0


def test_tasks_run_in_parallel_without_cap(grit, tmp_path):
    grit.write(overlap_manifest(tmp_path / "lock", 0))
    grit.run("-parallel", "3")
    assert grit.count("overlap-*") >= 1


def test_a_task_takes_as_many_slots_as_its_step_has_cpus(grit, tmp_path):
    grit.write(overlap_manifest(tmp_path / "lock", 0, cpus=2))
    grit.run("-parallel", "3")  # 2 + 2 > 3: one at a time
    assert grit.count("overlap-*") == 0 and grit.tasks("slow")["done"] == 6
    grit.write(overlap_manifest(tmp_path / "lock2", 0, cpus=8))  # a new script: v2
    grit.run("-parallel", "2")  # more cpus than -parallel: each runs alone, none waits forever
    assert grit.count("overlap-*") == 0 and grit.tasks("slow")["done"] == 6


def test_downstream_starts_before_upstream_step_finishes(grit, tmp_path):
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    grit.write(f'''
        [[step]]
        name = "seed"
        script = "echo fast > $OUTPUT_DIR/job-1; echo slow > $OUTPUT_DIR/job-2"
        [[step]]
        name = "first"
        inputs = ["job-*"]
        script = """
        if [ "$(cat $INPUT_FILE)" = slow ]; then sleep 1.5; fi
        date +%s.%N > {stamps}/first-$(cat $INPUT_FILE)
        cp $INPUT_FILE $OUTPUT_DIR/mid
        """
        [[step]]
        name = "second"
        inputs = ["mid"]
        script = "date +%s.%N > {stamps}/second-$(cat $INPUT_FILE)"
    ''')
    grit.run("-parallel", "2")
    second_fast = float((stamps / "second-fast").read_text())
    first_slow = float((stamps / "first-slow").read_text())
    assert second_fast < first_slow - 0.5


def test_cycle_runs_until_outputs_stop_changing(grit):
    grit.write('''
        [[step]]
        name = "seed"
        script = "echo 0 > $OUTPUT_DIR/n"
        [[step]]
        name = "inc"
        inputs = ["n"]
        script = """
        n=$(cat $INPUT_FILE); [ $n -lt 5 ] && n=$((n+1)); echo $n > $OUTPUT_DIR/n
        """
    ''')
    grit.run(timeout=60)
    assert grit.contents("n") == [f"{i}\n".encode() for i in range(6)]
    assert count_tasks(grit, "inc") == 6  # the sixth reproduces "5": cut off


COUNTER = '''
[[step]]
name = "seed"
script = "echo 0 > $OUTPUT_DIR/n"
[[step]]
name = "count"
inputs = ["n"]
{limit}
script = 'echo $(( $(cat $INPUT_FILE) + 1 )) > $OUTPUT_DIR/n'
'''


def test_a_cycle_that_never_converges_stops_at_its_cycle_limit(grit):
    grit.write(COUNTER.format(limit="cycle_limit = 5"))
    proc = grit.run(check=1, timeout=60)
    assert 'a chain of resources reached step "count" 6 times, more than its cycle_limit (5)' \
        in proc.stderr
    assert sorted(int(c) for c in grit.contents("n")) == list(range(6))  # 0, then five passes
    again = grit.run(check=1)  # the same verdict, and nothing new
    assert "1 task(s) run, 1 failed, 0 resource(s)" in again.stderr
    grit.write(COUNTER.format(limit="cycle_limit = 7"))  # a scheduling key: no new version
    raised = grit.run(check=1)
    assert "new version" not in raised.stderr and "cycle_limit (7)" in raised.stderr
    assert sorted(int(c) for c in grit.contents("n")) == list(range(8))


def test_the_default_cycle_limit_is_100(grit):
    grit.write(COUNTER.format(limit=""))
    proc = grit.run(check=1, timeout=120)
    assert "cycle_limit (100)" in proc.stderr
    assert len(grit.export("n")) == 101


def test_export_lists_oldest_first_with_tabs(grit):
    grit.write(SEED_ITEMS.format(items="1"))
    grit.run()
    grit.write(SEED_ITEMS.format(items="1").replace("item $i", "item $i v2"))
    grit.run()
    rows = grit.export("item-1")
    assert [grit.content(h) for h, _, _ in rows] == [b"item 1\n", b"item 1 v2\n"]
    assert rows[0][2] <= rows[1][2]
    assert rows[0][0] == hashlib.sha256(b"item 1\n").hexdigest()


def test_verbose_shows_script_output_and_quiet_shows_only_errors(grit):
    grit.write('''
        [[step]]
        name = "seed"
        script = "echo hello-stdout; echo hello-stderr >&2; echo x > $OUTPUT_DIR/x"
    ''')
    verbose = grit.run("-verbose")
    assert "hello-stdout" in verbose.stderr and "hello-stderr" in verbose.stderr
    assert "x (2 B)" in verbose.stderr
    grit.write('''
        [[step]]
        name = "seed"
        script = "echo quiet-fail >&2; exit 1"
    ''')
    quiet = grit.run("-quiet", "-verbose", check=1)
    assert quiet.stderr.startswith("grit: error: task") and "quiet-fail" in quiet.stderr
    assert "registered" not in quiet.stderr


def test_no_color_when_not_a_terminal(grit):
    grit.write(SEED_ITEMS.format(items="1"))
    assert "\033[" not in grit.run().stderr


def test_noop_cost_does_not_grow_with_resources(grit):
    """A rerun with nothing new reads no resources: 300,000 of them cost about
    what 3 do. (Ratios of runs in the same test; no absolute timings.)"""
    import sqlite3
    import statistics

    grit.write('''
        [[step]]
        name = "seed"
        script = "echo a > $OUTPUT_DIR/r-1; echo b > $OUTPUT_DIR/r-2; echo c > $OUTPUT_DIR/r-3"
        [[step]]
        name = "pick"
        inputs = ["wanted-*"]
        script = "cat $INPUT_FILE > $OUTPUT_DIR/picked"
    ''')
    grit.run("-output-mode", "dir")

    def noop_seconds():
        runs = []
        for _ in range(3):
            started = time.monotonic()
            grit.run("-output-mode", "dir", "-quiet")
            runs.append(time.monotonic() - started)
        return statistics.median(runs)

    small = noop_seconds()
    db = sqlite3.connect(grit.db / "metadata.sqlite")
    digest = grit.export("r-1")[0][0]
    db.executemany("INSERT INTO resource (name, hash, size, created_at) VALUES (?, ?, 2, '')",
                   ((f"other-{i}", digest) for i in range(300_000)))
    db.commit()
    db.close()
    grit.run("-output-mode", "dir")  # matches the new resources once, moving the cursor
    large = noop_seconds()
    assert large < 2 * small + 0.1, (small, large)


def test_reused_scratch_files_never_keep_stale_bytes(grit, output_mode):
    """Each worker rewrites its input copy and log files in place; shrinking
    inputs and logs from task to task must leave nothing of the previous ones."""
    grit.write('''
        [[step]]
        name = "seed"
        script = "for n in 4000 3000 2000 1000 500 100 10 1; do head -c $n /dev/zero | tr '\\\\0' x > $OUTPUT_DIR/in-$n; done"
        [[step]]
        name = "copy"
        inputs = ["in-*"]
        script = "cat $INPUT_FILE > $OUTPUT_DIR/out-$GRIT_INPUT_NAME; cat $INPUT_FILE; cat $INPUT_FILE >&2"
    ''')
    grit.run("-output-mode", output_mode, "-parallel", "1")
    for n in (4000, 3000, 2000, 1000, 500, 100, 10, 1):
        assert grit.contents(f"out-in-{n}") == [b"x" * n]
    logs = [grit.log(task) for task in range(2, 10)]  # the seed is task 1
    for log in logs:
        n = int(log["input"]["name"].split("-")[1])
        assert log["stdout"] == log["stderr"] == "x" * n


def test_each_task_starts_with_an_empty_output_directory(grit, output_mode):
    """Whatever a task leaves (files, empty subdirectories), the next task of
    the same worker finds $OUTPUT_DIR empty."""
    grit.write('''
        [[step]]
        name = "seed"
        script = "for i in 1 2 3 4; do echo $i > $OUTPUT_DIR/n-$i; done"
        [[step]]
        name = "work"
        inputs = ["n-*"]
        script = "mkdir $OUTPUT_DIR/empty $OUTPUT_DIR/sub && echo $GRIT_INPUT_NAME > $OUTPUT_DIR/sub/f"
    ''')
    grit.run("-output-mode", output_mode, "-parallel", "1")
    assert sorted(grit.contents("sub/f")) == [b"n-1\n", b"n-2\n", b"n-3\n", b"n-4\n"]

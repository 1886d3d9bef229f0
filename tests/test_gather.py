"""Gather steps (fan-in): one task over every live resource that matches, run
once what feeds it is done, again only when that set changes."""
import json
import signal

from conftest import require_fuse, wait_for
from test_live import live, tasks_run, write

DOCUMENTS = '''
[[step]]
name = "docs"
files = ["data/*.txt"]
[[step]]
name = "paragraphs"
inputs = ["*.txt"]
script = \'\'\'
awk -v RS= -v d="$OUTPUT_DIR" -v n="$GRIT_INPUT_NAME" \\
  '{ f = d "/para-" n "-" NR; print > f; close(f) }' "$INPUT_FILE"
\'\'\'
[[step]]
name = "count"
inputs = ["para-*"]
script = 'wc -w < "$INPUT_FILE" | tr -d " " > "$OUTPUT_DIR/count-$GRIT_INPUT_NAME"'
[[step]]
name = "totals"
inputs = ["count-*"]
gather = true
script = \'\'\'
cat "$INPUT_DIR"/count-* | awk '{ s += $1 } END { print s }' > "$OUTPUT_DIR/total"
cut -f1 "$INPUT_LIST" > "$OUTPUT_DIR/names"
\'\'\'
[[step]]
name = "report"
inputs = ["total"]
script = 'echo "words: $(cat "$INPUT_FILE")" > "$OUTPUT_DIR/report"'
'''


def ran(proc, step):
    """Tasks of `step` this run started (from -verbose's "start task N STEP")."""
    return sum(1 for line in proc.stderr.splitlines() if line.startswith("start task ")
               and line.split()[3] == step)


def test_documents_pipeline_gathers_once_per_change(grit, output_mode):
    write(grit, "a.txt", "one two\n\nthree four five\n")
    write(grit, "b.txt", "six\n")
    grit.write(DOCUMENTS)
    first = grit.run("-output-mode", output_mode, "-verbose")
    assert ran(first, "count") == 3 and ran(first, "totals") == 1
    assert live(grit, "total") == [b"6\n"] and live(grit, "report") == [b"words: 6\n"]
    assert live(grit, "names") == [b"count-para-a.txt-1\ncount-para-a.txt-2\ncount-para-b.txt-1\n"]
    assert tasks_run(grit.run("-output-mode", output_mode)) == 0
    write(grit, "c.txt", "seven eight\n\nnine\n")                        # a new document
    added = grit.run("-output-mode", output_mode, "-verbose")
    assert ran(added, "count") == 2 and ran(added, "totals") == 1       # one gather, not two
    assert live(grit, "total") == [b"9\n"] and live(grit, "report") == [b"words: 9\n"]
    write(grit, "c.txt", "ten eleven\n\ntwelve\n")                       # same counts
    same = grit.run("-output-mode", output_mode, "-verbose")
    assert ran(same, "paragraphs") == 1 and ran(same, "count") == 2
    assert ran(same, "totals") == 0 and ran(same, "report") == 0        # cut off at count
    (grit.path / "data" / "c.txt").unlink()                             # back to a seen set
    back = grit.run("-output-mode", output_mode, "-verbose")
    assert tasks_run(back) == 0 and live(grit, "total") == [b"6\n"]
    assert live(grit, "report") == [b"words: 6\n"]
    assert len(grit.export("total")) == 2                               # history stays
    status = {s["name"]: s for s in grit.status()["steps"]}
    assert status["totals"]["gather"].startswith("3 input(s) gathered by task")
    assert status["totals"]["tasks"] == {"pending": 0, "done": 2, "failed": 0}


def test_several_live_resources_of_one_name_all_appear(grit, output_mode):
    """Fan-out by rewrite: both `part` contents are live and both are gathered,
    at part@HASH12; $INPUT_LIST names each `part`."""
    grit.write('''
    [[step]]
    name = "make"
    script = 'for x in one two; do echo $x > "$OUTPUT_DIR/part"; done; echo solo > "$OUTPUT_DIR/only"'
    [[step]]
    name = "seeded"
    script = 'echo two > "$OUTPUT_DIR/part"'
    [[step]]
    name = "all"
    inputs = ["part", "only"]
    gather = true
    script = \'\'\'
    cd "$INPUT_DIR" && for f in *; do printf '%s %s\\n' "$f" "$(cat "$f")"; done > "$OUTPUT_DIR/seen"
    cp "$INPUT_LIST" "$OUTPUT_DIR/list"
    \'\'\'
    ''')
    grit.run("-output-mode", output_mode)
    parts = {h: grit.content(h) for h, _, _ in grit.export("part")}
    expected_parts = [b"one\n", b"two\n"] if output_mode == "fuse" else [b"two\n"]
    assert sorted(parts.values()) == expected_parts
    [seen] = live(grit, "seen")
    if output_mode == "fuse":
        assert sorted(seen.decode().splitlines()) == sorted(
            ["only solo"] + [f"part@{h[:12]} {c.decode().strip()}" for h, c in parts.items()])
    else:  # one `part` (seed and make agree on "two"): it appears at its name
        assert sorted(seen.decode().splitlines()) == ["only solo", "part two"]
    [listing] = live(grit, "list")
    rows = [line.split("\t") for line in listing.decode().splitlines()]
    assert sorted(name for name, _ in rows) == ["only"] + ["part"] * len(parts)
    assert all(path.startswith("/") for _, path in rows)


def test_no_inputs_means_no_task_and_says_why(grit):
    grit.write('''
    [[step]]
    name = "seed"
    script = 'echo x > "$OUTPUT_DIR/other"'
    [[step]]
    name = "sum"
    inputs = ["count-*"]
    gather = true
    script = 'cat "$INPUT_DIR"/* > "$OUTPUT_DIR/sum"'
    ''')
    dry = json.loads(grit.run("-dry-run", "-json").stdout)
    [plan] = [s for s in dry["steps"] if s["name"] == "sum"]
    assert plan["tasks"] == 0 and "waiting for upstream" in plan["gather"]["state"]
    proc = grit.run()
    assert "1 task(s) run" in proc.stderr and not grit.has("sum")
    assert grit.tasks("sum") == {"pending": 0, "done": 0, "failed": 0}
    [status] = [s for s in grit.status()["steps"] if s["name"] == "sum"]
    assert status["gather"] == "no inputs"
    assert "gather over 0 live input(s): no inputs" in grit.run("-dry-run").stdout


def test_status_says_waiting_for_upstream_while_feeders_have_tasks(grit):
    grit.write('''
    [[step]]
    name = "seed"
    script = 'for i in 1 2 3; do echo $i > "$OUTPUT_DIR/n$i"; done'
    [[step]]
    name = "slow"
    inputs = ["n*"]
    script = 'cat "$INPUT_FILE" > "$OUTPUT_DIR/m-$GRIT_INPUT_NAME"'
    [[step]]
    name = "sum"
    inputs = ["m-*"]
    gather = true
    script = 'cat "$INPUT_DIR"/* | paste -sd+ | bc > "$OUTPUT_DIR/sum"'
    ''')
    only_seed = grit.run("-step", "seed", "-step", "sum")
    assert 'step "sum" is waiting for upstream: slow have pending tasks' in only_seed.stderr
    [status] = [s for s in grit.status()["steps"] if s["name"] == "sum"]
    assert status["gather"] == "waiting for upstream (slow)"
    grit.run()
    assert live(grit, "sum") == [b"6\n"]
    assert grit.tasks("sum") == {"pending": 0, "done": 1, "failed": 0}


def test_kill_9_during_a_gather_then_rerun_finishes_it_once(grit, tmp_path):
    marker = tmp_path / "gathering"
    grit.write(f'''
    [[step]]
    name = "seed"
    script = 'for i in $(seq 1 20); do echo $i > "$OUTPUT_DIR/n$i"; done'
    [[step]]
    name = "sum"
    inputs = ["n*"]
    gather = true
    script = \'\'\'
    touch {marker}; echo "$GRIT_TASK_ID" >> {marker}.ids
    [ -e {marker}.again ] || sleep 30
    cat "$INPUT_DIR"/* | paste -sd+ | bc > "$OUTPUT_DIR/sum"
    \'\'\'
    ''')
    proc = grit.popen("-verbose")
    assert wait_for(marker.exists, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    (tmp_path / "gathering.again").touch()
    grit.run()
    assert live(grit, "sum") == [b"210\n"]
    ids = (tmp_path / "gathering.ids").read_text().split()
    assert len(ids) == 2 and ids[0] == ids[1]  # the same task, run again: not a second one
    assert grit.tasks("sum") == {"pending": 0, "done": 1, "failed": 0}
    assert tasks_run(grit.run()) == 0


def test_a_gather_step_in_a_cycle_is_an_error(grit):
    grit.write('''
    [[step]]
    name = "seed"
    script = 'echo 1 > "$OUTPUT_DIR/n-0"'
    [[step]]
    name = "sum"
    inputs = ["n-*"]
    gather = true
    script = 'n=$(ls "$INPUT_DIR" | wc -l); [ "$n" -lt 5 ] && echo $n > "$OUTPUT_DIR/next"; true'
    [[step]]
    name = "again"
    inputs = ["next"]
    script = 'cp "$INPUT_FILE" "$OUTPUT_DIR/n-$(cat "$INPUT_FILE")"'
    ''')
    first = grit.run(check=2)  # the first run finds it out as it happens
    assert 'gather step "sum" is in a cycle' in first.stderr
    second = grit.run(check=2)  # then at load time, from what the steps produced
    assert second.stderr.count("\n") == 1
    assert 'gather step "sum" is in a cycle (sum -> again -> sum)' in second.stderr


def test_lineage_and_log_show_the_gathered_inputs_cut_with_a_count(grit):
    grit.write('''
    [[step]]
    name = "seed"
    script = 'for i in $(seq 1 150); do echo $i > "$OUTPUT_DIR/n$i"; done'
    [[step]]
    name = "sum"
    inputs = ["n*"]
    gather = true
    script = 'cat "$INPUT_DIR"/* | paste -sd+ | bc > "$OUTPUT_DIR/sum"'
    ''')
    grit.run()
    [(digest, _, _)] = grit.export("sum")
    assert grit.content(digest) == b"11325\n"
    text = grit("-db", str(grit.db), "-lineage", digest, check=0).stdout
    assert "inputs: 150 gathered" in text and "… and 140 more" in text
    lineage = json.loads(grit("-db", str(grit.db), "-lineage", digest, "-json", check=0).stdout)
    made = lineage["lineage"][0]["produced_by"]
    assert made["gathered_count"] == 150 and len(made["gathered"]) == 100
    assert lineage["truncated"] is True
    log = grit.log(made["task"])
    assert len(log["gathered"]) == 150 and log["input"] is None
    [(n1, _, _)] = grit.export("n1")
    below = grit("-db", str(grit.db), "-lineage", n1, "-descendants", check=0).stdout
    assert f"task {made['task']} (sum v1, done) made" in below


def test_inputs_are_read_only_and_large_ones_read_back_exactly(grit):
    require_fuse()
    grit.write('''
    [[step]]
    name = "seed"
    script = 'head -c 3000000 /dev/urandom > "$OUTPUT_DIR/big"; echo small > "$OUTPUT_DIR/sub/x" 2>/dev/null || { mkdir "$OUTPUT_DIR/sub"; echo small > "$OUTPUT_DIR/sub/x"; }'
    [[step]]
    name = "check"
    inputs = ["big", "sub/*"]
    gather = true
    script = \'\'\'
    sha256sum < "$INPUT_DIR/big" | cut -d" " -f1 > "$OUTPUT_DIR/sum"
    dd if="$INPUT_DIR/big" bs=1000 skip=1234 count=7 2>/dev/null | sha256sum | cut -d" " -f1 > "$OUTPUT_DIR/slice"
    ls "$INPUT_DIR" "$INPUT_DIR/sub" > "$OUTPUT_DIR/ls"
    if echo x > "$INPUT_DIR/big"; then echo writable; else echo refused; fi > "$OUTPUT_DIR/write"
    if touch "$INPUT_DIR/new"; then echo writable; else echo refused; fi > "$OUTPUT_DIR/create"
    \'\'\'
    ''')
    grit.run("-output-mode", "fuse")
    import hashlib
    [big] = grit.contents("big")
    assert live(grit, "sum") == [hashlib.sha256(big).hexdigest().encode() + b"\n"]
    assert live(grit, "slice") == [hashlib.sha256(big[1234000:1241000]).hexdigest().encode()
                                   + b"\n"]
    listing = live(grit, "ls")[0].decode()
    assert "big\nsub\n" in listing and "\nx\n" in listing
    assert live(grit, "write") == [b"refused\n"] and live(grit, "create") == [b"refused\n"]


def test_gather_with_step_and_start(grit):
    grit.write('''
    [[step]]
    name = "seed"
    script = 'echo 1 > "$OUTPUT_DIR/n1"; echo 2 > "$OUTPUT_DIR/n2"'
    [[step]]
    name = "sum"
    inputs = ["n*"]
    gather = true
    script = 'cat "$INPUT_DIR"/* | paste -sd+ | bc > "$OUTPUT_DIR/sum"'
    ''')
    grit.run("-step", "seed")
    assert not grit.has("sum")
    grit.run("-step", "sum")
    assert live(grit, "sum") == [b"3\n"]
    grit.write(grit.manifest.read_text().replace("echo 2", "echo 5"))
    grit.run("-start", "seed")  # -start reaches the gather step downstream
    assert live(grit, "sum") == [b"6\n"]

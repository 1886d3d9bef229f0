"""Files on disk as a source, and the live view: after any edit, the live
resources are what a clean run would make; history stays queryable."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import GRIT, Grit

DOCS = '''
[[step]]
name = "docs"
files = ["data/**/*.txt"]
[[step]]
name = "upper"
inputs = ["*.txt"]
script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/upper"'
'''


def write(grit, name, text):
    path = grit.path / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def live(grit, name):
    """Contents of the live resources of that name (-export NAME -live), sorted."""
    proc = grit("-db", str(grit.db), "-export", name, "-live")
    if proc.returncode == 1:
        return []
    return sorted(grit.content(line.split("\t")[0]) for line in proc.stdout.splitlines())


def live_set(grit, pattern="*"):
    """Every live (name, hash), from -export-tar (live by default)."""
    proc = subprocess.run([sys.executable, GRIT, "-db", str(grit.db), "-export-tar", pattern, "-"],
                          capture_output=True, timeout=120)
    if proc.returncode == 1:
        return set()
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        return {tuple(m.name.rsplit("/", 1)) for m in tar.getmembers()}


def tasks_run(proc):
    return int(proc.stderr.split(" task(s) run")[0].rsplit("\n", 1)[-1])


def test_files_become_resources_and_follow_the_files(grit, output_mode):
    write(grit, "a.txt", "alpha\n")
    write(grit, "b.txt", "beta\n")
    write(grit, "sub/c.txt", "gamma\n")
    grit.write(DOCS)
    first = grit.run("-output-mode", output_mode)
    assert "docs: 3 new, 0 changed, 0 gone" in first.stderr and tasks_run(first) == 3
    assert {n for n, _ in live_set(grit)} == {"a.txt", "b.txt", "sub/c.txt", "upper"}
    assert live(grit, "upper") == [b"ALPHA\n", b"BETA\n", b"GAMMA\n"]
    assert tasks_run(grit.run("-output-mode", output_mode)) == 0          # nothing changed
    os.utime(grit.path / "data" / "a.txt", (1, 1))                        # touch: same content
    assert tasks_run(grit.run("-output-mode", output_mode)) == 0
    write(grit, "b.txt", "beta two\n")                                    # changed
    changed = grit.run("-output-mode", output_mode)
    assert "docs: 0 new, 1 changed, 0 gone" in changed.stderr and tasks_run(changed) == 1
    assert live(grit, "upper") == [b"ALPHA\n", b"BETA TWO\n", b"GAMMA\n"]
    assert len(grit.export("upper")) == 4                                 # history stays
    (grit.path / "data" / "sub" / "c.txt").unlink()                       # deleted
    gone = grit.run("-output-mode", output_mode)
    assert "docs: 0 new, 0 changed, 1 gone" in gone.stderr and tasks_run(gone) == 0
    assert live(grit, "upper") == [b"ALPHA\n", b"BETA TWO\n"]
    assert live(grit, "sub/c.txt") == [] and grit.contents("sub/c.txt") == [b"gamma\n"]
    os.rename(grit.path / "data" / "a.txt", grit.path / "data" / "a2.txt")  # renamed
    grit.run("-output-mode", output_mode)
    assert {n for n, _ in live_set(grit)} == {"a2.txt", "b.txt", "upper"}
    assert live(grit, "upper") == [b"ALPHA\n", b"BETA TWO\n"]
    write(grit, "b.txt", "beta\n")                                        # back to old content
    assert tasks_run(grit.run("-output-mode", output_mode)) == 0          # its results revive
    assert live(grit, "upper") == [b"ALPHA\n", b"BETA\n"]


def test_a_shrinking_document_leaves_no_stale_paragraphs(grit):
    """11 paragraphs, then 3: the paragraphs 4-11 of the old text are not live."""
    write(grit, "zstd.copyright.txt", "\n\n".join(f"paragraph {i}" for i in range(1, 12)) + "\n")
    grit.write('''
        [[step]]
        name = "docs"
        files = ["data/*.txt"]
        [[step]]
        name = "para"
        inputs = ["*.txt"]
        script = \'\'\'
        awk -v RS= -v dir="$OUTPUT_DIR/para/$GRIT_INPUT_NAME" \\
            'BEGIN { system("mkdir -p " dir) } { f = sprintf("%s/%02d", dir, NR); print > f; close(f) }' \\
            "$INPUT_FILE"
        \'\'\'
    ''')
    grit.run()
    write(grit, "zstd.copyright.txt", "one\n\ntwo\n\nthree\n")
    grit.run()
    proc = subprocess.run([sys.executable, GRIT, "-db", str(grit.db), "-export-tar",
                           "para/zstd.copyright.txt/*", "-", "-newest"], capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members == {"para/zstd.copyright.txt/01": b"one\n",
                       "para/zstd.copyright.txt/02": b"two\n",
                       "para/zstd.copyright.txt/03": b"three\n"}
    every = subprocess.run([sys.executable, GRIT, "-db", str(grit.db), "-export-tar",
                            "para/*", "-", "-all"], capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(every.stdout)) as tar:
        assert len(tar.getmembers()) == 11 + 3  # -all: history too


def test_a_new_step_version_processes_live_resources_only(grit):
    write(grit, "a.txt", "one\n")
    grit.write(DOCS)
    grit.run()
    write(grit, "a.txt", "two\n")
    grit.run()
    grit.write(DOCS.replace('tr a-z A-Z < "$INPUT_FILE"', 'rev "$INPUT_FILE" | tr a-z A-Z'))
    proc = grit.run()
    assert "new version: upper v2" in proc.stderr and tasks_run(proc) == 1  # not the old "one"
    assert live(grit, "upper") == [b"OWT\n"]


def test_status_dry_run_and_json_say_what_is_live(grit):
    write(grit, "a.txt", "a\n")
    write(grit, "b.txt", "b\n")
    grit.write(DOCS)
    grit.run()
    (grit.path / "data" / "b.txt").unlink()
    write(grit, "a.txt", "a changed\n")
    write(grit, "n.txt", "new\n")
    plan = grit.run("-dry-run").stdout
    assert "docs: 1 new, 1 changed, 1 gone → upper 2 task(s)" in plan
    assert "2 task(s) would start" in plan
    grit.run()
    status = grit.status()["resources"]
    assert status["live"] == 4 and status["count"] == 8  # a, n + their uppers; history: 8
    assert status["live_names"] == {"a.txt": 1, "n.txt": 1, "upper": 2}
    text = grit("-db", str(grit.db), "-status", check=0).stdout
    assert "resources: 8 in 4 name(s), 4 live" in text and "upper (2 live)" in text
    log = json.loads(grit("-db", str(grit.db), "-log", "2", "-json", check=0).stdout)
    assert log["input"]["name"] == "a.txt" and log["input"]["live"] is False


def test_a_file_that_cannot_be_read_fails_alone(grit, tmp_path):
    write(grit, "good.txt", "fine\n")
    bad = write(grit, "bad.txt", "secret\n")
    bad.chmod(0)
    grit.write(DOCS)
    # root reads anything: without the capability that lets it, it cannot
    wrap = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"] \
        if os.geteuid() == 0 else []
    if wrap and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: no way to make a file unreadable")
    proc = subprocess.run([*wrap, sys.executable, GRIT, "-manifest", str(grit.manifest), "-db",
                           str(grit.db), "-run", "-output-mode", "dir"], capture_output=True,
                          text=True, cwd=grit.path)
    assert proc.returncode == 1, proc.stderr
    assert f"grit: error: docs: cannot read {bad}: Permission denied" in proc.stderr
    assert "1 file(s) not imported" in proc.stderr
    assert live(grit, "upper") == [b"FINE\n"]
    bad.chmod(0o644)
    again = grit.run("-output-mode", "dir")  # the next run imports it
    assert "docs: 1 new" in again.stderr and live(grit, "upper") == [b"FINE\n", b"SECRET\n"]


def test_two_files_with_one_name_are_an_error(grit):
    write(grit, "x/a.txt", "1\n")
    write(grit, "y/a.txt", "2\n")
    grit.write('''
        [[step]]
        name = "docs"
        files = ["data/x/*.txt", "data/y/*.txt"]
    ''')
    proc = grit.run(check=2)
    assert "would both be the resource \"a.txt\"" in proc.stderr
    assert str(grit.path / "data/x/a.txt") in proc.stderr


def test_a_seed_that_reruns_always_replaces_its_previous_outputs(grit, tmp_path):
    feed = tmp_path / "feed"
    feed.write_text("1 2 3")
    grit.write(f'''
        [[step]]
        name = "fetch"
        rerun = "always"
        script = 'grep -q fail {feed} && exit 1; for i in $(cat {feed}); do echo $i > $OUTPUT_DIR/item-$i; done'
        [[step]]
        name = "double"
        inputs = ["item-*"]
        script = 'echo $(( $(cat $INPUT_FILE) * 2 )) > $OUTPUT_DIR/double'
    ''')
    assert tasks_run(grit.run()) == 4
    assert tasks_run(grit.run()) == 1              # the seed again; same content: nothing more
    feed.write_text("2 3 4")
    assert tasks_run(grit.run()) == 2              # the seed, and double for item-4
    assert {n for n, _ in live_set(grit, "item-*")} == {"item-2", "item-3", "item-4"}
    assert live(grit, "double") == [b"4\n", b"6\n", b"8\n"]
    feed.write_text("fail")                        # a failed run keeps the last good one live
    grit.run(check=1)
    assert live(grit, "double") == [b"4\n", b"6\n", b"8\n"]


def test_retiring_is_all_or_nothing_under_kill_9(tmp_path):
    """A changed file retires thousands of descendants in one transaction:
    kill -9 during it, and the next run finishes with a clean run's live view."""
    grit = Grit(tmp_path / "killed")
    grit.path.mkdir()
    write(grit, "big.txt", "".join(f"line {i}\n" for i in range(1500)))
    manifest = '''
        [[step]]
        name = "docs"
        files = ["data/*.txt"]
        [[step]]
        name = "lines"
        inputs = ["*.txt"]
        script = 'split -l 1 -a 4 "$INPUT_FILE" "$OUTPUT_DIR/line-"'
        [[step]]
        name = "upper"
        inputs = ["line-*"]
        script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/up-$GRIT_INPUT_NAME"'
    '''
    grit.write(manifest)
    grit.run("-output-mode", "dir", timeout=600)
    write(grit, "big.txt", "just one line\n")
    for delay in (0.15, 0.3, 0.5):
        proc = grit.popen("-output-mode", "dir")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    grit.run("-output-mode", "dir", timeout=600)
    clean = Grit(tmp_path / "clean")
    clean.path.mkdir()
    write(clean, "big.txt", "just one line\n")
    clean.write(manifest)
    clean.run("-output-mode", "dir")
    assert live_set(grit) == live_set(clean)
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify").stderr


def test_gc_retired_reclaims_what_is_not_live(grit):
    write(grit, "a.txt", "first\n")
    grit.write(DOCS)
    grit.run()
    write(grit, "a.txt", "second\n")
    grit.run()
    gc = grit("-db", str(grit.db), "-gc", "-retired", check=0)
    assert "deleted the content of 2 retired resource(s)" in gc.stderr  # old a.txt, its upper
    assert "removed 2 unreferenced object(s)" in gc.stderr
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify").stderr
    assert live(grit, "upper") == [b"SECOND\n"]
    assert len(grit.export("upper")) == 1  # history of deleted content is not listed
    write(grit, "a.txt", "first\n")        # back: the deleted result is made again
    proc = grit.run()
    assert tasks_run(proc) == 1 and live(grit, "upper") == [b"FIRST\n"]


def test_thousands_of_edited_files_give_a_clean_runs_resources(grit):
    """A source read in path order beside what it imported before, 1,000 rows
    at a time: deletions, changes, touches and new files spread over 2,500
    files (across those chunks) leave the live resources of a clean run. Two
    overlapping patterns match most files twice: each is one resource."""
    grit.write('''
        [[step]]
        name = "docs"
        files = ["data/**/*.txt", "data/f-1*.txt"]
    ''')
    for i in range(2500):
        write(grit, f"f-{i:04d}.txt", f"{i}\n")
    first = grit.run()
    assert "docs: 2500 new, 0 changed, 0 gone" in first.stderr
    gone = {i for i in range(2500) if i % 7 == 0}
    changed = {i for i in range(2500) if i % 11 == 0} - gone
    for i in gone:
        (grit.path / "data" / f"f-{i:04d}.txt").unlink()
    for i in changed:
        write(grit, f"f-{i:04d}.txt", f"{i} changed\n")
    for i in range(0, 2500, 13):
        if i not in gone:
            os.utime(grit.path / "data" / f"f-{i:04d}.txt", (1, 1))
    for i in range(0, 2500, 50):
        write(grit, f"f-{i:04d}b.txt", f"{i} new\n")  # sorts right after f-{i}
    again = grit.run()
    assert f"docs: 50 new, {len(changed)} changed, {len(gone)} gone" in again.stderr
    clean = Grit(grit.path)
    clean.db = grit.path / "clean-db"
    clean.run()
    assert live_set(grit) == live_set(clean)
    assert len(live_set(grit)) == 2500 - len(gone) + 50


def test_an_undecodable_file_name_beside_accented_ones_changes_nothing_on_rerun(grit):
    """A name that is not UTF-8 is not imported (a line says so) and sorts as
    text, as the imported paths do: the files beside it stay unchanged."""
    write(grit, "aé.txt", "accent\n")
    (grit.path / "data").joinpath(os.fsdecode(b"a\x80.txt")).write_text("bytes\n")
    grit.write('''
        [[step]]
        name = "docs"
        files = ["data/*.txt"]
    ''')
    first = grit.run(check=None)
    assert "is not valid UTF-8" in first.stderr
    assert "docs: 1 new, 0 changed, 0 gone" in first.stderr
    again = grit.run("-verbose", check=None)
    assert "docs: 0 new, 0 changed, 0 gone" in again.stderr
    assert live(grit, "aé.txt") == [b"accent\n"]

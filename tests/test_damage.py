"""A full disk and a damaged database: clear messages, nothing lost, -verify."""
import hashlib
import os
import re
import shutil
import subprocess

import pytest

from conftest import EXAMPLES, Grit


def lmdb_flip_byte(db, needle: bytes):
    """Flip a byte wherever `needle` occurs in the LMDB data file (copy-on-write
    leaves stale copies of pages, so the live one is not always the first)."""
    path = db / "objects" / "data.mdb"
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0
    while at >= 0:
        data[at] ^= 0xFF
        at = data.find(needle, at + 1)
    path.write_bytes(bytes(data))


def test_damaged_object_is_refused_and_verify_reports_it(grit):
    grit.write('[[step]]\nname = "s"\nscript = "echo precious-content > $OUTPUT_DIR/x; echo ok > $OUTPUT_DIR/y"\n')
    grit.run()
    assert grit("-db", "db", "-verify", check=0).stderr.startswith("verified ")
    digest = grit.export("x")[0][0]
    lmdb_flip_byte(grit.db, b"precious-content")
    proc = grit("-db", "db", "-export-hash", digest, check=2)  # a damaged database
    assert proc.stdout == ""
    assert f"object {digest} does not match its hash (content damaged)" in proc.stderr
    verify = grit("-db", "db", "-verify", check=1)
    assert f"object {digest} does not match its hash" in verify.stderr
    assert "1 problem(s)" in verify.stderr
    assert grit.contents("y") == [b"ok\n"]  # the rest is still readable


def test_verify_reports_a_missing_object(grit):
    grit.write('[[step]]\nname = "s"\nscript = "echo a > $OUTPUT_DIR/x"\n')
    grit.run()
    digest = grit.export("x")[0][0]
    shutil.rmtree(grit.db / "objects")
    (grit.db / "objects").mkdir()
    from grit import ObjectStore
    ObjectStore(str(grit.db / "objects")).close()  # an empty store
    verify = grit("-db", "db", "-verify", check=1)
    assert f"object {digest} is missing from the object store" in verify.stderr


def test_damaged_sqlite_file_is_one_clear_error(grit):
    shutil.copy(EXAMPLES / "quickstart.toml", grit.manifest)
    grit.run()
    path = grit.db / "metadata.sqlite"
    data = bytearray(path.read_bytes())
    for i in range(100, len(data), 97):  # scribble over the file, header kept
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    for proc in (grit.run(check=None), grit("-db", "db", "-export", "processed"),
                 grit("-db", "db", "-verify")):
        assert proc.returncode in (1, 2), proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("grit: error:")


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the database needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "grit-test", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.parametrize("mode", ["dir", "fuse"])
def test_disk_full_fails_cleanly_and_the_next_run_completes(tmp_path, small_disk, mode):
    if mode == "fuse":
        from conftest import require_fuse
        require_fuse()
    grit = Grit(tmp_path)
    grit.db = small_disk / "db"
    grit.write('''
        [[step]]
        name = "seed"
        script = "for i in $(seq 1 12); do echo $i > $OUTPUT_DIR/n-$i; done"
        [[step]]
        name = "big"
        inputs = ["n-*"]
        parallel = 2
        script = "head -c 1000000 /dev/urandom > $OUTPUT_DIR/blob"
    ''')
    ballast = small_disk / "ballast"  # 12 MB of blobs do not fit beside it
    ballast.write_bytes(b"x" * (17 * 2**20))
    proc = grit.run("-output-mode", mode, check=None)
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "is full]" in proc.stderr or "database or disk is full" in proc.stderr
    verify = grit("-db", str(grit.db), "-verify", check=0)  # consistent afterwards
    assert "0 problem(s)" in verify.stderr
    stored = grit.count("blob")
    assert stored < 12
    ballast.unlink()  # space is freed: the next run completes the rest
    grit.run("-output-mode", mode)
    assert grit.count("blob") == 12
    assert grit.status()["failed_tasks"] == [] and all(
        s["tasks"]["pending"] == 0 for s in grit.status()["steps"])
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify", check=0).stderr


def test_a_large_output_that_fills_the_disk_fails_its_task_and_stores_nothing_wrong(
        tmp_path, small_disk, output_mode):
    """A large output is written once (the spool or the script's file, which
    becomes the object by a rename): with ~4 MiB left the disk fills mid-write
    (short writes, then ENOSPC), the task fails whether or not the script
    noticed, and nothing is stored under a wrong hash; with ~9 MiB left it fits."""
    mode = output_mode
    grit = Grit(tmp_path)
    grit.db = small_disk / "db"
    grit.write('[[step]]\nname = "big"\n'
               'script = "head -c 9000000 /dev/urandom > $OUTPUT_DIR/blob || true"\n')
    (small_disk / "ballast").write_bytes(b"x" * (19 * 2**20))
    proc = grit.run("-output-mode", mode, check=None)
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stderr
    # dir mode cannot see the failed write ("|| true"): the file is stored and
    # the metadata, with no room left, is not
    assert ("output 'blob' could not be written: no space left on device" in proc.stderr
            or "is full]" in proc.stderr or "database or disk is full" in proc.stderr), \
        proc.stderr
    assert grit.count("blob") == 0
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify", check=0).stderr
    # what was stored for the unrecorded task goes with -gc
    assert re.search(r"removed [01] unreferenced object", grit("-db", str(grit.db), "-gc").stderr)
    (small_disk / "ballast").write_bytes(b"x" * (14 * 2**20))
    grit.run("-output-mode", mode)
    [(digest, _, _)] = grit.export("blob")
    data = grit.content(digest)
    assert len(data) == 9000000 and hashlib.sha256(data).hexdigest() == digest
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify", check=0).stderr


def test_a_run_warns_when_the_database_disk_is_over_85_percent_full(tmp_path, small_disk):
    grit = Grit(tmp_path)
    grit.db = small_disk / "db"
    grit.write('[[step]]\nname = "s"\nscript = "echo a > $OUTPUT_DIR/a"\n')
    assert "full" not in grit.run("-output-mode", "dir").stderr
    (small_disk / "ballast").write_bytes(b"x" * (21 * 2**20))  # 24 MiB disk, ~90% used
    proc = grit.run("-output-mode", "dir")
    [warning] = [line for line in proc.stderr.splitlines() if "full" in line]
    assert re.fullmatch(rf"grit: warning: the disk holding {re.escape(str(grit.db))} is "
                        r"(8[6-9]|9\d)% full \(\d+ MiB free\)", warning), warning


def test_gc_removes_what_killed_tasks_left_and_keeps_the_rest(grit):
    import hashlib
    import struct



    from grit import ObjectStore
    grit.write('[[step]]\nname = "s"\nscript = "echo keep > $OUTPUT_DIR/x"\n')
    grit.run()
    # what a task killed after storing its output leaves: an object nothing names,
    # and the chunks of a put cut short before its header
    store = ObjectStore(str(grit.db / "objects"))
    orphan = grit.path / "orphan"
    orphan.write_bytes(b"left behind" * 1000)
    store.put_file(str(orphan))
    partial = hashlib.sha256(b"never finished").digest()
    with store.env.begin(write=True) as txn:
        txn.put(partial + struct.pack(">I", 0), b"half", db=store._chunks)
    assert len(store.hashes()) == 3
    store.close()
    proc = grit("-db", "db", "-gc", check=0)
    assert "removed 2 unreferenced object(s)" in proc.stderr
    store = ObjectStore(str(grit.db / "objects"), readonly=True)
    assert store.hashes() == {grit.export("x")[0][0]}
    store.close()
    assert grit.contents("x") == [b"keep\n"]
    assert "0 problem(s)" in grit("-db", "db", "-verify", check=0).stderr


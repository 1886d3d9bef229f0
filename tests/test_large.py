"""Large objects (1 MiB or more) are read-only files in the database, moved in
by rename: what a crash at each moment leaves, what $INPUT_FILE is for root,
for an ordinary user and on a filesystem with reflinks, what -verify and -gc
do with files, and an older database's large objects."""
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from conftest import GRIT, ROOT, Grit, mounts_under, processes_using, require_fuse, wait_for

SIZE = 3_000_000  # bytes of the large output: a file object, not an LMDB one
CONTENT = (b"grit\n" * (SIZE // 5 + 1))[:SIZE]
DIGEST = hashlib.sha256(CONTENT).hexdigest()

# The seed waits until grit has the file open (dir mode follows a large file
# while it is written; $PPID is grit), so the proof has something to prove.
PIPELINE = f'''
[[step]]
name = "big"
script = \'\'\'yes grit | head -c {SIZE} > $OUTPUT_DIR/big
if [ "$(basename $(dirname $OUTPUT_DIR))" != mnt ]; then
  until ls -l /proc/$PPID/fd 2>/dev/null | grep -q "/big$"; do sleep 0.05; done
fi\'\'\'
[[step]]
name = "sum"
inputs = ["big"]
script = "sha256sum < $INPUT_FILE | cut -c1-64 > $OUTPUT_DIR/sum"
'''

# Run grit with one of its functions made to kill grit (SIGKILL, as kill -9)
# before or after it runs: a crash at exactly that moment.
LAUNCHER = '''
import os, signal, sys
sys.path.insert(0, {root!r})
import grit
owner, name, when = {target!r}
original = getattr(getattr(grit, owner), name)
def crash(*args, **kwargs):
    if when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(getattr(grit, owner), name, crash)
sys.exit(grit.main(sys.argv[1:]))
'''

MOMENTS = {  # moment -> (function, when, objects a crash there leaves unnamed)
    "during the proof": ("_Followed", "proven", "before", 0),
    "before the rename": ("ObjectStore", "adopt", "before", 0),
    "after the rename": ("ObjectStore", "adopt", "after", 1),
    "before the metadata commit": ("Database", "record", "after", 1),
}


def files(grit) -> list[str]:
    return sorted(os.listdir(grit.db / "files"))


# FUSE mode has no proof: the server hashed every write in order.
@pytest.mark.parametrize("mode,moment", [(mode, moment) for moment in MOMENTS
                                         for mode in ("fuse", "dir")
                                         if (mode, MOMENTS[moment][0]) != ("fuse", "_Followed")])
def test_kill_9_at_each_moment_leaves_the_object_whole_or_absent(grit, mode, moment):
    owner, name, when, orphans = MOMENTS[moment]
    output_mode = mode
    if mode == "fuse":
        require_fuse()
    grit.write(PIPELINE)
    launcher = LAUNCHER.format(root=str(ROOT), target=(owner, name, when))
    proc = subprocess.run([sys.executable, "-c", launcher, "-manifest", str(grit.manifest),
                           "-db", str(grit.db), "-run", "-output-mode", output_mode],
                          cwd=grit.path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify", check=0).stderr
    assert not grit.has("big")  # nothing was recorded
    assert files(grit) == [DIGEST] * orphans  # whole, under its hash, or absent
    gc = grit("-db", str(grit.db), "-gc", check=0).stderr
    assert f"removed {orphans} unreferenced object(s)" in gc, gc
    grit.run("-output-mode", output_mode)
    assert grit.contents("big") == [CONTENT]
    assert grit.contents("sum") == [DIGEST.encode() + b"\n"]
    assert files(grit) == [DIGEST] and not list((grit.db / "tmp").glob("**/big"))
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify", check=0).stderr


# A script writing into its $INPUT_FILE in place, three ways; each write
# that is refused is counted.
VANDAL = '''
[[step]]
name = "vandal"
inputs = ["big"]
script = \'\'\'
filefrag -v "$INPUT_FILE" 2>/dev/null | grep -c shared > $OUTPUT_DIR/shared || true
stat -f -c %T "$INPUT_FILE" > $OUTPUT_DIR/fstype
n=0
printf XXXX | dd of="$INPUT_FILE" conv=notrunc 2>/dev/null || n=$((n+1))
truncate -s 10 "$INPUT_FILE" 2>/dev/null || n=$((n+1))
echo more 2>/dev/null >> "$INPUT_FILE" || n=$((n+1))
sed -i s/grit/GRIT/ "$INPUT_FILE" && rm "$INPUT_FILE" || n=$((n+10))  # replacing it works
echo $n > $OUTPUT_DIR/refused
\'\'\'
'''


def vandalise(grit: Grit, mode: str, python: str = sys.executable, user: str = "") -> int:
    """Run the pipeline and the vandal, then check the store is untouched and
    a later reader gets the original bytes; returns how many writes were refused."""
    prefix = ["runuser", "-u", user, "--"] if user else []

    def run(*args):
        proc = subprocess.run([*prefix, python, GRIT if not user else str(grit.path / "grit.py"),
                               *args], cwd=grit.path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc
    grit.write(PIPELINE.replace("name = \"sum\"", "name = \"first\"") + VANDAL)
    run("-manifest", str(grit.manifest), "-db", str(grit.db), "-run", "-output-mode", mode)
    grit.write(PIPELINE + VANDAL)  # "sum" is new: it reads the input after the vandal
    run("-manifest", str(grit.manifest), "-db", str(grit.db), "-run", "-output-mode", mode)
    assert "0 problem(s)" in run("-db", str(grit.db), "-verify").stderr
    assert grit.contents("big") == [CONTENT] and grit.contents("sum") == [DIGEST.encode() + b"\n"]
    [refused] = grit.contents("refused")
    return int(refused)


def can_mount() -> bool:
    """Whether this process may mount (root with CAP_SYS_ADMIN, not in a locked container)."""
    with tempfile.TemporaryDirectory() as d:
        if subprocess.run(["mount", "-t", "tmpfs", "none", d], capture_output=True).returncode:
            return False
        subprocess.run(["umount", d], check=True)
        return True


def test_writing_into_input_file_as_root_lands_in_a_private_copy(grit, output_mode):
    if os.geteuid() != 0:
        pytest.skip("runs as root: grit runs as an ordinary user here (the next test covers it)")
    assert vandalise(grit, output_mode) == 0  # root's writes succeed, into its own copy
    # on a filesystem without reflinks, an overlay's upper layer takes them (else a copy)
    [fstype] = grit.contents("fstype")
    assert fstype.strip() == (b"overlayfs" if can_mount() else fstype.strip())
    assert not [m for m in mounts_under(grit.db)]


def test_a_run_killed_with_an_input_overlay_mounted_leaves_nothing_behind(grit, tmp_path):
    if os.geteuid() != 0 or not can_mount():
        pytest.skip("root's $INPUT_FILE overlay needs root allowed to mount")
    started = tmp_path / "started"
    grit.write(PIPELINE.replace("sha256sum < $INPUT_FILE", f"touch {started}; sleep 60; cat"))
    proc = grit.popen("-output-mode", "dir")
    assert wait_for(started.exists, timeout=60)
    assert [m for m in mounts_under(grit.db) if m.endswith("/in")]  # the overlay
    proc.kill()
    proc.wait()
    for pid in processes_using(grit.path):  # the script's sleep
        os.kill(pid, 9)
    grit.write(PIPELINE)
    grit.run("-output-mode", "dir")
    assert not mounts_under(grit.db)
    assert grit.contents("sum") == [DIGEST.encode() + b"\n"]
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify").stderr


OTHER = "grit-test-other"


@pytest.fixture(scope="module")
def other_python():
    """An ordinary user, and an interpreter with grit's dependencies it may
    run: this one, or a venv of the system's python3 made for it."""
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("needs root (to create an ordinary user) and runuser")
    if subprocess.run(["id", OTHER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", OTHER], check=True)
    probe = ["runuser", "-u", OTHER, "--", sys.executable, "-c", "import lmdb"]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return sys.executable
    venv = "/tmp/grit-test-other-venv"  # this interpreter lives where the user cannot go
    if not os.path.exists(f"{venv}/bin/python"):
        subprocess.run(["/usr/bin/python3", "-m", "venv", venv], check=True)
        subprocess.run([f"{venv}/bin/pip", "install", "-q", "--disable-pip-version-check",
                        "-r", str(ROOT / "requirements.txt")], check=True)
    return f"{venv}/bin/python"


@pytest.fixture
def own_dir():
    """A working directory of the ordinary user's (pytest's own is root's)."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="grit-large-"))
    shutil.copy(GRIT, path / "grit.py")
    subprocess.run(["chown", "-R", f"{OTHER}:", str(path)], check=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_writing_into_input_file_as_an_ordinary_user_fails(other_python, own_dir):
    """dir mode: $INPUT_FILE is made the same way in both modes, and an
    ordinary user's FUSE needs /dev/fuse open to all, which it is not everywhere."""
    grit = Grit(own_dir)
    # a read-only hard link to the object: each of the three writes is refused
    assert vandalise(grit, "dir", other_python, OTHER) == 3
    [object_file] = (grit.db / "files").iterdir()
    assert object_file.stat().st_mode & 0o777 == 0o444


@pytest.fixture(scope="module")
def xfs():
    """A loop-mounted XFS image: a filesystem whose files can share blocks."""
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
        if os.environ.get("CI"):
            pytest.fail("CI needs root and mkfs.xfs (tests/bootstrap.sh installs xfsprogs)")
        pytest.skip("needs root and mkfs.xfs (xfsprogs) to loop-mount an XFS image")
    work = Path(tempfile.mkdtemp(prefix="grit-xfs-"))
    image, mount = work / "image", work / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(400 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        shutil.rmtree(work)
        pytest.skip(f"loop devices cannot be used here: {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
    shutil.rmtree(work)


def test_on_a_reflink_filesystem_input_file_shares_the_objects_blocks(xfs, output_mode):
    work = xfs / output_mode
    work.mkdir()
    grit = Grit(work)
    assert vandalise(grit, output_mode) == 0  # root writes into its own reflinked copy
    assert int(grit.contents("shared")[0]) >= 1  # filefrag: the copy's extents are shared


def test_verify_names_a_damaged_or_missing_object_file(grit):
    grit.write(PIPELINE)
    grit.run()
    path = grit.db / "files" / DIGEST
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.write(b"X")
    proc = grit("-db", str(grit.db), "-verify", check=1)
    assert f"object {DIGEST} does not match its hash (content damaged) ({path})" in proc.stderr
    path.unlink()
    proc = grit("-db", str(grit.db), "-verify", check=1)
    assert f"object {DIGEST} is missing from the object store" in proc.stderr


def test_gc_removes_files_nothing_names(grit):
    grit.write(PIPELINE)
    grit.run()
    (grit.db / "files" / ".new-k3j2x9").write_bytes(b"half a copy")  # a copy cut short
    (grit.db / "files" / ("ab" * 32)).write_bytes(b"x" * SIZE)      # an unrecorded output
    assert "removed 2 unreferenced object(s)" in grit("-db", str(grit.db), "-gc").stderr
    assert files(grit) == [DIGEST]
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify").stderr


def test_gc_retired_removes_the_file_of_a_superseded_output(grit):
    grit.write(PIPELINE)
    grit.run()
    grit.write(PIPELINE.replace("yes grit", "yes tirg"))  # a new version: new content
    grit.run()
    assert len(files(grit)) == 2
    gc = grit("-db", str(grit.db), "-gc", "-retired").stderr
    # the old big (a file) and its sum (in LMDB)
    assert "removed 2 unreferenced object(s)" in gc, gc
    assert files(grit) != [DIGEST] and len(files(grit)) == 1
    assert grit.contents("big") == [(b"tirg\n" * (SIZE // 5 + 1))[:SIZE]]
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify").stderr


def test_an_output_still_written_by_a_leftover_process_is_copied_in(grit, tmp_path):
    """A process the script started outside its process group keeps the file
    open and writes on after the task: the store holds what was there when
    the task ended, and the late write never reaches it."""
    go = tmp_path / "go"
    grit.write(f'''
[[step]]
name = "big"
script = \'\'\'yes grit | head -c {SIZE} > $OUTPUT_DIR/big
setsid sh -c 'exec 3>>"$0"; touch {go}.away; while [ ! -e {go} ]; do sleep 0.05; done; echo late >&3; touch {go}.done' $OUTPUT_DIR/big &
until [ -e {go}.away ]; do sleep 0.05; done
\'\'\'
''')
    grit.run("-output-mode", "dir")
    go.touch()
    assert wait_for(Path(f"{go}.done").exists, timeout=30)
    assert grit.contents("big") == [CONTENT]
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify").stderr


def test_an_older_databases_large_objects_stay_readable(grit, tmp_path):
    """Schema 7 kept a large object in LMDB, its chunks under a random key its
    header names: after the upgrade it is exported, verified, read by a new
    step as $INPUT_FILE and by a gather step, and kept by -gc."""
    grit.write(PIPELINE)
    grit.run("-output-mode", "dir")
    # turn the database into schema 7's form: the object back into LMDB
    sys.path.insert(0, str(ROOT))
    import grit as module
    store = module.ObjectStore(str(grit.db / "objects"))
    key = os.urandom(32)
    chunks = [CONTENT[i:i + module.CHUNK_SIZE] for i in range(0, SIZE, module.CHUNK_SIZE)]
    with store.env.begin(write=True) as txn:
        for i, chunk in enumerate(chunks):
            txn.put(key + i.to_bytes(4, "big"), chunk, db=store._chunks)
        txn.put(bytes.fromhex(DIGEST), module.WRITTEN_HEADER.pack(SIZE, len(chunks), key),
                db=store._objects)
    store.close()
    (grit.db / "files" / DIGEST).unlink()
    (grit.db / "files").rmdir()
    db = sqlite3.connect(grit.db / "metadata.sqlite")
    undo_10 = ["DROP TABLE run"] + [  # schema 10's SQL
        f"ALTER TABLE task DROP COLUMN {column}" for column in
        ("run_id", "cpu_user", "cpu_system", "peak_rss", "rss_under", "node")]
    for undo in (*undo_10, "DROP INDEX attempt_task", "DROP TABLE attempt",  # schema 9's
                 "ALTER TABLE slurm_job DROP COLUMN looked_at"):
        db.execute(undo)
    db.execute("PRAGMA user_version = 7")
    db.commit()
    db.close()
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify").stderr
    assert grit.contents("big") == [CONTENT]
    grit.write(PIPELINE + '''
[[step]]
name = "again"
inputs = ["big"]
script = "wc -c < $INPUT_FILE > $OUTPUT_DIR/size"
[[step]]
name = "all"
inputs = ["big", "sum"]
gather = true
script = "cat $INPUT_DIR/big | sha256sum | cut -c1-64 > $OUTPUT_DIR/again-sum"
''')
    grit.run("-output-mode", "dir")
    assert grit.contents("size") == [f"{SIZE}\n".encode()]
    assert grit.contents("again-sum") == [DIGEST.encode() + b"\n"]
    assert "removed 0 unreferenced object(s)" in grit("-db", str(grit.db), "-gc").stderr
    grit("-db", str(grit.db), "-export-tar", "big", str(tmp_path / "big.tar"), "-newest", check=0)
    with tarfile.open(tmp_path / "big.tar") as tar:
        assert tar.extractfile(tar.getmembers()[0]).read() == CONTENT
    assert grit.sql("PRAGMA user_version") == [(10,)]

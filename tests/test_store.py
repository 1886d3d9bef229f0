"""Unit tests of the pure parts: names, and the object store's four verbs."""
import hashlib
import os

import pytest

import grit
from grit import ObjectStore, matches_inputs, resource_name_problem


@pytest.mark.parametrize("name", ["a", "a/b", "part-aa", "x.y_z-1", "é", "a b"])
def test_valid_names(name):
    assert resource_name_problem(name) is None


@pytest.mark.parametrize("name,problem", [
    ("", "is empty"), ("/etc/passwd", "is absolute"), ("a//b", "empty path segment"),
    ("a/../b", '".." segment'), ("./a", '"." segment'), ("a\nb", "control character"),
    ("a\x00b", "control character"), ("x*", "pattern characters"), ("x?", "pattern"),
    ("[x", "pattern"), ("a" * 256, "longer than 255 bytes"), ("a/", "empty path segment"),
    ("bad\udcff", "not valid UTF-8"),
])
def test_invalid_names(name, problem):
    assert problem in resource_name_problem(name)


def test_input_matching():
    assert matches_inputs("part-aa", ["part-*"])
    assert matches_inputs("logs/x.txt", ["logs/*.txt"])
    assert not matches_inputs("Part-aa", ["part-*"])
    assert matches_inputs("a[1]", ["a[[]1]"])
    assert not matches_inputs("dataset-v10", ["dataset-v1"])


@pytest.fixture
def store(tmp_path):
    s = ObjectStore(str(tmp_path / "objects"))
    yield s
    s.close()


def test_put_open_has_delete_roundtrip(store, tmp_path):
    data = os.urandom(3 * grit.CHUNK_SIZE + 17)  # four chunks in LMDB
    path = tmp_path / "f"
    path.write_bytes(data)
    digest, size = store.put_file(str(path))
    assert digest == hashlib.sha256(data).hexdigest() and size == len(data)
    assert store.has(digest) and not os.listdir(store.files)
    assert b"".join(store.open(digest)) == data
    assert store.read(digest, grit.CHUNK_SIZE - 2, 5) == data[grit.CHUNK_SIZE - 2:][:5]
    store.delete(digest)
    assert not store.has(digest)
    with pytest.raises(KeyError):
        store.open(digest)


def test_identical_content_is_stored_once(store, tmp_path):
    (tmp_path / "a").write_bytes(b"same" * 100000)
    (tmp_path / "b").write_bytes(b"same" * 100000)
    first = store.put_file(str(tmp_path / "a"))
    used = store.env.info()["last_pgno"]
    assert store.put_file(str(tmp_path / "b")) == first
    assert store.env.info()["last_pgno"] == used


def test_a_large_object_is_a_read_only_file_named_by_its_hash(store, tmp_path):
    """1 MiB or more: copied in (the source stays) or moved in (the file
    becomes the object); a second copy of the same bytes leaves nothing behind."""
    data = os.urandom(5 * (1 << 20) + 3)
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(data)
    digest, size = store.put_file(str(tmp_path / "a"))
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert (tmp_path / "a").exists()  # copied
    assert store.put_file(str(tmp_path / "b"), move=True) == (digest, size)
    assert not (tmp_path / "b").exists()  # moved, or dropped as a duplicate
    path = os.path.join(store.files, digest)
    assert os.listdir(store.files) == [digest] and os.stat(path).st_mode & 0o777 == 0o444
    assert b"".join(store.open(digest)) == data and store.check(digest) is None
    assert store.size(digest) == len(data)
    assert store.read(digest, (1 << 20) - 2, 5) == data[(1 << 20) - 2:][:5]
    assert store.hashes() == {digest}
    store.delete(digest)
    assert store.hashes() == set() and not store.has(digest)


def test_place_puts_a_large_object_where_writing_cannot_change_it(store, tmp_path):
    data = os.urandom(2 << 20)
    digest, _ = store.put(data)
    target = tmp_path / "input"
    target.write_bytes(b"the last task's input")
    assert store.place(digest, str(target)) and target.read_bytes() == data
    if os.geteuid() == 0 and store.placing == "copy":  # root on a filesystem without reflinks
        assert os.stat(target).st_ino != os.stat(os.path.join(store.files, digest)).st_ino
    small, _ = store.put(b"small")
    assert not store.place(small, str(target))  # small objects are written out by the caller
    with open(target, "r+b") as f:  # whatever the form: a write into it never reaches the store
        f.write(b"changed")
    assert store.check(digest) is None


def test_what_a_crash_leaves_is_listed_and_deleted(store, tmp_path):
    """What a run killed mid-copy leaves in files/, and the chunks of an older
    grit's write cut short: gc finds both and removes them."""
    digest, _ = store.put(b"k" * (2 * grit.CHUNK_SIZE))
    (tmp_path / "files" / ".new-x1y2").write_bytes(b"half a copy")
    orphan_key = os.urandom(32)
    with store.env.begin(write=True) as txn:
        txn.put(orphan_key + b"\0\0\0\0", b"half", db=store._chunks)
    assert store.hashes() == {digest, ".new-x1y2", orphan_key.hex()}
    store.delete(".new-x1y2")
    store.delete(orphan_key.hex())
    assert store.hashes() == {digest} and store.check(digest) is None


def test_an_older_grits_large_object_stays_readable(store):
    """Schema 7 wrote a large object into LMDB under a random key, named by a
    longer header; it is read, checked and deleted like any other."""
    data = os.urandom(3 * grit.CHUNK_SIZE + 5)
    digest, key = hashlib.sha256(data).digest(), os.urandom(32)
    chunks = [data[i:i + grit.CHUNK_SIZE] for i in range(0, len(data), grit.CHUNK_SIZE)]
    with store.env.begin(write=True) as txn:
        for i, chunk in enumerate(chunks):
            txn.put(key + i.to_bytes(4, "big"), chunk, db=store._chunks)
        txn.put(digest, grit.WRITTEN_HEADER.pack(len(data), len(chunks), key), db=store._objects)
    assert b"".join(store.open(digest.hex())) == data and store.check(digest.hex()) is None
    assert store.hashes() == {digest.hex()}
    store.delete(digest.hex())
    assert store.hashes() == set()


def test_map_grows_when_full(tmp_path, monkeypatch):
    monkeypatch.setattr(grit, "INITIAL_MAP_SIZE", 1 << 20)
    store = ObjectStore(str(tmp_path / "objects"))
    digests = [store.put(os.urandom(3 * grit.CHUNK_SIZE))[0] for _ in range(8)]
    assert store.env.info()["map_size"] > 5 << 20
    assert all(hashlib.sha256(b"".join(store.open(d))).hexdigest() == d for d in digests)
    store.close()


def test_empty_object(store, tmp_path):
    (tmp_path / "e").write_bytes(b"")
    digest, size = store.put_file(str(tmp_path / "e"))
    assert size == 0 and b"".join(store.open(digest)) == b""


MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime - ext4 /dev/vda1 rw
40 27 0:50 / /home rw,relatime shared:7 - nfs4 server:/home rw,vers=4.2
41 40 0:51 / /home/ann/my\040data rw,relatime - ext4 /dev/vdb1 rw
42 27 0:52 / /scratch rw - lustre 10.0.0.1@tcp:/scratch rw
43 27 0:53 / /scratch rw - tmpfs tmpfs rw
""".splitlines()


def test_filesystem_type_of_a_path_is_its_deepest_latest_mount():
    from grit import NETWORK_FILESYSTEMS, filesystem_type, parse_mountinfo
    table = parse_mountinfo(MOUNTINFO)
    assert ("/home/ann/my data", "ext4") in table   # \040 is a space
    assert filesystem_type("/home/ann/db", table) == "nfs4"
    assert filesystem_type("/home/ann/my data/db", table) == "ext4"
    assert filesystem_type("/homework", table) == "ext4"   # not under /home
    assert filesystem_type("/scratch/x", table) == "tmpfs"  # mounted over lustre
    assert filesystem_type("/tmp/db", table) == "ext4"
    assert "nfs4" in NETWORK_FILESYSTEMS and "lustre" in NETWORK_FILESYSTEMS
    assert "ext4" not in NETWORK_FILESYSTEMS and "tmpfs" not in NETWORK_FILESYSTEMS

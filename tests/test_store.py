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
    data = os.urandom(3 * grit.CHUNK_SIZE + 17)
    path = tmp_path / "f"
    path.write_bytes(data)
    digest, size = store.put_file(str(path))
    assert digest == hashlib.sha256(data).hexdigest() and size == len(data)
    assert store.has(digest)
    assert b"".join(store.open(digest)) == data
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


def test_a_large_file_is_stored_in_one_pass_once(store, tmp_path):
    """Files of 1 MiB or more are hashed while written, under a key named by
    the hash at the end; a second copy of the same bytes leaves nothing behind."""
    data = os.urandom(5 * (1 << 20) + 3)
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(data)
    digest, size = store.put_file(str(tmp_path / "a"))
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert store.put_file(str(tmp_path / "b")) == (digest, size)
    assert b"".join(store.open(digest)) == data and store.check(digest) is None
    assert store.read(digest, grit.CHUNK_SIZE - 2, 5) == data[grit.CHUNK_SIZE - 2:][:5]
    assert store.hashes() == {digest}  # the duplicate's chunks are gone
    store.delete(digest)
    assert store.hashes() == set()


def test_chunks_no_object_names_are_listed_and_deleted(store):
    """What a run killed mid-write leaves: gc finds it by its key and removes it."""
    writer = store.writer()
    writer.append(os.urandom(3 * grit.CHUNK_SIZE))  # written, never adopted
    writer.finish()
    kept = store.writer()
    kept.append(b"k" * (2 * grit.CHUNK_SIZE))
    kept.finish()
    digest = hashlib.sha256(b"k" * (2 * grit.CHUNK_SIZE)).hexdigest()
    store.adopt(digest, 2 * grit.CHUNK_SIZE, kept.key, kept.count)
    assert store.hashes() == {digest, writer.key.hex()}
    store.delete(writer.key.hex())
    assert store.hashes() == {digest} and store.check(digest) is None


def test_map_grows_when_full(tmp_path, monkeypatch):
    monkeypatch.setattr(grit, "INITIAL_MAP_SIZE", 1 << 20)
    monkeypatch.setattr(grit, "TXN_BYTES", 1 << 19)
    monkeypatch.setattr(grit, "WRITER_TXN_BYTES", 1 << 19)
    store = ObjectStore(str(tmp_path / "objects"))
    data = os.urandom(5 << 20)
    (tmp_path / "big").write_bytes(data)
    digest, _ = store.put_file(str(tmp_path / "big"))
    assert store.env.info()["map_size"] > 5 << 20
    assert hashlib.sha256(b"".join(store.open(digest))).hexdigest() == digest
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

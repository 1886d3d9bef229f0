"""The write-only FUSE output filesystem: emission rules (SPEC 3), refusals,
big outputs, interrupts, stale mounts and the fallback (SPEC 6)."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import GRIT, mounts_under, processes_using, require_fuse, wait_for


@pytest.fixture(autouse=True)
def _needs_fuse():
    require_fuse()


@pytest.fixture(params=["3", "2"])
def libfuse(request, monkeypatch):
    """The emission rules hold on libfuse3 with the kernel's writeback cache (the
    default) and on the libfuse2 path (GRIT_LIBFUSE=2) alike."""
    monkeypatch.setenv("GRIT_LIBFUSE", request.param)
    return request.param


def emitted(grit, script, *extra):
    """Run a one-step pipeline in FUSE mode; {name: [contents, oldest first]}."""
    grit.write(f"[[step]]\nname = \"s\"\nscript = '''\n{script}\n'''\n")
    grit.run("-output-mode", "fuse", *extra)
    return {n: grit.contents(n) for n in grit.status()["resources"]["names"]}


# SPEC 3, "What a task emits", row by row.
SPEC_TABLE = [
    ('echo a > $OUTPUT_DIR/x', {"x": [b"a\n"]}),
    ('for i in 1 2 3; do echo $i > $OUTPUT_DIR/item; done', {"item": [b"1\n", b"2\n", b"3\n"]}),
    ('echo a > $OUTPUT_DIR/x; echo b >> $OUTPUT_DIR/x', {"x": [b"a\nb\n"]}),
    ('touch $OUTPUT_DIR/done', {"done": [b""]}),
    ('echo a > $OUTPUT_DIR/x; rm $OUTPUT_DIR/x', {}),
]


# The rest of SPEC 3's rules, and the decisions README records where it is silent.
MORE_RULES = [
    # truncated to zero after it was closed: emitted first, the name starts empty
    ('echo a > $OUTPUT_DIR/x; truncate -s 0 $OUTPUT_DIR/x; echo b >> $OUTPUT_DIR/x',
     {"x": [b"a\n", b"b\n"]}),
    # truncated while still open (and never closed in between): the content just changes
    ('python3 -c "import os; x = os.environ[\'OUTPUT_DIR\'] + \'/x\'; f = open(x, \'w\'); '
     'f.write(\'a\'); f.flush(); open(x, \'w\').write(\'b\')"', {"x": [b"b"]}),
    # re-creating a name whose pending content is empty emits nothing
    (': > $OUTPUT_DIR/x; echo a >> $OUTPUT_DIR/x', {"x": [b"a\n"]}),
    # the same content twice is one resource: (name, hash) is unique
    ('for i in 1 2; do echo same > $OUTPUT_DIR/x; done', {"x": [b"same\n"]}),
    # rewritten, then removed: the closed first content was already emitted
    ('echo a > $OUTPUT_DIR/x; echo b > $OUTPUT_DIR/x; rm $OUTPUT_DIR/x', {"x": [b"a\n"]}),
    # a name held open by `exec 3>`: each `>&3` closes a duplicate (a flush, as a close
    # is), and writing on through fd 3 extends the same content
    ('exec 3> $OUTPUT_DIR/x; echo a >&3; echo b >&3; exec 3>&-', {"x": [b"a\nb\n"]}),
]


@pytest.mark.parametrize("script,expected", SPEC_TABLE + MORE_RULES)
def test_spec_emission_table(libfuse, grit, script, expected):
    assert emitted(grit, script) == expected


def test_split_fans_out(libfuse, grit, tmp_path):
    (tmp_path / "lines").write_text("".join(f"{i}\n" for i in range(250)))
    out = emitted(grit, f'split -l 100 "{tmp_path}/lines" $OUTPUT_DIR/part-')
    assert sorted(out) == ["part-aa", "part-ab", "part-ac"]
    assert out["part-ac"][0].count(b"\n") == 50


def test_rename_subdirectories_and_truncate(libfuse, grit):
    out = emitted(grit, '''
for i in 1 2; do echo "v$i" > $OUTPUT_DIR/tmp; mv $OUTPUT_DIR/tmp $OUTPUT_DIR/atomic; done
mkdir -p $OUTPUT_DIR/a/b && echo deep > $OUTPUT_DIR/a/b/c
mkdir $OUTPUT_DIR/d1 && echo moved > $OUTPUT_DIR/d1/f && mv $OUTPUT_DIR/d1 $OUTPUT_DIR/d2
echo 0123456789 > $OUTPUT_DIR/cut; truncate -s 4 $OUTPUT_DIR/cut
printf b | dd of=$OUTPUT_DIR/ooo bs=1 seek=5 conv=notrunc 2>/dev/null
printf aaaaa | dd of=$OUTPUT_DIR/ooo conv=notrunc 2>/dev/null
''')
    assert out == {"atomic": [b"v1\n", b"v2\n"], "a/b/c": [b"deep\n"], "d2/f": [b"moved\n"],
                   "cut": [b"0123"], "ooo": [b"aaaaab"]}
    digest = grit.export("ooo")[0][0]
    assert digest == hashlib.sha256(b"aaaaab").hexdigest()  # re-hashed after out-of-order writes


def test_concurrent_writers_on_one_file(libfuse, grit):
    """Two processes share one file description; each echo is one write()."""
    out = emitted(grit, 'w() { i=$1; while [ $i -le $2 ]; do echo $i; i=$((i+1)); done; }\n'
                        '(w 1 1500 & w 1501 3000 & wait) > $OUTPUT_DIR/both\n'
                        '(w 1 500 & w 501 1000 & wait) | tee -a $OUTPUT_DIR/tee > /dev/null')
    assert sorted(map(int, out["both"][0].split())) == list(range(1, 3001))
    assert sorted(map(int, out["tee"][0].split())) == list(range(1, 1001))


def test_spilled_content_is_exact(libfuse, grit):
    data = b"".join(b"%07d\n" % i for i in range(200_000))  # 1.6 MB: spills to disk
    out = emitted(grit, "seq -f '%07g' 0 199999 > $OUTPUT_DIR/big")
    assert out["big"] == [data]


# Large contents (past the 256 KiB kept in memory) go into the object store as
# they arrive, in order; out-of-order changes fall back to storing the spool
# file. Either way every row must hold, and nothing may be left behind in LMDB.
def mib(n, char):
    return f"head -c {n}M /dev/zero | tr '\\0' {char}"


BIG_RULES = [
    (f'{mib(3, "a")} > $OUTPUT_DIR/x', {"x": [b"a" * (3 << 20)]}),
    (f'for i in 1 2; do {mib(1, "$i")} > $OUTPUT_DIR/x; done',
     {"x": [b"1" * (1 << 20), b"2" * (1 << 20)]}),
    (f'{mib(1, "a")} > $OUTPUT_DIR/x; {mib(1, "b")} >> $OUTPUT_DIR/x',
     {"x": [b"a" * (1 << 20) + b"b" * (1 << 20)]}),
    # overwritten in place, and cut (not to zero) after close
    (f'{mib(2, "a")} > $OUTPUT_DIR/x; printf XY | dd of=$OUTPUT_DIR/x bs=1 seek=1000 '
     f'conv=notrunc 2>/dev/null; {mib(2, "c")} > $OUTPUT_DIR/y; truncate -s 1M $OUTPUT_DIR/y',
     {"x": [b"a" * 1000 + b"XY" + b"a" * ((2 << 20) - 1002)], "y": [b"c" * (1 << 20)]}),
    (f'{mib(1, "a")} > $OUTPUT_DIR/x; truncate -s 0 $OUTPUT_DIR/x; {mib(1, "b")} >> $OUTPUT_DIR/x',
     {"x": [b"a" * (1 << 20), b"b" * (1 << 20)]}),
    # the same content under two names (and twice under one) is one object
    (f'for n in x y x; do {mib(2, "s")} > $OUTPUT_DIR/$n; done',
     {"x": [b"s" * (2 << 20)], "y": [b"s" * (2 << 20)]}),
    (f'{mib(1, "a")} > $OUTPUT_DIR/x; {mib(1, "b")} > $OUTPUT_DIR/x; rm $OUTPUT_DIR/x; '
     f'{mib(1, "d")} > $OUTPUT_DIR/gone; rm $OUTPUT_DIR/gone', {"x": [b"a" * (1 << 20)]}),
]


@pytest.mark.parametrize("script,expected", BIG_RULES)
def test_large_contents_follow_the_same_rules_and_leave_nothing_behind(libfuse, grit, script,
                                                                         expected):
    assert emitted(grit, script) == expected
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify").stderr
    gc = grit("-db", str(grit.db), "-gc").stderr
    assert "removed 0 unreferenced object(s)" in gc, gc


def test_large_output_of_a_killed_run_leaves_nothing_in_the_store(grit, tmp_path):
    """kill -9 while a large output is half written: its bytes are in the spool
    file only, which the next run's fresh scratch space drops; the store
    holds nothing of it and the rerun stores the output."""
    marker = tmp_path / "written"
    grit.write(f"""[[step]]\nname = "s"\nscript = '''exec 3> $OUTPUT_DIR/big; {mib(48, "z")} >&3
sync $OUTPUT_DIR/big; touch {marker}; sleep 60'''\n""")
    proc = grit.popen("-output-mode", "fuse")
    assert wait_for(marker.exists, timeout=60)
    proc.kill()
    proc.wait()
    for pid in processes_using(tmp_path):  # the script's sleep
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not mounts_under(grit.db), timeout=10)
    assert os.listdir(grit.db / "files") == []
    assert "removed 0 unreferenced object(s)" in grit("-db", str(grit.db), "-gc").stderr
    grit.write(f"[[step]]\nname = \"s\"\nscript = '''{mib(48, 'z')} > $OUTPUT_DIR/big'''\n")
    grit.run("-output-mode", "fuse")
    assert grit.contents("big") == [b"z" * (48 << 20)]
    assert len(os.listdir(grit.db / "files")) == 1 and not list((grit.db / "tmp").rglob("*"))


def test_output_dir_is_write_only(libfuse, grit):
    grit.write('''
[[step]]
name = "s"
script = \'\'\'
echo secret > $OUTPUT_DIR/x
ls $OUTPUT_DIR 2> $OUTPUT_DIR/ls-error || echo refused > $OUTPUT_DIR/ls
cat $OUTPUT_DIR/x 2> /dev/null || echo refused > $OUTPUT_DIR/cat
ls $(dirname $OUTPUT_DIR) 2>/dev/null || echo refused > $OUTPUT_DIR/root
mkdir $(dirname $OUTPUT_DIR)/sibling 2>/dev/null || echo refused > $OUTPUT_DIR/mkdir-root
grep " $(dirname $OUTPUT_DIR) " /proc/self/mountinfo > $OUTPUT_DIR/mountinfo
\'\'\'
''')
    grit.run("-output-mode", "fuse")
    for name in ("ls", "cat", "root", "mkdir-root"):
        assert grit.contents(name) == [b"refused\n"], name
    assert b"Permission denied" in grit.contents("ls-error")[0]
    mountinfo = grit.contents("mountinfo")[0].decode()
    assert "fuse.grit" in mountinfo and "allow_other" not in mountinfo
    assert grit.contents("x") == [b"secret\n"]


def test_everyday_tools_can_write_into_the_output_directory(libfuse, grit, tmp_path):
    """Tools that open directories (tar -C), copy attributes (cp -p, mv from
    another filesystem), use sendfile (shutil.copy), or write a temporary name
    and rename it (rsync, sort -o) all work on the write-only filesystem."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_text("a\n")
    (src / "sub" / "b").write_text("b\n")
    subprocess.run(["tar", "-cf", str(tmp_path / "src.tar"), "-C", str(src), "."], check=True)
    data = "".join(f"{i}\n" for i in range(1000))
    (tmp_path / "data").write_text(data)
    d = tmp_path / "data"
    out = emitted(grit, f'''
set -e
mkdir $OUTPUT_DIR/untar && tar -xf {tmp_path}/src.tar -C $OUTPUT_DIR/untar
cp -p {d} $OUTPUT_DIR/cp
cp {d} $OUTPUT_DIR/../$(basename $OUTPUT_DIR)/cp-dotdot
cp {d} {tmp_path}/moved && mv {tmp_path}/moved $OUTPUT_DIR/mv
python3 -c "import shutil, os; shutil.copy2('{d}', os.environ['OUTPUT_DIR'] + '/copy2')"
sort -n -r -o $OUTPUT_DIR/sorted {d}
install -m 644 {d} $OUTPUT_DIR/installed
gzip -c {d} > $OUTPUT_DIR/data.gz
{f"rsync -a {src}/ $OUTPUT_DIR/rsynced/" if shutil.which("rsync") else ""}
''')
    same = [data.encode()]
    for tree in ("untar", "rsynced") if shutil.which("rsync") else ("untar",):
        assert out.pop(f"{tree}/a") == [b"a\n"] and out.pop(f"{tree}/sub/b") == [b"b\n"]
    assert out.pop("sorted") == ["".join(f"{i}\n" for i in reversed(range(1000))).encode()]
    assert len(out.pop("data.gz")[0]) > 0
    assert out == {name: same for name in ("cp", "cp-dotdot", "mv", "copy2", "installed")}


def test_the_mode_in_use_is_named_and_read_write_descriptors_read_back(libfuse, grit):
    """Write-only means: listing and opening for reading only fail; a descriptor
    opened read-write reads back what the task wrote through it (the writeback
    cache makes every write-only open read-write in the kernel anyway)."""
    grit.write('''
[[step]]
name = "s"
script = \'\'\'
python3 - <<'PY'
import os
out = os.environ["OUTPUT_DIR"]
with open(out + "/rw", "w+b") as f:
    f.write(b"0123456789" * 1000)
    f.seek(4096)
    got = f.read(6)
    f.seek(5)
    f.write(b"XY")
try:
    open(out + "/rw", "rb")
    refused = "no"
except PermissionError:
    refused = "yes"
with open(out + "/report", "w") as f:
    f.write(f"{got.decode()} {refused}")
PY
\'\'\'
''')
    proc = grit.run("-output-mode", "fuse", "-verbose")
    expected = {"3": "fuse (libfuse3, writeback cache)", "2": "fuse (libfuse2, no writeback cache)"}
    assert f"output mode: {expected[libfuse]}, mounted at" in proc.stderr
    assert grit.contents("report") == [b"678901 yes"]
    data = bytearray(b"0123456789" * 1000)
    data[5:7] = b"XY"
    assert grit.contents("rw") == [bytes(data)]


def test_a_failure_after_reading_back_an_output_says_why(grit):
    grit.write('''
[[step]]
name = "reads"
script = "echo a > $OUTPUT_DIR/x; sort $OUTPUT_DIR/x > $OUTPUT_DIR/y"
[[step]]
name = "copes"
script = "echo a > $OUTPUT_DIR/z; cat $OUTPUT_DIR/z 2>/dev/null || echo fine > $OUTPUT_DIR/z2"
''')
    proc = grit.run("-output-mode", "fuse", check=1)
    [failure] = [line for line in proc.stderr.splitlines() if "failed:" in line]
    assert failure.startswith('grit: error: task 1 (reads) failed: the script tried to read "x" '
                              'back, but $OUTPUT_DIR is write-only (-output-mode dir allows it) '
                              '(exit status 2: sort: ')
    assert grit.contents("z2") == [b"fine\n"]  # a refused read that the script handles is fine


def test_fan_out_by_rewrite_feeds_parallel_downstream(grit, tmp_path):
    running = tmp_path / "running"
    running.mkdir()
    grit.write(f"""
[[step]]
name = "seed"
script = "for i in $(seq 1 20); do echo $i > $OUTPUT_DIR/n; done"
[[step]]
name = "square"
inputs = ["n"]
parallel = 4
script = '''
n=$(cat $INPUT_FILE)
touch {running}/$n
for i in $(seq 1 100); do [ $(ls {running} | wc -l) -ge 2 ] && break; sleep 0.05; done
echo $(ls {running} | wc -l) > $OUTPUT_DIR/seen
echo $((n*n)) > $OUTPUT_DIR/sq
rm {running}/$n
'''
""")
    grit.run("-output-mode", "fuse", "-parallel", "4")
    assert sorted(int(c) for c in grit.contents("sq")) == [i * i for i in range(1, 21)]
    # squares ran side by side: some saw another one running (marker files, not wall time)
    assert max(int(c) for c in grit.contents("seen")) >= 2


def test_bad_names_are_refused_with_a_message(grit):
    grit.write('''
[[step]]
name = "s"
script = 'echo a > "$OUTPUT_DIR/star*" || true; echo ok > $OUTPUT_DIR/ok'
''')
    proc = grit.run("-output-mode", "fuse", check=1)
    assert "output name 'star*' contains one of * ? [" in proc.stderr
    assert not grit.has("ok")


def test_script_killed_mid_write_leaves_no_resource(grit):
    grit.write('''
[[step]]
name = "s"
script = 'yes data > $OUTPUT_DIR/stream & sleep 0.5; kill -9 $$'
''')
    proc = grit.run("-output-mode", "fuse", check=1)
    assert "killed by SIGKILL" in proc.stderr
    assert grit.status()["resources"]["count"] == 0


def test_background_writer_fails_the_task_not_the_run(grit):
    grit.write('''
[[step]]
name = "s"
script = 'setsid sh -c "exec 3> $OUTPUT_DIR/late; sleep 4" & sleep 0.3; echo x > $OUTPUT_DIR/x'
[[step]]
name = "other"
script = 'echo fine > $OUTPUT_DIR/fine'
''')
    proc = grit.run("-output-mode", "fuse", check=1)
    assert "still open 2 s after the script exited" in proc.stderr
    assert grit.has("fine") and not grit.has("x")


def test_ctrl_c_during_writes_leaves_no_mount_or_process(grit):
    grit.write('''
[[step]]
name = "s"
script = "for i in 1 2 3 4; do echo $i > $OUTPUT_DIR/n-$i; done"
[[step]]
name = "w"
inputs = ["n-*"]
script = 'while :; do echo data; done > $OUTPUT_DIR/stream'
''')
    proc = grit.popen("-output-mode", "fuse", "-parallel", "3")
    assert wait_for(lambda: grit.has("n-4"))
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130, err
    time.sleep(0.2)
    assert mounts_under(grit.db) == []
    assert processes_using(grit.path) == []
    assert grit.count("stream") == 0


def test_a_stray_sigterm_to_the_fuse_server_does_not_fail_a_running_task(grit, tmp_path):
    """Slurm's scancel signals every process of a job, the FUSE server among
    them: it stays mounted until grit tells it to go, so a script writing
    then does not fail with "Directory nonexistent" (a task failure that
    looked real to the next run)."""
    started, go = tmp_path / "started", tmp_path / "go"
    grit.write(f"""[[step]]\nname = "s"\nscript = '''touch {started}
while [ ! -e {go} ]; do sleep 0.05; done; echo done > $OUTPUT_DIR/x'''\n""")
    proc = grit.popen("-output-mode", "fuse")
    assert wait_for(started.exists, timeout=60)
    cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read()
    [server] = [pid for pid in processes_using(tmp_path)  # forked from grit, not exec'd
                if pid != proc.pid and open(f"/proc/{pid}/cmdline", "rb").read() == cmdline]
    os.kill(server, signal.SIGTERM)
    assert not wait_for(lambda: not mounts_under(grit.db), timeout=1)  # still mounted
    go.touch()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert grit.contents("x") == [b"done\n"]
    assert mounts_under(grit.db) == [] and processes_using(tmp_path) == []


def test_kill_9_then_next_run_cleans_up_and_resumes(grit):
    grit.write('''
[[step]]
name = "s"
script = "for i in 1 2 3 4; do echo $i > $OUTPUT_DIR/n-$i; done"
[[step]]
name = "w"
inputs = ["n-*"]
script = 'sleep 1; echo done > $OUTPUT_DIR/w'
''')
    proc = grit.popen("-output-mode", "fuse", "-parallel", "2")
    assert wait_for(lambda: grit.has("n-4"))
    proc.kill()
    proc.wait()
    # the FUSE server notices grit is gone, unmounts and exits
    wait_for(lambda: not mounts_under(grit.db) and not processes_using(grit.db), timeout=10)
    assert mounts_under(grit.db) == []
    assert [p for p in processes_using(grit.db) if b"grit.py" in
            open(f"/proc/{p}/cmdline", "rb").read()] == []
    grit.run("-output-mode", "fuse")
    assert [s["tasks"]["done"] for s in grit.status()["steps"]] == [1, 4]
    assert mounts_under(grit.db) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a stand-in stale mount needs root")
def test_stale_mount_is_removed_by_the_next_run(grit):
    grit.write('[[step]]\nname = "s"\nscript = "echo a > $OUTPUT_DIR/a"\n')
    stale = grit.db / "tmp" / "mnt"
    stale.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(stale)], check=True)
    assert mounts_under(grit.db)
    grit.run("-output-mode", "fuse")
    assert mounts_under(grit.db) == [] and grit.has("a")


def test_fallback_when_fuse_is_unavailable(grit):
    grit.write('[[step]]\nname = "s"\nscript = "for i in 1 2; do echo $i > $OUTPUT_DIR/x; done"\n')
    env = {"FUSE_LIBRARY_PATH": "/nonexistent/libfuse.so.2"}
    proc = grit.run(env=env)
    notice = [line for line in proc.stderr.splitlines() if "FUSE is not available" in line]
    assert len(notice) == 1 and "only its last content" in notice[0]
    assert grit.contents("x") == [b"2\n"]  # dir mode: only the final content
    forced = grit.run("-output-mode", "fuse", env=env, check=2)
    assert forced.stderr.startswith("grit: error: -output-mode fuse: FUSE cannot be used here")
    assert len(forced.stderr.splitlines()) == 1


def test_one_gib_output_with_bounded_memory(grit, tmp_path):
    grit.write('''
[[step]]
name = "big"
script = "yes 0123456789abcdef | head -c 1073741824 > $OUTPUT_DIR/big"
''')
    probe = (f"import resource, subprocess, sys; "
             f"p = subprocess.run([sys.executable, {GRIT!r}, '-manifest', {str(grit.manifest)!r}, "
             f"'-db', {str(grit.db)!r}, '-run', '-output-mode', 'fuse']); "
             f"print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300)
    code, max_rss_kib = map(int, out.stdout.split())
    assert code == 0, out.stderr
    assert max_rss_kib < 150 * 1024, f"peak RSS {max_rss_kib} KiB"
    expected = hashlib.sha256()
    line = b"0123456789abcdef\n"
    block = line * (1 << 16)
    left = 1 << 30
    while left:
        expected.update(block[:left])
        left -= min(left, len(block))
    [(digest, _, _)] = grit.export("big")
    assert digest == expected.hexdigest()
    assert grit.status()["resources"]["bytes"] >= 1 << 30


def test_pages_the_kernel_dropped_are_read_back_exactly(grit):
    """Past each 64 MiB of a large output the kernel drops its copy of the FUSE
    file (libfuse3, writeback cache). Changing two bytes near the start then
    makes the kernel read that page back from grit; the result is exact."""
    out = emitted(grit, f"{mib(200, 'a')} > $OUTPUT_DIR/x; sleep 0.5; printf XY | "
                        "dd of=$OUTPUT_DIR/x bs=1 seek=1000 conv=notrunc 2>/dev/null; "
                        "printf bc >> $OUTPUT_DIR/x; printf d >> $OUTPUT_DIR/x")
    expected = b"a" * 1000 + b"XY" + b"a" * ((200 << 20) - 1002) + b"bcd"
    assert [hashlib.sha256(c).hexdigest() for c in out["x"]] == \
        [hashlib.sha256(expected).hexdigest()]
    assert "0 problem(s)" in grit("-db", str(grit.db), "-verify").stderr

"""The live view's promise, tested on random histories: after any sequence of
edits (files added, changed, deleted, renamed, touched, reverted; a script
changed; a run cut short after some commits, as kill -9 leaves it), every
incremental -run leaves exactly the live (name, hash) set that a fresh
database makes on the same manifest and files, in FUSE and dir mode. The
pipeline ends in a gather step (over every live `len`) and a step after it;
lines with an `x` fail in `count`, so failed tasks are retried or retired.

And the dry run's promise: before every run, for each step with no
unfinished work upstream of it, -dry-run's task count is what the run starts
for that step, and a gather step's input count is what it gathers.

Each sequence runs grit in this process (grit.main), which is what makes
hundreds of them affordable. GRIT_PROPERTY_EXAMPLES sets how many sequences
per mode (default 150); `GRIT_PROPERTY_EXAMPLES=2000 tests/run -k property`
is the long run. derandomize: CI sees the same histories every time."""
import collections
import contextlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import grit
from conftest import require_fuse

NAMES = ["f0", "f1", "f2", "f3"]
# Content decides the fan-out: one `split` output per line, and `count` maps
# every line to its length, so equal lengths dedup and cut off downstream.
LINES = st.lists(st.sampled_from(["a", "bb", "cc", "ddd", "e f", "x"]), min_size=0, max_size=4)
EDITS = st.one_of(
    st.tuples(st.just("revert"), st.sampled_from(NAMES), st.just([])),
    st.tuples(st.just("crash"), st.integers(1, 3), st.just([])),
    st.tuples(st.just("write"), st.sampled_from(NAMES), LINES),
    st.tuples(st.just("delete"), st.sampled_from(NAMES), st.just([])),
    st.tuples(st.just("rename"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("touch"), st.sampled_from(NAMES), st.just([])),
    st.tuples(st.just("script"), st.sampled_from(["", "| tr a-z A-Z", "| rev"]), st.just([])),
)
MANIFEST = '''
[[step]]
name = "docs"
files = ["data/f?"]
[[step]]
name = "split"
inputs = ["f?"]
script = \'\'\'
i=0
while IFS= read -r line; do
  i=$((i + 1)); printf '%s\\n' "$line" {variant} > "$OUTPUT_DIR/$GRIT_INPUT_NAME.l$i"
done < "$INPUT_FILE"
\'\'\'
[[step]]
name = "count"
inputs = ["f?.l*"]
script = 'if grep -q x "$INPUT_FILE"; then exit 1; fi; wc -c < "$INPUT_FILE" > "$OUTPUT_DIR/len"'
[[step]]
name = "total"
inputs = ["len"]
gather = true
script = 'cat "$INPUT_DIR"/len* | sort -n | paste -sd, > "$OUTPUT_DIR/lens"'
[[step]]
name = "report"
inputs = ["lens"]
script = 'rev < "$INPUT_FILE" > "$OUTPUT_DIR/report"'
'''


def examples(default: int) -> int:
    return int(os.environ.get("GRIT_PROPERTY_EXAMPLES", default))


def grit_main(*argv: str, err: io.StringIO | None = None) -> tuple[int, bytes]:
    """grit in this process: (exit status, stdout bytes); stderr into `err`."""
    out = io.BytesIO()
    wrapper = io.TextIOWrapper(out, write_through=True)
    with contextlib.redirect_stdout(wrapper), contextlib.redirect_stderr(err or io.StringIO()):
        code = grit.main(list(argv))
    return code, out.getvalue()


def live_view(db: Path) -> set[tuple[str, str]]:
    code, tar_bytes = grit_main("-db", str(db), "-export-tar", "*", "-", "-quiet")
    if code == 1:  # nothing live at all
        return set()
    assert code == 0
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {tuple(m.name.rsplit("/", 1)) for m in tar.getmembers()}


def apply(edit: tuple, data: Path, state: dict) -> None:
    kind, a, b = edit
    path = data / a if isinstance(a, str) else data
    if kind == "write":
        state.setdefault(a, []).append(path.read_text() if path.exists() else None)
        path.write_text("".join(line + "\n" for line in b))
    elif kind == "revert" and state.get(a):
        before = state[a].pop()
        path.write_text(before) if before is not None else path.unlink(missing_ok=True)
    elif kind == "delete" and path.exists():
        path.unlink()
    elif kind == "rename" and path.exists():
        os.replace(path, data / b)
    elif kind == "touch" and path.exists():
        os.utime(path)
    elif kind == "script":
        state["variant"] = a


def run(work: Path, db: str, mode: str, *extra: str) -> str:
    """A run; its -verbose lines (with -verbose in extra)."""
    err = io.StringIO()
    code, _ = grit_main("-manifest", str(work / "m.toml"), "-db", str(work / db), "-run",
                        "-output-mode", mode, "-parallel", "2", *(extra or ["-quiet"]), err=err)
    assert code in (0, 1, 130), err.getvalue()  # 1: lines with an x fail; 130: crash()
    return err.getvalue()


@contextlib.contextmanager
def crash_after(commits: int):
    """The run stops after its n-th commit, as a kill -9 then would leave it."""
    commit = grit.Scheduler._commit

    def counting(self, finished):
        commit(self, finished)
        self.commits = getattr(self, "commits", 0) + 1
        if self.commits == commits:
            raise KeyboardInterrupt
    grit.Scheduler._commit = counting
    try:
        yield
    finally:
        grit.Scheduler._commit = commit


def check_dry_run(work: Path, mode: str) -> None:
    """Dry run, then run: each step up to the first with tasks (a linear
    pipeline: nothing before it is unfinished) starts what the dry run said."""
    _, out = grit_main("-manifest", str(work / "m.toml"), "-db", str(work / "db"), "-run",
                       "-dry-run", "-json")
    plan = json.loads(out)["steps"]
    said = run(work, "db", mode, "-verbose")
    started = collections.Counter(re.findall(r"^start task \d+ (\S+)", said, re.M))
    for step in plan:
        assert step["tasks"] == started[step["name"]], (plan, said)
        if "gather" in step and step["tasks"]:
            gathered = re.search(rf"^{step['name']}: gathers (\d+) live", said, re.M)
            assert int(gathered.group(1)) == step["gather"]["inputs"], (plan, said)
        if step["tasks"]:
            break


def check_history(mode: str, edits: list) -> None:
    work = Path(tempfile.mkdtemp(prefix="grit-property-"))
    try:
        data = work / "data"
        data.mkdir()
        state = {"variant": ""}
        for edit in edits:
            apply(edit, data, state)
            (work / "m.toml").write_text(MANIFEST.format(variant=state["variant"]))
            if edit[0] == "crash":
                with crash_after(edit[1]):
                    run(work, "db", mode)
                continue
            check_dry_run(work, mode)
            shutil.rmtree(work / "fresh", ignore_errors=True)
            run(work, "fresh", mode)
            assert live_view(work / "db") == live_view(work / "fresh"), edits
    finally:
        shutil.rmtree(work, ignore_errors=True)


HISTORIES = st.lists(EDITS, min_size=1, max_size=6)
# Histories that must always be among those tried (the random ones may miss them).
KNOWN = [
    # two files make one `len` (dedup); deleting one must leave it live
    [("write", "f0", ["a"]), ("write", "f1", ["a"]), ("delete", "f0", [])],
    # a script changes and changes back: a new version each time
    [("write", "f0", ["a", "bb"]), ("script", "| rev", []), ("script", "", [])],
    # a rename, then the old name comes back with other content
    [("write", "f0", ["bb"]), ("rename", "f0", "f1"), ("write", "f0", ["ddd"])],
    # the gathered set grows, then returns to one gathered before
    [("write", "f0", ["a"]), ("write", "f1", ["bb"]), ("delete", "f1", [])],
    # a revert brings old results back; a failing input is deleted; a crash mid-run
    [("write", "f0", ["a", "x"]), ("write", "f0", ["bb"]), ("revert", "f0", []),
     ("crash", 1, []), ("delete", "f0", []), ("write", "f1", ["cc"])],
]


def with_known(test):
    for history in KNOWN:
        test = example(edits=history)(test)
    return test


@pytest.mark.parametrize("mode", ["dir", "fuse"])
@settings(max_examples=examples(150), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@with_known
@given(edits=HISTORIES)
def test_property_incremental_equals_clean(mode, edits):
    check_history(mode, edits)


@pytest.fixture(autouse=True)
def _fuse_for_fuse_mode(request):
    if request.node.callspec.params.get("mode") == "fuse":
        require_fuse()

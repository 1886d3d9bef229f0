"""The live view's promise, tested on random histories: after any sequence of
edits (files added, changed, deleted, renamed, touched; a script changed),
every incremental -run leaves exactly the live (name, hash) set that a fresh
database makes on the same manifest and files, in FUSE and dir mode. The
pipeline ends in a gather step (over every live `len`) and a step after it.

Each sequence runs grit in this process (grit.main), which is what makes
hundreds of them affordable. GRIT_PROPERTY_EXAMPLES sets how many sequences
per mode (default 100); `GRIT_PROPERTY_EXAMPLES=5000 tests/run -k property`
is the long run. derandomize: CI sees the same histories every time."""
import contextlib
import io
import os
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
LINES = st.lists(st.sampled_from(["a", "bb", "cc", "ddd", "e f"]), min_size=0, max_size=4)
EDITS = st.one_of(
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
script = 'wc -c < "$INPUT_FILE" > "$OUTPUT_DIR/len"'
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


def grit_main(*argv: str) -> tuple[int, bytes]:
    """grit in this process: (exit status, stdout bytes)."""
    out = io.BytesIO()
    wrapper = io.TextIOWrapper(out, write_through=True)
    with contextlib.redirect_stdout(wrapper), contextlib.redirect_stderr(io.StringIO()):
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
    path = data / a
    if kind == "write":
        path.write_text("".join(line + "\n" for line in b))
    elif kind == "delete" and path.exists():
        path.unlink()
    elif kind == "rename" and path.exists():
        os.replace(path, data / b)
    elif kind == "touch" and path.exists():
        os.utime(path)
    elif kind == "script":
        state["variant"] = a


def run(work: Path, db: str, mode: str) -> None:
    code, _ = grit_main("-manifest", str(work / "m.toml"), "-db", str(work / db), "-run",
                        "-output-mode", mode, "-parallel", "2", "-quiet")
    assert code == 0


def check_history(mode: str, edits: list) -> None:
    work = Path(tempfile.mkdtemp(prefix="grit-property-"))
    try:
        data = work / "data"
        data.mkdir()
        state = {"variant": ""}
        for edit in edits:
            apply(edit, data, state)
            (work / "m.toml").write_text(MANIFEST.format(variant=state["variant"]))
            run(work, "db", mode)
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
]


def with_known(test):
    for history in KNOWN:
        test = example(edits=history)(test)
    return test


@pytest.mark.parametrize("mode", ["dir", "fuse"])
@settings(max_examples=examples(100), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@with_known
@given(edits=HISTORIES)
def test_property_incremental_equals_clean(mode, edits):
    check_history(mode, edits)


@pytest.fixture(autouse=True)
def _fuse_for_fuse_mode(request):
    if request.node.callspec.params.get("mode") == "fuse":
        require_fuse()

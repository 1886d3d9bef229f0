"""Another user cannot read a run's database, input copies or in-flight outputs."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import Grit, require_fuse, wait_for

OTHER = "grit-test-other"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"),
                                reason="needs root (to create a second user) and runuser")


@pytest.fixture(scope="module")
def other_user():
    if subprocess.run(["id", OTHER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", OTHER], check=True)
    return OTHER


@pytest.fixture
def open_dir():
    """A working directory the other user may enter (pytest's own is private),
    so that only grit's permissions stand in the way."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="grit-perm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_other(*cmd):
    return subprocess.run(["runuser", "-u", OTHER, "--", *cmd], capture_output=True, text=True)


@pytest.mark.parametrize("mode", ["dir", "fuse"])
def test_other_user_cannot_read_inputs_outputs_or_db(other_user, open_dir, mode):
    if mode == "fuse":
        require_fuse()
    grit = Grit(open_dir)
    paths = open_dir / "paths"
    grit.write(f'''
        [[step]]
        name = "seed"
        script = "echo secret-input > $OUTPUT_DIR/data"
        [[step]]
        name = "slow"
        inputs = ["data"]
        script = \'\'\'
        echo secret-output > $OUTPUT_DIR/result
        exec 3>> $OUTPUT_DIR/held
        echo "$INPUT_FILE $OUTPUT_DIR" > {paths}.tmp && mv {paths}.tmp {paths}
        sleep 3
        \'\'\'
    ''')
    proc = grit.popen("-output-mode", mode)
    try:
        assert wait_for(paths.exists)
        input_file, output_dir = paths.read_text().split()
        assert as_other("test", "-x", str(open_dir)).returncode == 0  # the way in is open
        for attempt in (["cat", input_file], ["ls", output_dir],
                        ["cat", f"{output_dir}/result"], ["stat", output_dir],
                        ["ls", str(grit.db)], ["cat", str(grit.db / "metadata.sqlite")]):
            denied = as_other(*attempt)
            assert denied.returncode != 0, attempt
            assert "secret" not in denied.stdout
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert grit.db.stat().st_mode & 0o077 == 0

"""tests/bootstrap.sh on a fresh VM: another apt (unattended upgrades) may hold
dpkg's lock when it starts; it waits for the lock instead of failing at once.
Root on Debian only: it runs the real apt-get, for a package installed already
(nothing is downloaded or changed), with `rsync` hidden from PATH so that the
script takes it for missing."""
import fcntl
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, wait_for

LOCK = "/var/lib/dpkg/lock-frontend"


def apt_install_waiting() -> bool:
    """An `apt-get … install` asleep between its tries for the lock (it would
    have exited at once, status 100, if it did not wait)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/wchan") as f:
                asleep = "nanosleep" in f.read()
        except OSError:
            continue
        if asleep and argv and argv[0].endswith(b"apt-get") and b"install" in argv:
            return True
    return False


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("apt-get") or not shutil.which("rsync")
                    or not os.path.exists(LOCK),
                    reason="needs root, apt-get, an installed rsync and dpkg's lock file")
def test_bootstrap_waits_for_another_apt(tmp_path):
    bin_dir = tmp_path / "bin"  # every command on PATH but rsync
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(":"):
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            target = bin_dir / name
            if name != "rsync" and not os.path.lexists(target):
                target.symlink_to(os.path.join(folder, name))
    holder = os.open(LOCK, os.O_RDWR)
    fcntl.lockf(holder, fcntl.LOCK_EX)  # as dpkg and apt take it: fcntl, whole file
    try:
        proc = subprocess.Popen(
            [str(bin_dir / "bash"), str(ROOT / "tests" / "bootstrap.sh")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PATH=str(bin_dir), PYTHON=sys.executable,
                     GRIT_VENV=str(ROOT / ".venv")))
        assert wait_for(lambda: proc.poll() is not None or apt_install_waiting(), timeout=300)
        assert proc.poll() is None, "bootstrap ended while another apt held the lock:\n" + \
            proc.communicate()[1]
    finally:
        os.close(holder)  # releases the lock
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "bootstrap: installing rsync\n" in err and out.strip().endswith("/bin/python")

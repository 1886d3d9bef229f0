"""Exit codes and one-line errors of the command line."""
import re
import shutil
import subprocess
import sys

from conftest import EXAMPLES, GRIT


def one_error(proc, code, pattern):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert re.search(pattern, proc.stderr), proc.stderr


def test_usage_errors_exit_2(grit):
    one_error(grit(), 2, "give exactly one of -run")
    one_error(grit("-run"), 2, "-run needs -manifest PATH")
    shutil.copy(EXAMPLES / "quickstart.toml", grit.manifest)
    one_error(grit("-manifest", "workflow.toml", "-run", "-parallel", "0"), 2, "-parallel must be 1")
    one_error(grit("-manifest", "workflow.toml", "-run", "-start", "process", "-step", "start"), 2,
              "use -start or -step, not both")
    one_error(grit("-db", "nowhere", "-export", "x"), 2, "no grit database at nowhere")
    assert grit("-version").stdout.startswith("grit ")


def test_export_errors(grit):
    shutil.copy(EXAMPLES / "quickstart.toml", grit.manifest)
    grit.run()
    one_error(grit("-db", "db", "-export", "nope"), 1, 'no resource named "nope"')
    one_error(grit("-db", "db", "-export-hash", "abc"), 2, "at least 8 hex digits")
    one_error(grit("-db", "db", "-export-hash", "zz" * 8), 2, "at least 8 hex digits")
    one_error(grit("-db", "db", "-export-hash", "0" * 64), 1, "no object with hash 0000")
    digest = grit.export("processed")[0][0]
    assert grit("-db", "db", "-export-hash", digest[:8].upper()).stdout == "INPUT DATA\n"


def test_database_path_that_is_a_file(grit):
    shutil.copy(EXAMPLES / "quickstart.toml", grit.manifest)
    (grit.path / "afile").write_text("x")
    one_error(grit("-manifest", "workflow.toml", "-db", "afile", "-run"), 2,
              "-db .*afile is not a directory")
    one_error(grit("-db", "/etc/passwd", "-status"), 2, "-db /etc/passwd is not a directory")
    assert (grit.path / "afile").read_text() == "x"


def test_missing_packages_are_named_with_the_ways_to_get_them(grit):
    """Without site-packages (python -S) lmdb cannot be imported."""
    shutil.copy(EXAMPLES / "quickstart.toml", grit.manifest)
    proc = subprocess.run([sys.executable, "-S", GRIT, "-manifest", "workflow.toml", "-db", "db",
                           "-run", "-output-mode", "dir", "-quiet"], cwd=grit.path,
                          capture_output=True, text=True, timeout=60)
    one_error(proc, 2, r"the Python package lmdb is missing: pip install -r requirements.txt "
                       r".*or use grit.pyz")


def test_not_a_grit_database(grit):
    shutil.copy(EXAMPLES / "quickstart.toml", grit.manifest)
    grit.db.mkdir()
    (grit.db / "metadata.sqlite").write_bytes(b"this is not sqlite" * 100)
    one_error(grit.run(check=None), 2, "cannot use metadata database")


def test_newer_schema_is_refused(grit):
    import sqlite3
    shutil.copy(EXAMPLES / "quickstart.toml", grit.manifest)
    grit.run()
    db = sqlite3.connect(grit.db / "metadata.sqlite")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    one_error(grit.run(check=None), 2, "database schema 99 is newer than this grit")


def test_database_is_private(grit):
    shutil.copy(EXAMPLES / "quickstart.toml", grit.manifest)
    grit.run()
    assert grit.db.stat().st_mode & 0o077 == 0


def test_argument_errors_are_one_line(grit):
    one_error(grit("-run", "-parallel", "abc"), 2, "argument -parallel/--parallel: invalid int value")
    one_error(grit("-bogus"), 2, "unrecognized arguments: -bogus")
    one_error(grit("-run", "-output-mode", "xyz"), 2, "invalid choice: 'xyz'")

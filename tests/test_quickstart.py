"""The original grit README, command by command: quick start, common commands,
export, and the "modify the script, run again" walk-through."""
import hashlib
import shutil

from conftest import EXAMPLES


def test_quickstart_runs_and_exports(grit):
    shutil.copy(EXAMPLES / "quickstart.toml", grit.manifest)
    proc = grit.run()
    assert "3 task(s) run, 0 failed, 4 resource(s) created" in proc.stderr
    assert grit.contents("processed") == [b"INPUT DATA\n"]
    assert grit.contents("sorted") == [b"More data\n"]
    [(digest, name, created)] = grit.export("dataset-v1")
    assert name == "dataset-v1" and created.endswith("Z")
    assert digest == hashlib.sha256(b"Input data\n").hexdigest()


def test_common_commands_verbatim(grit):
    """Every command of the seed README's "Common Commands", as typed there."""
    shutil.copy(EXAMPLES / "quickstart.toml", grit.path / "manifest.toml")
    m = ["-manifest", "manifest.toml", "--db", "./db"]
    assert grit(*m, "-run").returncode == 0
    assert grit(*m, "-run", "-parallel", "4").returncode == 0
    assert grit(*m, "-run", "-start", "process").returncode == 0
    assert grit(*m, "-run", "-step", "process", "-step", "transform").returncode == 0
    export = grit(*m, "-export", "dataset-v1")
    assert export.returncode == 0
    digest = export.stdout.split("\t")[0]
    assert grit(*m, "-export-hash", digest).stdout == "Input data\n"
    verbose = grit(*m, "-run", "-verbose")
    assert verbose.returncode == 0 and "step process v1" in verbose.stderr
    quiet = grit(*m, "-run", "-quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""
    help_ = grit("--help")
    assert help_.returncode == 0 and "-export-hash" in help_.stdout


def test_flag_spellings_are_equivalent(grit):
    shutil.copy(EXAMPLES / "quickstart.toml", grit.manifest)
    assert grit("--manifest=workflow.toml", "-db=./db", "--run", "--parallel=1").returncode == 0
    assert grit("-db", "./db", "--export=processed").stdout.count("\tprocessed\t") == 1


def test_seed_readme_walkthrough_new_version(grit):
    """README "Example Workflow": run, export, modify process, run again."""
    grit.write('''
        [[step]]
        name = "fetch"
        start = true
        script = """
        echo 'sample data' > $OUTPUT_DIR/raw-data
        echo 'more samples' > $OUTPUT_DIR/raw-data-2
        """

        [[step]]
        name = "process"
        inputs = ["raw-data"]
        script = """
        tr '[:lower:]' '[:upper:]' < $INPUT_FILE > $OUTPUT_DIR/processed
        """

        [[step]]
        name = "finalize"
        inputs = ["processed"]
        script = """
        cat $INPUT_FILE | sort > $OUTPUT_DIR/final
        """
    ''')
    grit.run()
    assert grit.contents("final") == [b"SAMPLE DATA\n"]
    text = grit.manifest.read_text().replace(
        "tr '[:lower:]' '[:upper:]' < $INPUT_FILE > $OUTPUT_DIR/processed",
        "# Added additional processing\n"
        "tr '[:lower:]' '[:upper:]' < $INPUT_FILE | rev > $OUTPUT_DIR/processed")
    grit.manifest.write_text(text)
    proc = grit.run()
    assert "new version: process v2" in proc.stderr
    assert "2 task(s) run" in proc.stderr  # process v2 once, finalize on its new output
    assert grit.contents("processed") == [b"SAMPLE DATA\n", b"ATAD ELPMAS\n"]
    assert grit.contents("final") == [b"SAMPLE DATA\n", b"ATAD ELPMAS\n"]
    # old version, its task and its resources stay as history
    assert grit.tasks("process", 1)["done"] == 1 and grit.tasks("process", 2)["done"] == 1


def test_the_readme_example_command_runs():
    """`examples/run`, the first command of the README, end to end."""
    import subprocess
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "examples" / "run"
    proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "INPUT DATA" in proc.stdout
    assert "0 task(s) would start" in proc.stdout
    assert "0 task(s) run, 0 failed" in proc.stderr
    assert "transform  v1" in proc.stdout

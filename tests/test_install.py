"""`pip install .` (what pipx and uv tool install do) gives a working `grit` command."""
import re
import shutil
import subprocess
import sys

from conftest import EXAMPLES, ROOT


def requirement_lines(text: str) -> list[str]:
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    return sorted(line.replace('"', "'").replace(" ", "") for line in lines if line)


def test_pyproject_and_requirements_name_the_same_dependencies():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert requirement_lines("\n".join(declared)) == \
        requirement_lines((ROOT / "requirements.txt").read_text())


def test_pip_install_gives_a_grit_command(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "grit.py", "README.md"):  # not the repo: no build litter there
        shutil.copy(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    grit = venv / "bin" / "grit"
    version = subprocess.run([str(grit), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and re.fullmatch(r"grit \S+\n", version.stdout), version
    shutil.copy(EXAMPLES / "quickstart.toml", tmp_path / "workflow.toml")
    run = subprocess.run([str(grit), "-manifest", "workflow.toml", "-db", "./db", "-run"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "3 task(s) run, 0 failed" in run.stderr, run.stderr


def test_readme_stands_alone():
    """README sends users to nothing outside the repository, and the files it
    names are there."""
    readme = (ROOT / "README.md").read_text()
    assert "SPEC" not in readme and "shared/" not in readme
    for path in re.findall(r"`((?:tests|bench|examples|\.ci)/[\w./-]+)`", readme):
        assert (ROOT / path).exists(), path
    for target in re.findall(r"\]\(((?!https?:|#)[^)]+)\)", readme):
        assert (ROOT / target).exists(), target

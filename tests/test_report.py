"""A picture of a run: what each task used (-log, -trace), the run history
(-runs), the step graph (-graph, parsed by Graphviz's dot) and the HTML report
(-report, opened in a real Chromium through Playwright)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GRIT, mounts_under, wait_for

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024

MEASURED = '''
[[step]]
name = "seed"
script = """
head -c 1000 /dev/zero > $OUTPUT_DIR/kilo
echo go > $OUTPUT_DIR/go
"""
[[step]]
name = "alloc"
inputs = ["go"]
script = """python3 -c 'x = b"x" * (200 * 1024 * 1024)'; echo done > $OUTPUT_DIR/allocated"""
[[step]]
name = "nap"
inputs = ["go"]
script = "sleep 1; echo done > $OUTPUT_DIR/slept"
[[step]]
name = "copy"
inputs = ["kilo"]
script = "cat $INPUT_FILE $INPUT_FILE > $OUTPUT_DIR/twice"
'''


def trace(grit, *args: str) -> list[dict]:
    out = grit("-db", str(grit.db), "-trace", *args, check=0).stdout
    return list(csv.DictReader(io.StringIO(out), delimiter="\t"))


def as_json(grit, *args: str):
    return json.loads(grit("-db", str(grit.db), *args, "-json", check=0).stdout)


def test_trace_and_runs_measure_what_tasks_used(grit):
    grit.write(MEASURED)
    # started by a process with a 300 MiB peak of its own (as a big pytest, a shell
    # with a big history): its peak must not become the tasks'
    big_parent = "x = b'y' * (300 << 20); import subprocess, sys; subprocess.run(sys.argv[1:])"
    subprocess.run([sys.executable, "-c", big_parent, sys.executable, GRIT, "-manifest",
                    str(grit.manifest), "-db", str(grit.db), "-run"], check=True)
    rows = {row["step"]: row for row in trace(grit)}
    assert set(rows) == {"seed", "alloc", "nap", "copy"}
    alloc, nap, copy = rows["alloc"], rows["nap"], rows["copy"]
    # 200 MiB of bytes plus the interpreter: within 10%
    assert alloc["rss"] != "-" and abs(int(alloc["rss"]) - 200 * MiB) <= 20 * MiB, alloc
    assert float(nap["wall"]) >= 1.0 and float(nap["cpu_user"]) + float(nap["cpu_system"]) < 0.2
    assert (copy["bytes_in"], copy["bytes_out"]) == ("1000", "2000")
    assert all(r["status"] == "done" and r["exit"] == "0" and r["node"] == os.uname().nodename
               for r in rows.values())
    # -log says the same, in text and JSON
    task = as_json(grit, "-log", alloc["task"])
    assert task["peak_rss"] == int(alloc["rss"]) and task["run_id"] == 1
    assert "used:   CPU " in grit("-db", str(grit.db), "-log", nap["task"], check=0).stdout
    [run] = as_json(grit, "-runs")
    assert run["id"] == 1 and run["outcome"] == "ok" and run["exit_status"] == 0
    assert (run["started"], run["done"], run["failed"], run["resources"]) == (4, 4, 0, 5)
    assert run["command"][:1] == ["-manifest"] and run["executor"] == "local"
    assert run["seconds"] >= 1.0 and not run["interrupted"]


def test_runs_are_listed_newest_first_with_their_outcome(grit):
    grit.write(MEASURED.replace("sleep 1", "exit 4"))
    grit.run(check=1)
    grit.write(MEASURED.replace("sleep 1", "true"))
    grit.run()  # the failed nap runs again as a new version: it writes no file now
    grit.run()  # nothing to do
    runs = as_json(grit, "-runs")
    assert [r["id"] for r in runs] == [3, 2, 1]
    assert [r["outcome"] for r in runs] == ["ok", "ok", "failed (exit 1)"]
    assert [(r["started"], r["failed"]) for r in runs] == [(0, 0), (1, 0), (4, 1)]
    failed = [r for r in trace(grit, "-run", "1") if r["status"] == "failed"]
    assert [(r["step"], r["exit"]) for r in failed] == [("nap", "4")]
    assert "exit status 4" in failed[0]["error"]
    assert [r["step"] for r in trace(grit, "-run", "2")] == ["nap"]
    assert trace(grit) == []  # the last run ran nothing
    text = grit("-db", str(grit.db), "-runs", check=0).stdout.splitlines()
    assert text[0].split()[:3] == ["run", "started", "took"] and text[3].split()[0] == "1"
    assert "no run 9" in grit("-db", str(grit.db), "-trace", "-run", "9", check=1).stderr


GRAPH = '''
[[step]]
name = "seed"
script = "for i in 1 2 3; do echo $i > $OUTPUT_DIR/n-$i; done"
[[step]]
name = "double.it"
inputs = ["n-*"]
script = "cat $INPUT_FILE $INPUT_FILE > $OUTPUT_DIR/d-$(cat $INPUT_FILE)"
[[step]]
name = "all"
inputs = ["d-*"]
gather = true
script = "cat $INPUT_DIR/* > $OUTPUT_DIR/sum"
[[step]]
name = "shrink"
inputs = ["half*", "sum"]
script = """n=$(wc -c < $INPUT_FILE); [ $n -gt 2 ] && head -c $((n / 2)) $INPUT_FILE > $OUTPUT_DIR/half-$n || true"""
'''


def test_graph_prints_dot_that_graphviz_reads_and_mermaid(grit):
    grit.write(GRAPH)
    grit.run()
    dot_text = grit("-db", str(grit.db), "-graph", check=0).stdout
    edges = {line.strip() for line in dot_text.splitlines() if "->" in line}
    assert edges == {'"seed" -> "double.it" [label="3"];', '"double.it" -> "all" [label="3"];',
                     '"all" -> "shrink" [label="1"];', '"shrink" -> "shrink" [label="3"];'}
    if not shutil.which("dot"):
        pytest.skip("Graphviz's dot is not installed (tests/bootstrap.sh installs it as root)")
    svg = subprocess.run(["dot", "-Tsvg"], input=dot_text, capture_output=True, text=True,
                         check=True).stdout
    assert svg.count('class="node"') == 4 and svg.count('class="edge"') == 4
    mermaid = grit("-db", str(grit.db), "-graph", "mermaid", check=0).stdout.splitlines()
    assert mermaid[0] == "flowchart LR" and "  s3 -->|3| s3" in mermaid
    assert mermaid[2] == '  s1["double.it (step)"]' and '  s0 -->|3| s1' in mermaid
    assert "-graph takes dot or mermaid" in grit("-db", str(grit.db), "-graph", "svg",
                                                check=2).stderr


REPORTED = '''
[[step]]
name = "seed"
script = "for i in $(seq 1 40); do echo $i > $OUTPUT_DIR/n-$i; done"
[[step]]
name = "square"
inputs = ["n-*"]
script = """n=$(cat $INPUT_FILE); [ $n -ne 13 ] || { echo "thirteen is unlucky" >&2; exit 3; }
echo $((n * n)) > $OUTPUT_DIR/sq-$n"""
[[step]]
name = "total"
inputs = ["sq-*"]
gather = true
script = "cat $INPUT_DIR/* | awk '{ s += $1 } END { print s }' > $OUTPUT_DIR/total"
'''


def chromium() -> str:
    path = shutil.which("chromium")
    if not path:
        pytest.skip("Debian's chromium is not installed (tests/bootstrap.sh installs it as root)")
    return path


def open_in_chromium(page_path: Path, screenshot: Path) -> dict:
    """Load a page in headless Chromium: its DOM facts, console errors, requests."""
    from playwright.sync_api import sync_playwright
    seen: dict = {"errors": [], "requests": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            for scheme in ("light", "dark"):
                page = browser.new_page(color_scheme=scheme, viewport={"width": 1100,
                                                                      "height": 900})
                page.on("console", lambda m: seen["errors"].append(m.text)
                        if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: seen["errors"].append(str(e)))
                page.on("request", lambda r: seen["requests"].append(r.url))
                page.goto(page_path.as_uri())
                seen[scheme] = page.evaluate("""() => ({
                    nodes: [...document.querySelectorAll('#graph .node')].map(n => n.dataset.step),
                    edges: [...document.querySelectorAll('#graph .edge-group')].map(
                        e => [e.dataset.from, e.dataset.to, +e.dataset.count]),
                    marks: [...document.querySelectorAll('#timeline .mark')].reduce(
                        (n, m) => n + +m.dataset.tasks, 0),
                    failures: [...document.querySelectorAll('#failures .failure')].map(
                        r => r.textContent),
                    steps: [...document.querySelectorAll('#steps tr[data-step]')].map(
                        r => r.dataset.step),
                    background: getComputedStyle(document.body).backgroundColor,
                    graphWidth: document.querySelector('#graph').getBoundingClientRect().width,
                })""")
                if scheme == "light":
                    page.screenshot(path=str(screenshot), full_page=True)
                page.close()
        finally:
            browser.close()
    return seen


def test_report_opens_in_chromium_with_graph_timeline_and_failure(grit, tmp_path):
    grit.write(REPORTED)
    grit.run(check=1)
    report = tmp_path / "run.html"
    written = grit("-db", str(grit.db), "-report", str(report), check=0)
    assert f"report of run 1 (42 task(s)) written to {report}" in written.stderr
    seen = open_in_chromium(report, tmp_path / "run.png")
    assert seen["errors"] == [] and seen["requests"] == [report.as_uri()] * 2
    light, dark = seen["light"], seen["dark"]
    assert light["nodes"] == ["seed", "square", "total"]
    assert sorted(light["edges"]) == [["seed", "square", 40], ["square", "total", 39]]
    assert light["marks"] == 42 == len(trace(grit))
    [failure] = light["failures"]
    assert "square" in failure and "thirteen is unlucky" in failure
    assert light["steps"] == ["seed", "square", "total"]
    assert light["background"] != dark["background"]  # a dark theme, for a dark system
    assert 0 < light["graphWidth"] <= 1000
    png = (tmp_path / "run.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_of_the_quick_start_is_the_readme_screenshot(grit, tmp_path):
    """README shows this report; GRIT_UPDATE_SCREENSHOT=1 writes it anew."""
    shutil.copy(ROOT / "examples" / "quickstart.toml", grit.path / "quickstart.toml")
    grit("-run", "-manifest", "quickstart.toml", "-db", "db", check=0)
    report = tmp_path / "quickstart.html"
    grit("-db", str(grit.db), "-report", str(report), check=0)
    target = ROOT / "docs" / "report.png"
    shot = target if os.environ.get("GRIT_UPDATE_SCREENSHOT") else tmp_path / "report.png"
    seen = open_in_chromium(report, shot)
    assert seen["errors"] == [] and seen["light"]["nodes"] == ["start", "process", "transform"]
    assert "docs/report.png" in (ROOT / "README.md").read_text() and target.is_file()
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_and_trace_name_bad_requests(grit, tmp_path):
    grit.write(REPORTED)
    grit.run(check=1)
    assert "no run 2: -runs lists them" in grit("-db", str(grit.db), "-report",
                                                str(tmp_path / "r.html"), "-run", "2",
                                                check=1).stderr
    assert not (tmp_path / "r.html").exists()
    assert "cannot write /nonexistent/r.html: No such file or directory" in grit(
        "-db", str(grit.db), "-report", "/nonexistent/r.html", check=2).stderr
    assert "-run takes a run number only with -trace or -report" in grit(
        "-db", str(grit.db), "-run", "1", check=2).stderr
    assert "-run N: N is a run number" in grit("-db", str(grit.db), "-trace", "-run", "x",
                                               check=2).stderr


def test_an_interrupted_run_and_a_killed_one_say_so_in_runs(grit, tmp_path):
    grit.write(f'''
[[step]]
name = "seed"
script = "echo 1 > $OUTPUT_DIR/a; echo 2 > $OUTPUT_DIR/b"
[[step]]
name = "slow"
inputs = ["a", "b"]
script = "touch {tmp_path}/started-$GRIT_TASK_ID-$$; sleep 60"
''')
    for stop in (signal.SIGINT, signal.SIGKILL):
        proc = grit.popen()
        assert wait_for(lambda: len(list(tmp_path.glob("started-*"))) == 2, 60)
        proc.send_signal(stop)
        proc.communicate(timeout=60)
        for marker in tmp_path.glob("started-*"):
            with contextlib.suppress(ProcessLookupError):  # after kill -9: its sleep
                os.killpg(int(marker.name.rsplit("-", 1)[1]), signal.SIGKILL)
            marker.unlink()
    wait_for(lambda: not mounts_under(grit.db), timeout=10)
    killed, interrupted = as_json(grit, "-runs")
    assert (interrupted["outcome"], interrupted["exit_status"]) == ("interrupted", 130)
    assert interrupted["interrupted"] and interrupted["finished_at"]
    assert (interrupted["started"], interrupted["done"]) == (3, 1)
    assert killed["outcome"] == "killed (no end recorded)" and killed["finished_at"] is None
    assert killed["seconds"] is None
    text = grit("-db", str(grit.db), "-runs", check=0).stdout.splitlines()
    assert "killed (no end" in text[1] and "interrupted" in text[2]

"""retries = N: a failed task runs again in the same run, $GRIT_ATTEMPT telling
which try it is; -log shows every try; resource keys may be lists by attempt."""
import pytest

from grit import GritError, parse_manifest

FLAKY = '''
[[step]]
name = "flaky"
{retries}
script = """
echo "try $GRIT_ATTEMPT" >&2
[ "$GRIT_ATTEMPT" -ge {works_at} ] || exit 3
echo "made at try $GRIT_ATTEMPT" > $OUTPUT_DIR/x
"""
'''


def test_a_failed_task_runs_again_with_its_attempt_and_log_shows_every_try(grit):
    grit.write(FLAKY.format(retries="retries = 2", works_at=3))
    proc = grit.run()
    assert "0 failed" in proc.stderr
    tries = [line for line in proc.stderr.splitlines() if "trying again" in line]
    assert len(tries) == 2 and "attempt 1 of 3: exit status 3: try 1" in tries[0], tries
    assert grit.contents("x") == [b"made at try 3\n"]
    grit("-db", str(grit.db), "-gc")  # the failed tries' logs are kept
    log = grit.log(1)
    assert log["status"] == "done" and log["stderr"] == "try 3\n"
    assert [(a["attempt"], a["exit_code"], a["stderr"]) for a in log["attempts"]] == [
        (1, 3, "try 1\n"), (2, 3, "try 2\n")]
    text = grit("-db", str(grit.db), "-log", "1").stdout
    assert "flaky v1, attempt 1 failed, exit status 3" in text and "try 1" in text
    assert "flaky v1, attempt 3, done" in text


def test_a_task_failing_every_try_fails_once_retries_are_spent(grit):
    grit.write(FLAKY.format(retries="retries = 1", works_at=99))
    proc = grit.run(check=1)
    assert "1 failed" in proc.stderr and "attempt 1 of 2" in proc.stderr
    [failed] = grit.status()["failed_tasks"]
    log = grit.log(failed["task"])
    assert log["stderr"] == "try 2\n" and len(log["attempts"]) == 1
    # the next run tries it again, from attempt 1
    assert "attempt 1 of 2" in grit.run(check=1).stderr


def test_the_retries_flag_is_the_default_a_step_overrides(grit):
    grit.write(FLAKY.format(retries="", works_at=2)
               + FLAKY.format(retries="retries = 0", works_at=2).replace('"flaky"', '"firm"')
               .replace("/x", "/y"))
    proc = grit.run("-retries", "1", check=1)
    assert grit.contents("x") == [b"made at try 2\n"]  # -retries 1
    assert not grit.has("y") and "1 failed" in proc.stderr  # retries = 0
    assert "-retries must be 0 or more" in grit.run("-retries", "-1", check=2).stderr


def test_resource_keys_may_be_lists_by_attempt():
    manifest = parse_manifest({"slurm": {"mem": ["1G", "2G"], "retries": 3},
                               "step": [{"name": "a", "script": "x", "cpus": [1, 4],
                                         "time": ["1:00", "2:00:00"]},
                                        {"name": "b", "script": "x", "mem": "8G"}]}, "m.toml")
    a, b = manifest.steps
    assert (a.retries, a.cpus, a.mem, a.time) == (3, 1, "1G", 60)
    assert (a.for_attempt(2).cpus, a.for_attempt(2).mem, a.for_attempt(2).time) == (4, "2G", 7200)
    assert a.for_attempt(9).cpus == 4  # the last entry repeats
    assert (b.for_attempt(2).mem, b.for_attempt(2).cpus) == ("8G", 1)


@pytest.mark.parametrize("step, message", [
    ({"mem": []}, '"mem" is an empty list'),
    ({"cpus": [1, 0]}, '"cpus" must be 1 or more, not 0'),
    ({"retries": -1}, '"retries" must be 0 or more'),
    ({"time": ["1:00", "soon"]}, '"time" must be seconds or a Slurm time'),
])
def test_bad_retries_and_lists_are_one_clear_error(step, message):
    with pytest.raises(GritError, match=message):
        parse_manifest({"step": [dict(name="a", script="x", **step)]}, "m.toml")

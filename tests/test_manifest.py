"""Every kind of bad manifest: exit 2, one line that names file, step and key."""
import pytest

from grit import GritError, parse_manifest

GOOD_STEP = '[[step]]\nname = "a"\nscript = "true"\n'

BAD = {
    "invalid_toml": ('[[step]]\nname = "a"\nscript = "true\n', ["invalid TOML", "line 3, column"]),
    "missing_name": ('[[step]]\nscript = "true"\n', ["step 1", 'missing key "name"']),
    "missing_script": ('[[step]]\nname = "a"\n', ['step 1 ("a")', 'missing key "script"']),
    "empty_script": ('[[step]]\nname = "a"\nscript = "  \\n"\n', ['"script" is empty']),
    "duplicate": (GOOD_STEP + GOOD_STEP, ['step 2: duplicate step name "a" (also step 1)']),
    "inputs_string": (GOOD_STEP + 'inputs = "x"\n', ['"inputs" must be an array of strings']),
    "inputs_numbers": (GOOD_STEP + 'inputs = [1]\n', ['"inputs" must be an array of strings']),
    "parallel_string": (GOOD_STEP + 'parallel = "2"\n', ['"parallel" must be an integer, not a string']),
    "parallel_negative": (GOOD_STEP + 'parallel = -1\n', ['"parallel" must be 0 (unlimited) or more']),
    "parallel_bool": (GOOD_STEP + 'parallel = true\n', ['"parallel" must be an integer, not a boolean']),
    "name_number": ('[[step]]\nname = 3\nscript = "x"\n', ['"name" must be a string, not an integer']),
    "name_spaces": ('[[step]]\nname = "my step"\nscript = "x"\n', ['invalid step name "my step"']),
    "script_table": ('[[step]]\nname = "a"\nscript = {a = 1}\n', ['"script" must be a string, not a table']),
    "unknown_key": (GOOD_STEP + 'input = ["x"]\n', ['step 1 ("a"): unknown key "input" (did you mean "inputs"?)']),
    "unknown_top": ('stepz = 1\n' + GOOD_STEP, ['unknown top-level key "stepz" (did you mean "step"?)']),
    "single_table": ('[step]\nname = "a"\nscript = "x"\n', ['must be an array of tables']),
    "no_steps": ('# nothing\n', ["no steps"]),
    "bad_pattern": (GOOD_STEP + 'inputs = ["../x"]\n', ['input "../x" has a ".." segment']),
    "start_with_inputs": (GOOD_STEP + 'start = true\ninputs = ["x"]\n', ['a start step has no inputs']),
    "start_string": (GOOD_STEP + 'start = "yes"\n', ['"start" must be true or false']),
    "not_utf8": (b'[[step]]\nname = "\xff"\n', ["invalid TOML"]),
    "timeout_negative": (GOOD_STEP + 'timeout = -5\n', ['"timeout" must be a number of seconds']),
    "timeout_string": (GOOD_STEP + 'timeout = "1h"\n', ['"timeout" must be a number of seconds']),
    "gather_seed": (GOOD_STEP + 'gather = true\n', ['a gather step needs "inputs"']),
    "gather_string": (GOOD_STEP + 'inputs = ["x"]\ngather = "yes"\n',
                      ['"gather" must be true or false, not a string']),
    "cpus_zero": (GOOD_STEP + 'cpus = 0\n', ['"cpus" must be 1 or more, not 0']),
    "mem_number": (GOOD_STEP + 'mem = 4\n', ['"mem" must be a string, not an integer']),
    "time_words": (GOOD_STEP + 'time = "an hour"\n', ['"time" must be seconds or a Slurm time']),
    "sbatch_string": (GOOD_STEP + 'sbatch = "--qos=x"\n', ['"sbatch" must be an array of strings']),
    "slurm_unknown": ('[slurm]\npartitions = "x"\n' + GOOD_STEP,
                      ['[slurm]: unknown key "partitions" (did you mean "partition"?)']),
    "slurm_not_table": ('slurm = 1\n' + GOOD_STEP, ['[slurm] must be a table, not an integer']),
    "slurm_batch": ('[slurm]\nbatch = -1\n' + GOOD_STEP, ['[slurm]: "batch" must be 0']),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_is_one_clear_line(grit, case):
    text, needles = BAD[case]
    if isinstance(text, bytes):
        grit.manifest.write_bytes(text)
    else:
        grit.manifest.write_text(text)
    proc = grit.run(check=2)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"grit: error: {grit.manifest}: ")
    for needle in needles:
        assert needle in lines[0]
    assert not grit.db.exists() or not (grit.db / "metadata.sqlite").exists()


def test_missing_manifest(grit):
    proc = grit("-manifest", "nope.toml", "-run", check=2)
    assert proc.stderr == "grit: error: manifest not found: nope.toml\n"


def test_inputs_that_match_nothing_are_a_warning(grit):
    grit.write(GOOD_STEP + '[[step]]\nname = "b"\ninputs = ["never"]\nscript = "true"\n')
    proc = grit.run(check=0)
    assert 'warning: step "b": no resource matches its inputs [\'never\']' in proc.stderr


def test_inputs_are_sorted_and_deduplicated():
    m = parse_manifest({"step": [{"name": "a", "script": "x", "inputs": ["b", "a", "b"]}]}, "m")
    assert m.steps[0].inputs == ("a", "b") and not m.steps[0].is_seed


def test_start_key_of_the_seed_readme_is_accepted():
    m = parse_manifest({"step": [{"name": "s", "start": True, "script": "x"}]}, "m")
    assert m.steps[0].is_seed


def test_slurm_defaults_apply_to_steps_that_do_not_set_a_key():
    m = parse_manifest({"slurm": {"partition": "short", "time": "1:30:00", "cpus": 2,
                                  "command": "grit", "work_dir": "/shared/w"},
                        "step": [{"name": "a", "script": "x"},
                                 {"name": "b", "script": "x", "cpus": 8, "time": 90,
                                  "mem": "4G", "sbatch": ["--qos=long"], "batch": 10}]}, "m")
    a, b = m.steps
    assert (a.partition, a.time, a.cpus, a.mem) == ("short", 5400, 2, "")
    assert (b.partition, b.time, b.cpus, b.mem, b.sbatch, b.batch) == (
        "short", 90, 8, "4G", ("--qos=long",), 10)
    slurm = m.executors["slurm"]
    assert (slurm.command, slurm.work_dir) == ("grit", "/shared/w")


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("2:30", 150), ("1:00:00", 3600),
                                          ("1-12", 129600), ("2-0:30", 174600)])
def test_slurm_times_read_as_sbatch_reads_them(text, seconds):
    m = parse_manifest({"step": [{"name": "a", "script": "x", "time": text}]}, "m")
    assert m.steps[0].time == seconds


def test_unknown_step_lookup_suggests():
    m = parse_manifest({"step": [{"name": "process", "script": "x"}]}, "m.toml")
    with pytest.raises(GritError, match='unknown step "proces" in m.toml \\(did you mean "process"\\?\\)'):
        m.step("proces")

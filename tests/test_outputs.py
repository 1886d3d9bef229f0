"""What a task may write to $OUTPUT_DIR: bad names and odd files fail that task alone."""
import pytest

HOSTILE = {
    "control_char": ('touch "$OUTPUT_DIR/$(printf "a\\tb")"', "contains a control character"),
    "glob_char": ('touch "$OUTPUT_DIR/star*"', "contains one of * ? ["),
    "symlink": ('ln -s /etc/passwd "$OUTPUT_DIR/link"', "is a symbolic link"),
    "fifo": ('mkfifo "$OUTPUT_DIR/pipe"', "is not a regular file"),
    "long_segment": ('touch "$OUTPUT_DIR/$(printf "%0250d" 0)é"', None),
    "non_utf8": ('touch "$OUTPUT_DIR/$(printf "bad\\377")"', "is not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_output_fails_only_that_task(grit, case):
    script, message = HOSTILE[case]
    grit.write(f'''
        [[step]]
        name = "seed"
        script = "echo ok > $OUTPUT_DIR/good"
        [[step]]
        name = "bad"
        script = \'\'\'
        echo fine > $OUTPUT_DIR/fine
        {script}
        \'\'\'
    ''')
    proc = grit.run(check=None)
    if message is None:  # 252 bytes: allowed
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 1
    assert "failed: output" in proc.stderr and message in proc.stderr
    assert grit.has("good") and not grit.has("fine")
    assert "Traceback" not in proc.stderr

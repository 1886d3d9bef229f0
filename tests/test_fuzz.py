"""Bad manifests, generated: whatever the input, grit answers with one clear
GritError (exit 2 on the command line), never another exception."""
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grit import GritError, load_manifest, parse_manifest

KEYS = ["name", "inputs", "parallel", "script", "start", "input", "Name", "scripts", "", "é",
        "in\nputs"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                    st.text(max_size=300), st.binary(max_size=20).map(lambda b: b.decode("latin-1")))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=20)
steps = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)
documents = st.one_of(
    st.dictionaries(st.sampled_from(["step", "steps", "x"]), values, max_size=3),
    st.builds(lambda s: {"step": s}, st.lists(steps, max_size=4)),
    st.builds(lambda s: {"step": s}, st.lists(st.fixed_dictionaries(
        {"name": st.text(string.ascii_letters + " ._-/", min_size=0, max_size=300),
         "script": st.text(max_size=50)},
        optional={"inputs": st.lists(st.text(max_size=300), max_size=4),
                  "parallel": st.integers(-3, 3)}), max_size=4)),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(documents)
def test_generated_documents_never_crash(data):
    try:
        manifest = parse_manifest(data, "m.toml")
    except GritError as e:
        assert str(e).startswith("m.toml")
        assert "\n" not in str(e)  # one line, whatever the input
    else:
        assert manifest.steps and all(s.name and s.script.strip() for s in manifest.steps)


toml_text = st.one_of(
    st.text(max_size=400),
    st.lists(st.sampled_from(['[[step]]', '[step]', 'name = "a"', 'script = "x"', 'inputs = [',
                              'inputs = ["a", 1]', 'parallel = 1e9', '"""', "'''", '[[step.x]]',
                              'name = "a"\nname = "b"', '\x00', 'é = 1', '[' * 50]),
             max_size=12).map("\n".join),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(toml_text)
def test_generated_toml_text_never_crashes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("m") / "m.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_manifest(str(path))
    except GritError as e:
        assert str(e).startswith(str(path))


# Writes as the FUSE server sees them: appends of any size (8 KiB like `head`,
# 128 KiB like `cat`), rewrites inside or past the end, truncates. Whatever the
# order, the emitted hash and bytes must be those of the final content.
operations = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(1, 300_000)),
    st.tuples(st.just("write"), st.floats(0, 1.1), st.integers(1, 70_000)),
    st.tuples(st.just("truncate"), st.floats(0, 1.2))), max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(operations)
def test_pending_content_matches_its_writes_in_any_order(tmp_path_factory, ops):
    import hashlib
    import os

    from grit import OutputFS, _Content
    content = _Content(OutputFS(str(tmp_path_factory.mktemp("spool"))))
    model = bytearray()
    for i, op in enumerate(ops):
        fill = bytes([i + 1]) * 300_000
        if op[0] == "append":
            data, offset = fill[:op[1]], len(model)
        elif op[0] == "write":
            data, offset = fill[:op[2]], int(op[1] * len(model))
        else:
            length = int(op[1] * len(model))
            content.truncate(length)
            model = model[:length] + bytes(max(0, length - len(model)))
            continue
        content.write(data, offset)
        model[len(model):offset] = bytes(max(0, offset - len(model)))
        model[offset:offset + len(data)] = data
    emitted = content.emission("x")
    assert emitted["size"] == len(model)
    assert emitted["hash"] == hashlib.sha256(model).hexdigest()
    if "spool" in emitted:
        with open(emitted["spool"], "rb") as f:
            assert f.read() == model
        os.unlink(emitted["spool"])
    else:
        assert bytes.fromhex(emitted["data"]) == model

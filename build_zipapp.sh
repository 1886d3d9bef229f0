#!/usr/bin/env bash
# Builds grit.pyz: one file that runs with nothing but python3 (3.9-3.13) on
# x86_64 and aarch64 Linux.
#
#   ./build_zipapp.sh [-o OUT] [--wheels DIR]
#   ./build_zipapp.sh --download DIR     # only fetch the wheels into DIR
#
# Inside the zip: grit.py, mfusepy.py and tomli (both import straight from
# the zip), and lmdb 1.7.5 (LMDB 0.9.33) for every CPython x architecture. A zip
# cannot import a C extension, so on first use __main__.py extracts the lmdb
# package with the one matching .so into a per-user cache, atomically.
#
# The wheels come from PyPI with pip, or, offline (the Nix build), from --wheels
# DIR holding the lmdb wheels and the wheels of tomli and mfusepy. $PYTHON (default
# python3) runs pip and the packing.
set -euo pipefail

root=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
out=$root/grit.pyz
wheels=""
download=""
while [ $# -gt 0 ]; do
    case $1 in
        -o) out=$(realpath -m "$2"); shift 2 ;;
        --wheels) wheels=$(realpath "$2"); shift 2 ;;
        --download) download=$(realpath -m "$2"); shift 2 ;;
        *) echo "usage: $0 [-o OUT] [--wheels DIR] | --download DIR" >&2; exit 2 ;;
    esac
done

LMDB_VERSION=1.7.5      # pinned: bundles LMDB 0.9.33 (never the LMDB 1.0 format)
MFUSEPY_VERSION=3.1.1
TOMLI_VERSION=2.0.1
PYTHONS="39 310 311 312 313"
ARCHES="x86_64 aarch64"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ -z "$wheels" ]; then
    wheels=${download:-$work/wheels}
    for py in $PYTHONS; do
        for arch in $ARCHES; do
            "$python" -m pip download -q --disable-pip-version-check --no-deps \
                --only-binary=:all: --implementation cp --python-version "$py" \
                --platform "manylinux2014_$arch" -d "$wheels" "lmdb==$LMDB_VERSION"
        done
    done
    "$python" -m pip download -q --disable-pip-version-check --no-deps -d "$wheels" \
        "mfusepy==$MFUSEPY_VERSION" "tomli==$TOMLI_VERSION"
    if [ -n "$download" ]; then
        echo "downloaded to $download"
        exit 0
    fi
fi

stage=$work/stage
mkdir -p "$stage/_lmdb/lmdb" "$stage/_lmdb/ext"
cp "$root/grit.py" "$stage/"

"$python" - "$wheels" "$stage" "$LMDB_VERSION" "$MFUSEPY_VERSION" "$TOMLI_VERSION" <<'PY'
import glob, os, sys, zipfile

wheels, stage, lmdb_v, mfusepy_v, tomli_v = sys.argv[1:]
lmdb = sorted(glob.glob(os.path.join(wheels, f"lmdb-{lmdb_v}-cp3*-manylinux*.whl")))
if len(lmdb) < 10:
    sys.exit(f"build_zipapp: expected 10 lmdb {lmdb_v} wheels in {wheels}, found {len(lmdb)}")
for path in lmdb:
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if name.startswith("lmdb/cpython.") and name.endswith(".so"):
                with open(os.path.join(stage, "_lmdb", "ext", base), "wb") as f:
                    f.write(z.read(name))
            elif name in ("lmdb/__init__.py", "lmdb/_config.py"):
                with open(os.path.join(stage, "_lmdb", "lmdb", base), "wb") as f:
                    f.write(z.read(name))
with zipfile.ZipFile(glob.glob(os.path.join(wheels, f"tomli-{tomli_v}-*.whl"))[0]) as z:
    for name in z.namelist():
        if name.startswith("tomli/"):
            z.extract(name, stage)
with zipfile.ZipFile(glob.glob(os.path.join(wheels, f"mfusepy-{mfusepy_v}-*.whl"))[0]) as z:
    z.extract("mfusepy.py", stage)
PY

cat > "$stage/__main__.py" <<PY
"""grit.pyz start-up: make the lmdb C extension importable, then run grit.
Plain syntax up to the version check, so that old Pythons reach it."""
import sys

if sys.version_info < (3, 9):
    sys.exit("grit.pyz needs Python 3.9 or newer; this is Python %d.%d (%s)"
             % (sys.version_info[0], sys.version_info[1], sys.executable))

import importlib.machinery  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import zipfile  # noqa: E402

LMDB_VERSION = "$LMDB_VERSION"
ARCHIVE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("GRIT_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "grit")


def lmdb_dir():
    """A directory holding the lmdb package built for this interpreter."""
    so = "cpython" + importlib.machinery.EXTENSION_SUFFIXES[0]
    cache, archive = CACHE, ARCHIVE
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        if "_lmdb/ext/" + so not in names:
            have = sorted(n.split(".")[1] for n in names
                          if n.startswith("_lmdb/ext/") and n.endswith(".so"))
            sys.exit(f"grit.pyz: no lmdb build for this Python ({so}); it has {', '.join(have)}. "
                     "Install lmdb==1.7.5 and mfusepy with pip and run grit.py instead.")
        target = os.path.join(cache, f"lmdb-{LMDB_VERSION}-{so[len('cpython.'):-3]}")
        if os.path.isfile(os.path.join(target, "lmdb", so)):
            return target
        try:
            os.makedirs(cache, mode=0o700, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".extract-", dir=cache)
        except OSError:  # cache not writable: a private directory for this run
            tmp = target = tempfile.mkdtemp(prefix="grit-lmdb-")
        os.mkdir(os.path.join(tmp, "lmdb"))
        for name in ("__init__.py", "_config.py"):
            with open(os.path.join(tmp, "lmdb", name), "wb") as f:
                f.write(z.read("_lmdb/lmdb/" + name))
        with open(os.path.join(tmp, "lmdb", so), "wb") as f:
            f.write(z.read("_lmdb/ext/" + so))
    if tmp != target:
        try:
            os.rename(tmp, target)  # atomic: a concurrent first run may have won
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_grit():
    """The grit module, its bytecode cached per grit.py and Python beside the
    lmdb build (a zip can hold one Python's only): else every start compiles
    grit's 8,500 lines (0.15 s)."""
    import hashlib
    import marshal
    import types
    with zipfile.ZipFile(ARCHIVE) as z:
        source = z.read("grit.py")
    cached = os.path.join(CACHE, "grit-%s.%s.code" % (hashlib.sha256(source).hexdigest()[:16],
                                                      sys.implementation.cache_tag))
    try:
        with open(cached, "rb") as f:
            code = marshal.load(f)
    except (OSError, EOFError, ValueError, TypeError):
        code = compile(source, os.path.join(ARCHIVE, "grit.py"), "exec")
        tmp = ""
        try:
            os.makedirs(CACHE, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".code-", dir=CACHE)
            with os.fdopen(fd, "wb") as f:
                marshal.dump(code, f)
            os.replace(tmp, cached)  # atomic: a concurrent first run writes the same
        except OSError:  # not writable (or full): compiled at every start
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)
    module = sys.modules["grit"] = types.ModuleType("grit")
    module.__file__ = os.path.join(ARCHIVE, "grit.py")
    exec(code, module.__dict__)
    return module


sys.path.insert(0, lmdb_dir())
sys.exit(load_grit().main())
PY

rm -f "$out"
"$python" -m zipapp "$stage" -o "$out" -p "/usr/bin/env python3" -c
echo "built $out ($(wc -c < "$out") bytes)"

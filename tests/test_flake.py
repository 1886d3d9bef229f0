"""The Nix flake, checked offline: Debian's Nix against a throw-away store and a
stub nixpkgs (tests/nix/stub-nixpkgs), since nixpkgs cannot be downloaded here."""
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

SYSTEMS = ["x86_64-linux", "aarch64-linux"]
STUB = ROOT / "tests" / "nix" / "stub-nixpkgs"

pytestmark = pytest.mark.skipif(shutil.which("nix") is None,
                                reason="nix is not installed (tests/bootstrap.sh installs "
                                       "Debian's nix-bin when run as root)")


@pytest.fixture(scope="module")
def nix(tmp_path_factory):
    """Run nix in a private store with flakes on, no sandbox, no substituters."""
    base = tmp_path_factory.mktemp("nix")
    for d in ("store", "state", "conf", "home", "src"):
        (base / d).mkdir(exist_ok=True)
    (base / "conf" / "nix.conf").write_text(
        "experimental-features = nix-command flakes\nsandbox = false\n"
        "substituters =\nbuild-users-group =\n")
    # A path: flake of the tracked files (a path: reference sees untracked ones too,
    # and the venv would be copied into the store).
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files + ["flake.nix", "flake.lock"]:
        if (ROOT / name).is_file():
            (base / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, base / "src" / name)
    shutil.copytree(STUB, base / "stub")
    env = dict(os.environ, NIX_STORE_DIR=str(base / "store"), NIX_STATE_DIR=str(base / "state"),
               NIX_CONF_DIR=str(base / "conf"), NIX_LOG_DIR=str(base / "state" / "log"),
               HOME=str(base / "home"))

    def run(*args, stub=True):
        cmd = ["nix", *args]
        if stub:  # options go before a "--" that starts the program's own arguments
            at = cmd.index("--") if "--" in cmd else len(cmd)
            cmd[at:at] = ["--no-write-lock-file", "--override-input", "nixpkgs",
                          f"path:{base / 'stub'}"]
        proc = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"
        return proc.stdout

    run.flake = f"path:{base / 'src'}"
    run.env = env
    return run


def test_flake_parses(nix):
    for path in (ROOT / "flake.nix", STUB / "flake.nix"):
        subprocess.run(["nix-instantiate", "--parse", str(path)], env=nix.env, check=True,
                       capture_output=True)


def test_lock_is_consistent_without_fetching(nix):
    lock = json.loads((ROOT / "flake.lock").read_text())
    node = lock["nodes"]["nixpkgs"]
    assert node["original"] == {"owner": "NixOS", "repo": "nixpkgs", "ref": "nixos-25.11",
                                "type": "github"}
    assert node["locked"]["rev"] == "b6018f87da91d19d0ab4cf979885689b469cdd41"
    nix("flake", "lock", "--no-update-lock-file", nix.flake, stub=False)


def test_flake_check(nix):
    nix("flake", "check", nix.flake)


@pytest.mark.parametrize("system", SYSTEMS)
def test_every_output_evaluates(nix, system):
    def ev(attr):
        return json.loads(nix("eval", "--json", f"{nix.flake}#{attr}"))

    assert ev(f"packages.{system}.grit.name") == "grit-0.1.0"
    assert ev(f"packages.{system}.default.name") == "grit-0.1.0"
    assert ev(f"packages.{system}.grit-pyz.name") == "grit-pyz-0.1.0"
    assert ev(f"apps.{system}.default.type") == "app"
    assert ev(f"apps.{system}.default.program").endswith("-grit-0.1.0/bin/grit")
    assert ev(f"devShells.{system}.default.drvPath").endswith(".drv")
    assert ev(f"checks.{system}.tests.drvPath").endswith(".drv")


def test_overlay_and_nixos_module(nix):
    assert nix("eval", f"{nix.flake}#overlays.default", "--apply",
               "f: builtins.isFunction f").strip() == "true"
    # Apply the module to stand-in arguments: it installs grit and turns on
    # programs.fuse where the option exists, and only there.
    apply = ('m: let lib = { mkMerge = xs: xs; mkDefault = x: x; '
             'optionalAttrs = c: a: if c then a else {}; }; '
             'pkgs = { python3Packages = { buildPythonApplication = a: a.pname; lmdb = 1; '
             'mfusepy = 1; }; fuse3 = "fuse3"; }; '
             'with_ = (m { inherit lib pkgs; options.programs.fuse.enable = {}; }).config; '
             'without = (m { inherit lib pkgs; options.programs.fuse = {}; }).config; '
             'in { inherit with_ without; }')
    result = json.loads(nix("eval", "--json", f"{nix.flake}#nixosModules.default", "--apply",
                            apply))
    assert result["with_"] == [{"environment": {"systemPackages": ["grit", "fuse3"]}},
                               {"programs": {"fuse": {"enable": True}}}]
    assert result["without"] == [{"environment": {"systemPackages": ["grit", "fuse3"]}}, {}]


def test_build_and_run_the_package(nix):
    built = json.loads(nix("build", "--no-link", "--json",
                           f"{nix.flake}#packages.x86_64-linux.default"))
    grit = os.path.join(built[0]["outputs"]["out"], "bin", "grit")
    help_text = subprocess.run([grit, "--help"], capture_output=True, text=True, check=True)
    assert "-export-hash" in help_text.stdout
    assert "-export-hash" in nix("run", nix.flake, "--", "--help")
    # The wrapper points mfusepy at a libfuse3.so.3 that exists in the built fuse3 package.
    [library] = re.findall(r'export FUSE_LIBRARY_PATH="\$\{FUSE_LIBRARY_PATH-([^}]*)\}"',
                           open(grit).read())
    assert library.endswith("/lib/libfuse3.so.3") and os.path.isfile(library), library

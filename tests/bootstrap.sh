#!/usr/bin/env bash
# Makes a fresh machine ready to run grit and its tests, then prints the path
# of the Python to use. Idempotent: later calls only check.
#   - a venv in .venv with grit's dependencies and the test tools;
#   - FUSE (fuse3 for fusermount3, libfuse3 for mfusepy, and libfuse2, whose path
#     the emission tests also run on), Nix (nix-bin, for the offline flake
#     check), Slurm (slurmctld, slurmd, slurm-client, munge: the two-node
#     cluster of tests/slurm-cluster.sh), openssh-server and sshfs (a work dir
#     shared as over a network: tests/sshfs-share.sh), xfsprogs (a
#     loop-mounted XFS image with reflinks), chromium (the report's browser
#     test) and graphviz (-graph's DOT) when root on Debian/Ubuntu and missing.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${GRIT_VENV:-$root/.venv}
python=${PYTHON:-python3}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    command -v fusermount3 >/dev/null || missing+=(fuse3)
    # read whole: `ldconfig -p | grep -q` fails under pipefail when grep stops early
    libs=$(ldconfig -p 2>/dev/null || true)
    grep -q 'libfuse3\.so\.3' <<<"$libs" || missing+=(libfuse3-3)
    grep -q 'libfuse\.so\.2' <<<"$libs" || missing+=(libfuse2)
    command -v nix >/dev/null || missing+=(nix-bin)   # the offline flake check
    "$python" -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)  # Debian splits it out
    command -v rsync >/dev/null || missing+=(rsync)   # a FUSE test writes with it
    command -v mkfs.xfs >/dev/null || missing+=(xfsprogs)  # a reflink filesystem (loop image)
    # a two-node Slurm cluster on this machine (tests/slurm-cluster.sh) for the Slurm tests
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    # a work dir shared as a network filesystem shares it (tests/sshfs-share.sh)
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    command -v sshfs >/dev/null || missing+=(sshfs)
    # the HTML report opened in a real browser, and -graph's DOT read by Graphviz
    command -v chromium >/dev/null || missing+=(chromium)
    command -v dot >/dev/null || missing+=(graphviz)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "bootstrap: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        # wait for another apt (unattended upgrades on a fresh VM) rather than fail
        wait=(-o DPkg::Lock::Timeout=600 -o Acquire::Lock::Timeout=600)
        apt-get "${wait[@]}" update -qq >&2
        apt-get "${wait[@]}" install -y -qq "${missing[@]}" >&2
    fi
fi

stamp=$venv/.requirements
want=$(cat "$root/requirements.txt" "$root/tests/requirements.txt")
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bootstrap: preparing $venv" >&2
    "$python" -m venv "$venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        -r "$root/tests/requirements.txt" >&2
    printf '%s' "$want" > "$stamp"
fi
echo "$venv/bin/python"

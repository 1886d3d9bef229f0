#!/usr/bin/env bash
# A folder shared the way a network filesystem shares it between hosts, on one
# machine: a private sshd on 127.0.0.1 (its own port and keys, made here)
# serves DIR/export, which is mounted with sshfs at DIR/work twice: once for
# the caller, and once, at the same path, in a mount namespace of its own
# (as a second host would have it). Each mount caches directory listings
# (sshfs's dcache_timeout, 20 s by default; like NFS's acdirmin/acdirmax), so
# what one writes shows late in the other's listings.
#
#   tests/sshfs-share.sh start DIR   # prints the mount namespace's pid
#   tests/sshfs-share.sh stop DIR    # unmounts both, stops sshd and the namespace by pid
#
# Run a program on the "second host" with `nsenter -t PID -m PROGRAM`
# (tests/slurm-cluster.sh does, for its slurmd, when GRIT_SLURMD_NAMESPACE=PID).
# GRIT_SSHFS_OPTIONS adds sshfs options to the caller's mount (e.g.
# dcache_timeout=3600: its listings never change during a test). Needs root,
# sshd (openssh-server), sshfs and util-linux's unshare and nsenter.
set -euo pipefail

action=${1:?usage: $0 start|stop DIR}
dir=$(realpath -m "${2:?usage: $0 start|stop DIR}")

alive() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

stop() {
    if alive namespace; then
        nsenter -t "$(cat "$dir/namespace.pid")" -m fusermount3 -u "$dir/work" 2>/dev/null || true
        kill "$(cat "$dir/namespace.pid")"
    fi
    fusermount3 -u "$dir/work" 2>/dev/null || true
    if alive sshd; then kill "$(cat "$dir/sshd.pid")"; fi
    rm -f "$dir/namespace.pid" "$dir/sshd.pid"
}

mount_share() {  # mount_share [nsenter -t PID -m] EXTRA_OPTIONS
    local options=$1; shift
    "$@" sshfs -p "$(cat "$dir/port")" \
        -o "IdentityFile=$dir/ssh/client,UserKnownHostsFile=/dev/null,StrictHostKeyChecking=no" \
        -o "BatchMode=yes,LogLevel=ERROR${options:+,$options}" \
        "root@127.0.0.1:$dir/export" "$dir/work" </dev/null >>"$dir/sshfs.log" 2>&1
}

start() {
    stop
    mkdir -p "$dir/ssh" "$dir/export" "$dir/work" /run/sshd
    chmod 700 "$dir/ssh"
    [ -f "$dir/ssh/host" ] || ssh-keygen -q -t ed25519 -N "" -f "$dir/ssh/host"
    [ -f "$dir/ssh/client" ] || ssh-keygen -q -t ed25519 -N "" -f "$dir/ssh/client"
    cp "$dir/ssh/client.pub" "$dir/ssh/authorized_keys"
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
        > "$dir/port"
    cat > "$dir/ssh/sshd_config" <<EOF
Port $(cat "$dir/port")
ListenAddress 127.0.0.1
HostKey $dir/ssh/host
AuthorizedKeysFile $dir/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $dir/sshd.pid
Subsystem sftp internal-sftp
EOF
    "$(command -v sshd || echo /usr/sbin/sshd)" -f "$dir/ssh/sshd_config" -E "$dir/sshd.log"
    for _ in $(seq 1 100); do alive sshd && break; sleep 0.1; done
    # the second host: a mount namespace kept by a process that only waits
    unshare -m --propagation private sleep infinity </dev/null >/dev/null 2>&1 &
    echo $! > "$dir/namespace.pid"
    for _ in $(seq 1 100); do
        [ "$(readlink "/proc/$!/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ] && break
        sleep 0.05
    done
    mount_share "${GRIT_SSHFS_OPTIONS:-}"
    mount_share "" nsenter -t "$(cat "$dir/namespace.pid")" -m
    cat "$dir/namespace.pid"
}

case $action in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac

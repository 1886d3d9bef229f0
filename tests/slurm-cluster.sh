#!/usr/bin/env bash
# A Slurm cluster of N nodes on this one machine for the tests: munged,
# slurmctld and one slurmd per node run as the caller (root) with every file
# under one folder, no systemd needed.
#
#   tests/slurm-cluster.sh start DIR [N]  # idempotent; prints the slurm.conf path
#   tests/slurm-cluster.sh stop DIR       # stops every daemon by pid
#
# Clients reach it with SLURM_CONF=DIR/slurm.conf. The nodes are named
# grit-node1 .. grit-nodeN (default N = 1); each is a slurmd started with
# `slurmd -N NAME`, listening on a port of its own at 127.0.0.1, and
# `scontrol update nodename=grit-node2 state=down` takes one down. Together
# they advertise 4 CPUs whatever the machine has, split evenly
# (SlurmdParameters=config_overrides), batch jobs start
# at once (batch_sched_delay=0), finished jobs leave squeue after MinJobAge
# seconds (GRIT_SLURM_MIN_JOB_AGE, default 10), a job gets 100 MB a CPU unless
# it asks, and every finished job is appended to DIR/jobcomp.log (there is no
# accounting database).
set -euo pipefail

action=${1:?usage: $0 start|stop DIR [NODES]}
dir=$(realpath -m "${2:?usage: $0 start|stop DIR [NODES]}")
nodes=${3:-1}
conf=$dir/slurm.conf
host=$(hostname -s)

alive() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

stop() {
    local daemons=()
    for pidfile in "$dir"/slurmd-*.pid; do
        [ -f "$pidfile" ] && daemons+=("$(basename "$pidfile" .pid)")
    done
    for daemon in "${daemons[@]}" slurmctld munged; do
        if alive "$daemon"; then
            pid=$(cat "$dir/$daemon.pid")
            kill "$pid"
            for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/$daemon.pid"
    done
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
    cat > "$conf" <<EOF
ClusterName=grit-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.socket
CredType=cred/munge
SlurmctldPort=$(free_port)
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=${GRIT_SLURM_MIN_JOB_AGE:-10}
DefMemPerCPU=100
KillWait=5
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.log
EOF
    for n in $(seq 1 "$nodes"); do
        echo "NodeName=grit-node$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$(free_port)" \
             "CPUs=$((4 / nodes)) RealMemory=$((4000 / nodes)) State=UNKNOWN" >> "$conf"
    done
    echo "PartitionName=debug Nodes=grit-node[1-$nodes] Default=YES MaxTime=INFINITE State=UP" \
        >> "$conf"
}

all_alive() {
    alive slurmctld && alive munged || return 1
    for n in $(seq 1 "$nodes"); do alive "slurmd-grit-node$n" || return 1; done
}

start() {
    if all_alive; then
        echo "$conf"
        return
    fi
    stop
    mkdir -p "$dir/state"
    for n in $(seq 1 "$nodes"); do mkdir -p "$dir/spool/grit-node$n"; done
    chmod 700 "$dir"
    [ -f "$dir/munge.key" ] || { head -c 1024 /dev/urandom > "$dir/munge.key"; chmod 400 "$dir/munge.key"; }
    write_conf
    munged --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
    export SLURM_CONF=$conf
    slurmctld -f "$conf"
    # GRIT_SLURMD_NAMESPACE=PID: the nodes live in that process's mount namespace
    # (tests/sshfs-share.sh: the work dir mounted as a second host mounts it)
    local enter=()
    [ -z "${GRIT_SLURMD_NAMESPACE:-}" ] || enter=(nsenter -t "$GRIT_SLURMD_NAMESPACE" -m)
    for n in $(seq 1 "$nodes"); do "${enter[@]}" slurmd -f "$conf" -N "grit-node$n"; done
    for _ in $(seq 1 300); do
        state=$(sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [ "$state" = "idle " ]; then
            echo "$conf"
            return
        fi
        sleep 0.1
    done
    echo "slurm-cluster: the nodes did not become idle (state: ${state:-none}); logs in $dir" >&2
    stop
    exit 1
}

case $action in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop DIR [NODES]" >&2; exit 2 ;;
esac

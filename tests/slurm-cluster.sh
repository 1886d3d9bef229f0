#!/usr/bin/env bash
# A single-node Slurm cluster for the tests: munged, slurmctld and slurmd run
# as the caller (root) with every file under one folder, no systemd needed.
#
#   tests/slurm-cluster.sh start DIR   # idempotent; prints the slurm.conf path
#   tests/slurm-cluster.sh stop DIR    # stops the three daemons by pid
#
# Clients reach it with SLURM_CONF=DIR/slurm.conf. The node advertises 4 CPUs
# whatever the machine has (SlurmdParameters=config_overrides), batch jobs start
# at once (batch_sched_delay=0), finished jobs leave squeue after MinJobAge
# seconds (GRIT_SLURM_MIN_JOB_AGE, default 10), a job gets 100 MB a CPU unless
# it asks, and every finished job is appended to DIR/jobcomp.log (there is no
# accounting database).
set -euo pipefail

action=${1:?usage: $0 start|stop DIR}
dir=$(realpath -m "${2:?usage: $0 start|stop DIR}")
conf=$dir/slurm.conf
host=$(hostname -s)

alive() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

stop() {
    for daemon in slurmd slurmctld munged; do
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
SlurmdPort=$(free_port)
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
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
NodeName=$host CPUs=4 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    if alive slurmctld && alive slurmd && alive munged; then
        echo "$conf"
        return
    fi
    stop
    mkdir -p "$dir/state" "$dir/spool"
    chmod 700 "$dir"
    [ -f "$dir/munge.key" ] || { head -c 1024 /dev/urandom > "$dir/munge.key"; chmod 400 "$dir/munge.key"; }
    write_conf
    munged --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
    export SLURM_CONF=$conf
    slurmctld -f "$conf"
    slurmd -f "$conf" -N "$host"
    for _ in $(seq 1 300); do
        state=$(sinfo -h -N -o %t 2>/dev/null || true)
        if [ "$state" = idle ]; then
            echo "$conf"
            return
        fi
        sleep 0.1
    done
    echo "slurm-cluster: the node did not become idle (state: ${state:-none}); logs in $dir" >&2
    stop
    exit 1
}

case $action in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac

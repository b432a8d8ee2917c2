#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, every daemon on 127.0.0.1, for tests and for trying
# `hydra/launcher=submitit_slurm` without a real cluster.
#
#   scripts/slurm_local.sh start   # install if missing (Debian/Ubuntu, as root), write a config to a
#                                  # temp folder, start munged, slurmctld and slurmd, wait for an idle node
#   scripts/slurm_local.sh env     # print `export SLURM_CONF=...` (eval it to use sbatch, sinfo, ... here)
#   scripts/slurm_local.sh stop    # stop the daemons this script started (by their pid files)
#
# Loopback only: slurmctld and slurmd bind to the address their host name resolves to
# (CommunicationParameters=NoCtldInAddrAny,NoInAddrAny), and that name is `localhost`, 127.0.0.1;
# munged talks over a Unix socket in the same folder. The partition is `debug`.
# VGBENCH_SLURM_DIR (default /tmp/vgbench-slurm) holds the config, state, logs and pid files.
# Faster than a real cluster's defaults, so the requeue tests take minutes: a requeued job may start
# again cred_expire+1 = 11 s after its requeue (default 121 s), the scheduler looks at the queue every
# 2 s (default 60 s); SlurmctldDebug=debug logs each time-limit warning signal the controller sends.
set -euo pipefail

DIR="${VGBENCH_SLURM_DIR:-/tmp/vgbench-slurm}"
CONF="$DIR/slurm.conf"

need_install() {
    for b in slurmctld slurmd sinfo sbatch munged; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 0
    done
    return 1
}

install() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "error: SLURM is not installed; as root on Debian/Ubuntu run:" \
             "apt-get update && apt-get install -y slurmctld slurmd slurm-client munge" >&2
        exit 1
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {  # to $1
    mkdir -p "$DIR/state" "$DIR/spool"
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # half the RAM, in MB
    cat >"$1" <<EOF
ClusterName=vgbench
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=${VGBENCH_SLURMCTLD_PORT:-6817}
SlurmdPort=${VGBENCH_SLURMD_PORT:-6818}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
KillWait=10
SlurmctldDebug=debug
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start() {
    need_install && install
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        write_conf "$CONF.now"
        if ! cmp -s "$CONF" "$CONF.now"; then  # started by an older version of this script
            rm -f "$CONF.now"
            echo "error: the cluster running in $DIR has another configuration: $0 stop, then start" >&2
            exit 1
        fi
        rm -f "$CONF.now"
        echo "already running: export SLURM_CONF=$CONF"
        return 0
    fi
    write_conf "$CONF"
    /usr/sbin/munged --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed" --force
    export SLURM_CONF="$CONF"
    /usr/sbin/slurmctld -f "$CONF" -i   # -i: ignore state from an earlier start
    /usr/sbin/slurmd -f "$CONF" -N localhost
    # wait (bounded) until the node reports idle
    for _ in $(seq 1 120); do
        if sinfo -h -N -o "%t" 2>/dev/null | grep -qx "idle"; then
            echo "SLURM is up (partition debug): export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "error: the node did not become idle in 60 s; see $DIR/slurmctld.log and $DIR/slurmd.log" >&2
    exit 1
}

stop() {
    for d in slurmd slurmctld munged; do
        f="$DIR/$d.pid"
        if [ -f "$f" ]; then
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$f"
        fi
    done
    echo "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac

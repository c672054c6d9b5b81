#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for the tests and for trying dynlab's Slurm path on a laptop.
#
#   slurm/local-cluster.sh start    (as root) install slurmctld/slurmd/munge if missing (apt-get),
#                                   write the config and start the daemons (idempotent)
#   slurm/local-cluster.sh status   exit 0 only when the node is idle, mixed or allocated
#   slurm/local-cluster.sh stop     cancel this cluster's jobs and stop its daemons
#
# Everything (slurm.conf, spool, state, logs, pid files, munge key and socket) lives under
# ${DYNLAB_SLURM_DIR:-/tmp/dynlab-slurm}; nothing under /etc is written. Client commands find the
# cluster through SLURM_CONF: `start` prints the export line to use. `start` exits 3 when Slurm is
# missing and cannot be installed. A requeued job waits ~2 minutes (Slurm's BeginTime hold);
# `scontrol update jobid=<id> starttime=now` releases it sooner.
set -euo pipefail

DIR=${DYNLAB_SLURM_DIR:-/tmp/dynlab-slurm}
CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
CTLD_PORT=${DYNLAB_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${DYNLAB_SLURMD_PORT:-6818}
NODE=$(hostname -s)
export SLURM_CONF=$CONF

log() { echo "local-cluster: $*" >&2; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        log "missing ${missing[*]}: install them (Debian/Ubuntu: run this script as root)"
        exit 3
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
        log "apt-get could not install ${missing[*]}"
        exit 3
    fi
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
    mkdir -p "$DIR"/{state,spool,log,run} "$MUNGE_DIR"
    chmod 700 "$MUNGE_DIR"
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10 / 1024))
    cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh for Slurm $(slurmctld -V | awk '{print $2}'), whenever it starts the daemons.
ClusterName=dynlab-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
MailProg=/bin/true

# No cgroups (containers, CI): track processes by parent id; no accounting database.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none

SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem_mb / cpus))
SlurmdParameters=config_overrides
ReturnToService=2

# Jobs may requeue themselves (dynlab's preemption handler) and be preempted (requeued) by jobs
# of the urgent partition; a preempted job gets SIGTERM, then GraceTime seconds to checkpoint.
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE

# Short timeouts so that tests are quick.
MessageTimeout=10
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
BatchStartTimeout=10

NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
}

start_munge() {
    alive "$MUNGE_DIR/munged.pid" && return
    [[ -f $MUNGE_DIR/munge.key ]] || {
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        chmod 400 "$MUNGE_DIR/munge.key"
    }
    munged --force --socket="$MUNGE_DIR/munge.socket" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed"
}

node_state() { sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n1 || true; }

status() {
    local state
    state=$(node_state)
    echo "node $NODE: ${state:-no answer} (SLURM_CONF=$CONF)"
    [[ $state =~ ^(idle|mix|alloc)$ ]]
}

start() {
    install_packages
    if ! alive "$DIR/run/slurmctld.pid" && ! alive "$DIR/run/slurmd.pid"; then
        write_config
    fi
    start_munge
    alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF"
    alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF" -N "$NODE"
    for _ in $(seq 60); do
        if status >/dev/null; then
            status
            echo "export SLURM_CONF=$CONF"
            return
        fi
        [[ $(node_state) == down* ]] && scontrol update nodename="$NODE" state=resume 2>/dev/null || true
        sleep 1
    done
    status || true
    log "the node did not come up; logs are in $DIR/log"
    tail -n 20 "$DIR"/log/*.log >&2 || true
    exit 1
}

stop_daemon() {
    local pidfile=$1 pid
    alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    if alive "$DIR/run/slurmctld.pid"; then
        squeue -h -o %A | xargs -r scancel 2>/dev/null || true
    fi
    stop_daemon "$DIR/run/slurmd.pid"
    stop_daemon "$DIR/run/slurmctld.pid"
    stop_daemon "$MUNGE_DIR/munged.pid"
    echo "stopped (state and logs kept in $DIR)"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac

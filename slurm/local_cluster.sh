#!/usr/bin/env bash
# slurm/local_cluster.sh: a throwaway two-node Slurm cluster on this one machine.
#
#   slurm/local_cluster.sh start    install the packages if missing, write the config,
#                                   start munged, slurmctld and two slurmd (n1, n2),
#                                   wait until both nodes are idle (idempotent)
#   slurm/local_cluster.sh stop     cancel every job, stop the daemons this script
#                                   started (by their pid files) and wait until gone
#   slurm/local_cluster.sh status   say which daemons run, show sinfo;
#                                   exit 0 if all run, 1 otherwise
#   slurm/local_cluster.sh env      print the line that points Slurm's clients here:
#                                   eval "$(slurm/local_cluster.sh env)"
#   slurm/local_cluster.sh install  only install the packages if missing (CI does this
#                                   first, so that the tests' start takes seconds)
#
# It is for tests and for trying the SLURM path of the toolkit without a cluster.
# Run it as root (the daemons run as root, munged as the `munge` user).
#
# Everything it writes lives in ONE scratch folder, ${BATCHKIT_SLURM_DIR:-/tmp/batchkit-slurm}:
#
#   slurm.conf        the cluster's config (clients find it through SLURM_CONF,
#                     since there is no /etc/slurm/slurm.conf)
#   munge/            munged's key, socket, pid, log and seed (owned by munge)
#   state/            slurmctld's StateSaveLocation
#   spool/n1, n2      each slurmd's SlurmdSpoolDir
#   run/              pid files of slurmctld and of each slurmd
#   log/              slurmctld.log, slurmd-n1.log, slurmd-n2.log, and the
#                     daemons' own stdout/stderr (*.out: early start-up errors)
#
# Nothing is written to /etc, and nothing is stopped by name: `stop` only
# signals the pids found in the pid files above (and the job processes whose
# slurmstepd one of our slurmd started).  Remove the folder by hand
# (rm -rf /tmp/batchkit-slurm) for a completely fresh cluster.
#
# The cluster: ClusterName=batchkit-local, controller on localhost:16817,
# nodes n1 and n2 (both 127.0.0.1, slurmd ports 17001 and 17002), each
# advertising CPUs=4 whatever the machine has, so that up to 4 one-CPU tasks
# fit per node even on a 2-core machine; one partition "debug" (the default).
# Slurm's state (the jobs it knows) is kept across stop/start.

set -euo pipefail

# The daemons live in /usr/sbin, which a non-login root shell may lack in PATH.
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

# ----------------------------------------------------------------------------
# Where everything lives
# ----------------------------------------------------------------------------

DIR_RAW="${BATCHKIT_SLURM_DIR:-/tmp/batchkit-slurm}"
# An absolute path, so that the script and the config work from any cwd.
DIR="$(realpath -m -- "$DIR_RAW")"

CONF="$DIR/slurm.conf"
MUNGE_DIR="$DIR/munge"
MUNGE_KEY="$MUNGE_DIR/munge.key"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
MUNGE_PID="$MUNGE_DIR/munged.pid"
MUNGE_LOG="$MUNGE_DIR/munged.log"
MUNGE_SEED="$MUNGE_DIR/munged.seed"
STATE_DIR="$DIR/state"
SPOOL_DIR="$DIR/spool"
RUN_DIR="$DIR/run"
LOG_DIR="$DIR/log"
CTLD_PID="$RUN_DIR/slurmctld.pid"

NODES=(n1 n2)
NODE_LIST="n[1-2]"
CTLD_PORT=16817

# Every daemon this script starts carries this variable in its environment;
# `stop` uses it to recognise leftover slurmstepd processes of this cluster
# (slurmstepd inherits it from our slurmd).
MARK_VAR="BATCHKIT_SLURM_DAEMON_DIR"

# Our own calls of sinfo, scontrol, squeue and scancel talk to this cluster.
export SLURM_CONF="$CONF"

# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------

say() { printf 'local_cluster: %s\n' "$*" >&2; }
die() { printf 'local_cluster: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# The slurmd port of node nK: 17000 + K (Port=17001-17002 in slurm.conf).
node_port() { printf '%s\n' "$((17000 + ${1#n}))"; }

slurmd_pid_file() { printf '%s/slurmd-%s.pid\n' "$RUN_DIR" "$1"; }

# alive PID: the process exists and is not a zombie (a daemon killed while
# its parent is pid 1 may stay a zombie for a while if pid 1 reaps slowly).
alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"  # drop "pid (comm) ": the state letter comes next
    [[ "${stat%% *}" != [ZX] ]]
}

# pid_from FILE NAME: the pid recorded in FILE if that process is alive and
# is the daemon we expect (its /proc/PID/comm starts with NAME), else nothing.
# The name check guards against a stale pid file whose pid was reused.
pid_from() {
    local file="$1" name="$2" pid comm
    [[ -r "$file" ]] || return 1
    pid="$({ tr -dc '0-9' <"$file"; } 2>/dev/null || true)"
    [[ -n "$pid" ]] || return 1
    alive "$pid" || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    [[ "$comm" == "$name"* ]] || return 1
    printf '%s\n' "$pid"
}

munged_pid()    { pid_from "$MUNGE_PID" munged; }
slurmctld_pid() { pid_from "$CTLD_PID" slurmctld; }
slurmd_pid()    { pid_from "$(slurmd_pid_file "$1")" slurmd; }

all_running() {
    munged_pid >/dev/null && slurmctld_pid >/dev/null || return 1
    local n
    for n in "${NODES[@]}"; do slurmd_pid "$n" >/dev/null || return 1; done
}

# wait_gone PID SECONDS: 0 once PID has exited, 1 if it still runs after SECONDS.
wait_gone() {
    local pid="$1" deadline=$((SECONDS + $2))
    while alive "$pid"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# stop_pid PID WHAT: TERM, wait up to 15 s, then KILL and wait again.
stop_pid() {
    local pid="$1" what="$2"
    kill -TERM "$pid" 2>/dev/null || return 0
    if ! wait_gone "$pid" 15; then
        say "$what (pid $pid) ignored SIGTERM for 15 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || die "$what (pid $pid) survived SIGKILL"
    fi
}

# The last lines of a log, to explain a failure.
show_log() {
    local f
    for f in "$@"; do
        [[ -s "$f" ]] || continue
        printf -- '--- last lines of %s ---\n' "$f" >&2
        tail -n 15 "$f" >&2
    done
}

# ----------------------------------------------------------------------------
# Packages
# ----------------------------------------------------------------------------

# Debian 12's slurm 22.05 packages: slurmctld, slurmd, slurm-client, munge.
ensure_packages() {
    local cmd missing=()
    for cmd in munged munge mungekey slurmctld slurmd sbatch srun sinfo squeue scontrol scancel runuser; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) && return 0

    say "missing ${missing[*]}; installing slurmctld slurmd slurm-client munge"
    command -v apt-get >/dev/null 2>&1 || die "no apt-get: install slurmctld, slurmd, slurm-client and munge by hand"
    local pkgs=(slurmctld slurmd slurm-client munge)
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be missing or stale on a fresh machine: update
    # them only when the first install attempt fails.
    if ! apt-get install -y -q "${pkgs[@]}"; then
        apt-get update -q
        apt-get install -y -q "${pkgs[@]}"
    fi
    for cmd in "${missing[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || die "$cmd still missing after installing ${pkgs[*]}"
    done
}

# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------

need_root() { [[ $EUID -eq 0 ]] || die "run this as root (the daemons run as root)"; }

check_dir() {
    [[ "$DIR" != *[[:space:]]* ]] || die "BATCHKIT_SLURM_DIR must not contain spaces: '$DIR'"
    # Unix socket paths are limited to 107 bytes; slurmd's step sockets are
    # <spool>/<node>/<node>_<jobid>.<stepid>, so keep the folder short.
    ((${#DIR} <= 60)) || die "BATCHKIT_SLURM_DIR is too long for Unix socket paths (${#DIR} > 60 characters): '$DIR'"
    [[ "$DIR" != / ]] || die "BATCHKIT_SLURM_DIR must not be /"
}

# The folders, with the owners the daemons need.  munged refuses folders that
# others may write to, hence 0755 everywhere.
make_dirs() {
    local n
    install -d -m 0755 "$DIR" "$STATE_DIR" "$SPOOL_DIR" "$RUN_DIR" "$LOG_DIR"
    for n in "${NODES[@]}"; do install -d -m 0755 "$SPOOL_DIR/$n"; done
    # munged runs as the munge user and writes its pid, log, seed and socket here.
    install -d -m 0755 -o munge -g munge "$MUNGE_DIR"
    # ...so the munge user must be able to reach it: every folder above the
    # scratch folder must be searchable by others (pytest's tmp_path folders,
    # for one, are 0700: not there).  The scratch folder itself is made 0755
    # above, even if it existed with another mode (e.g. from mktemp -d).
    if ! runuser -u munge -- test -w "$MUNGE_DIR"; then
        local p="$DIR"
        while [[ "$p" != / ]]; do
            p="$(dirname "$p")"
            runuser -u munge -- test -x "$p" || break
        done
        die "the munge user cannot reach $MUNGE_DIR: $p ($(stat -c '%A %U' "$p")) is not searchable by others; put BATCHKIT_SLURM_DIR elsewhere (e.g. under /tmp)"
    fi
}

# A munge key of the cluster's own (never /etc/munge/munge.key), readable by
# the munge user only, as munged demands.
make_munge_key() {
    [[ -s "$MUNGE_KEY" ]] && return 0
    if ! runuser -u munge -- mungekey --create --keyfile="$MUNGE_KEY" >/dev/null 2>&1; then
        rm -f "$MUNGE_KEY"
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0600 "$MUNGE_KEY"
}

write_conf() {
    local tmp="$CONF.tmp.$$"
    cat >"$tmp" <<EOF
# Written by slurm/local_cluster.sh: a throwaway two-node cluster on this
# machine.  Rewritten at each start; edit the script, not this file.
ClusterName=batchkit-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root

# Authentication through our own munged.  cred_expire=10 (default 120 s):
# Slurm holds a requeued job until the credentials of its last run have
# expired, so a requeued job starts again after ~11 s instead of ~2 minutes.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10

# No cgroups, no accounting database: processes are tracked by their parent
# pids, and sacct has nothing to show (use scontrol show job / squeue).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true

# Cores are the unit of allocation, so several jobs share a node.  The nodes
# advertise CPUs=4 whatever this machine has: config_overrides makes slurmd
# report the configured sizes instead of draining a node that looks smaller.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides

# Fast scheduling: the main scheduler runs every 2 s (default 60 s) and
# backfill every second (default 30 s), so a submitted or requeued job starts
# within seconds.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1

# Jobs: SIGTERM, then SIGKILL 30 s later; finished jobs stay visible to
# squeue/scontrol for 10 minutes; batch jobs may be requeued; a node that
# was DOWN comes back as soon as its slurmd registers.
KillWait=30
MinJobAge=600
JobRequeue=1
ReturnToService=2
SlurmdTimeout=60
SlurmctldTimeout=30
InactiveLimit=0

# Files, all under $DIR (%n is the node's name).
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# Two nodes on this host, each with its own slurmd (slurmd -N n1 / -N n2).
NodeName=$NODE_LIST NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001-17002 CPUs=4 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP
EOF
    mv -f "$tmp" "$CONF"
}

# ----------------------------------------------------------------------------
# Starting the daemons
# ----------------------------------------------------------------------------

# Runs a daemon from / with our mark in its environment, stdin from /dev/null
# and stdout/stderr to log/NAME.out, so that it holds no caller's pipe or cwd.
launch() {
    local name="$1"
    shift
    (cd / && exec env "$MARK_VAR=$DIR" "$@" </dev/null >>"$LOG_DIR/$name.out" 2>&1)
}

# port_busy PORT: something on this machine listens on PORT.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The ports of the Slurm daemons that are to start must be free.  A cluster
# of another BATCHKIT_SLURM_DIR holds them: say so before starting anything
# (the daemons themselves would fail with a less clear message).
check_ports() {
    local n
    if ! slurmctld_pid >/dev/null && port_busy "$CTLD_PORT"; then
        die "port $CTLD_PORT (slurmctld) is taken: is a cluster of another BATCHKIT_SLURM_DIR running? (stop it with that BATCHKIT_SLURM_DIR)"
    fi
    for n in "${NODES[@]}"; do
        if ! slurmd_pid "$n" >/dev/null && port_busy "$(node_port "$n")"; then
            die "port $(node_port "$n") (slurmd $n) is taken: is a cluster of another BATCHKIT_SLURM_DIR running? (stop it with that BATCHKIT_SLURM_DIR)"
        fi
    done
}

start_munged() {
    if munged_pid >/dev/null; then return 0; fi
    rm -f "$MUNGE_PID"
    make_munge_key
    say "starting munged (socket $MUNGE_SOCKET)"
    # munged removes a stale socket itself (it holds a lock file next to it).
    launch munged runuser -u munge -- /usr/sbin/munged \
        --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_PID" \
        --log-file="$MUNGE_LOG" --seed-file="$MUNGE_SEED" \
        --key-file="$MUNGE_KEY" ||
        { show_log "$LOG_DIR/munged.out" "$MUNGE_LOG"; die "munged did not start"; }
    local deadline=$((SECONDS + 15))
    until munged_pid >/dev/null && munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { show_log "$LOG_DIR/munged.out" "$MUNGE_LOG"; die "munged did not come up within 15 s"; }
        sleep 0.2
    done
}

start_slurmctld() {
    if slurmctld_pid >/dev/null; then return 0; fi
    rm -f "$CTLD_PID"
    say "starting slurmctld (port $CTLD_PORT)"
    launch slurmctld slurmctld -f "$CONF" ||
        { show_log "$LOG_DIR/slurmctld.out" "$LOG_DIR/slurmctld.log"; die "slurmctld did not start"; }
    local deadline=$((SECONDS + 30))
    until slurmctld_pid >/dev/null && scontrol ping 2>/dev/null | grep -q 'is UP'; do
        if ((SECONDS >= deadline)); then
            show_log "$LOG_DIR/slurmctld.out" "$LOG_DIR/slurmctld.log"
            die "slurmctld did not answer within 30 s (is port $CTLD_PORT taken by another cluster?)"
        fi
        sleep 0.5
    done
}

start_slurmd() {
    local n="$1"
    if slurmd_pid "$n" >/dev/null; then return 0; fi
    rm -f "$(slurmd_pid_file "$n")"
    say "starting slurmd for node $n"
    launch "slurmd-$n" slurmd -f "$CONF" -N "$n" ||
        { show_log "$LOG_DIR/slurmd-$n.out" "$LOG_DIR/slurmd-$n.log"; die "slurmd -N $n did not start"; }
    local deadline=$((SECONDS + 15))
    until slurmd_pid "$n" >/dev/null; do
        if ((SECONDS >= deadline)); then
            show_log "$LOG_DIR/slurmd-$n.out" "$LOG_DIR/slurmd-$n.log"
            die "slurmd -N $n did not write its pid file within 15 s"
        fi
        sleep 0.2
    done
}

# Wait (up to 60 s) until sinfo shows every node up: idle, or busy with jobs
# (mix/alloc/completing).  A node that answers but is DOWN or DRAINED (as
# `stop` leaves them) is resumed.
wait_for_nodes() {
    local deadline=$((SECONDS + 60)) states bad n state last_resume=-10
    while :; do
        states="$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)"
        bad=0
        for n in "${NODES[@]}"; do
            state="$(awk -v n="$n" '$1 == n {print $2}' <<<"$states")"
            case "$state" in
                idle | mix | alloc | comp) ;;
                down | drain | drng | fail)
                    bad=1
                    if ((SECONDS - last_resume >= 3)); then  # not at every poll
                        scontrol update nodename="$n" state=resume 2>/dev/null || true
                    fi ;;
                *) bad=1 ;;  # empty, idle* (not responding yet), unk, ...
            esac
        done
        ((bad == 0)) && return 0
        ((SECONDS - last_resume >= 3)) && last_resume=$SECONDS
        if ((SECONDS >= deadline)); then
            say "nodes not up after 60 s:"
            sinfo -N -l >&2 || true
            scontrol show node 2>/dev/null | grep -E 'NodeName|State|Reason' >&2 || true
            show_log "$LOG_DIR/slurmctld.log" "$LOG_DIR"/slurmd-*.log
            die "the nodes did not become idle within 60 s (logs in $LOG_DIR)"
        fi
        sleep 1
    done
}

cmd_start() {
    need_root
    ensure_packages
    check_dir
    if all_running && scontrol ping 2>/dev/null | grep -q 'is UP'; then
        wait_for_nodes
        say "already running ($DIR)"
    else
        check_ports
        make_dirs
        write_conf
        start_munged
        start_slurmctld
        local n
        for n in "${NODES[@]}"; do start_slurmd "$n"; done
        wait_for_nodes
        say "cluster batchkit-local is up: nodes ${NODES[*]}, partition debug"
    fi
    sinfo >&2 || true
    cmd_env
}

# ----------------------------------------------------------------------------
# Stopping
# ----------------------------------------------------------------------------

# Job ids that still hold or wait for resources.
live_jobs() { squeue -h -o '%i' -t PD,R,CG,CF,S,RQ,RS,SE,SO,ST 2>/dev/null || true; }
running_jobs() { squeue -h -o '%i' -t R,CG,CF,S,SO,ST 2>/dev/null || true; }

# Cancel every job: Slurm sends SIGTERM to its processes (SIGKILL only after
# KillWait, 30 s).  Give them 8 s to end; `stop` kills what still runs then
# (kill_job_processes).  Not longer: a slurmd checks every second during the
# first 10 s whether a cancelled job has ended, then only every 10 s.
cancel_jobs() {
    local jobs
    jobs="$(live_jobs)"
    [[ -n "$jobs" ]] || return 0
    say "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
    # shellcheck disable=SC2086  # one argument per job id
    scancel $jobs 2>/dev/null || true
    local deadline=$((SECONDS + 8))
    while [[ -n "$(running_jobs)" ]] && ((SECONDS < deadline)); do sleep 0.5; done
}

# All descendants of PID (children first found, then theirs), from /proc.
descendants() {
    local -A kids=()
    local stat p pp rest
    for stat in /proc/[0-9]*/stat; do
        p="${stat#/proc/}"; p="${p%/stat}"
        rest="$(cat "$stat" 2>/dev/null)" || continue
        rest="${rest##*) }"       # drop "pid (comm) ", comm may hold spaces
        pp="${rest#* }"; pp="${pp%% *}"
        kids[$pp]+="$p "
    done
    local queue=("$1") out=() c
    while ((${#queue[@]})); do
        p="${queue[0]}"; queue=("${queue[@]:1}")
        for c in ${kids[$p]:-}; do out+=("$c"); queue+=("$c"); done
    done
    printf '%s\n' "${out[@]:-}"
}

# kill_job_processes tasks|all: SIGKILL the processes of this cluster's jobs.
# Our slurmstepd processes are found by the mark they inherit from our slurmd
# (they are not its children: slurmd detaches them).  "tasks" kills only what
# runs below them (the job's processes), so that each slurmstepd sees its job
# end and reports it as usual; "all" kills the slurmstepd processes as well.
kill_job_processes() {
    local mode="$1" env_file pid victims=()
    for env_file in /proc/[0-9]*/environ; do
        pid="${env_file#/proc/}"; pid="${pid%/environ}"
        [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == slurmstepd ]] || continue
        # (the process may end meanwhile: hence the braces around the read)
        { tr '\0' '\n' <"$env_file"; } 2>/dev/null | grep -qxF "$MARK_VAR=$DIR" || continue
        [[ "$mode" == all ]] && victims+=("$pid")
        mapfile -t -O "${#victims[@]}" victims < <(descendants "$pid" | grep .)
    done
    ((${#victims[@]})) || return 0
    say "killing leftover job processes: ${victims[*]}"
    kill -KILL "${victims[@]}" 2>/dev/null || true
    for pid in "${victims[@]}"; do wait_gone "$pid" 10 || true; done
}

# The order matters: drain the nodes and cancel the jobs while slurmctld
# still answers, and kill the job processes that outlive the cancel while it
# still does too (a slurmd that cannot report a job's end to slurmctld spends
# 10 s retrying before it exits); then slurmctld, the slurmds, munged last.
cmd_stop() {
    need_root
    check_dir
    local pid n
    if slurmctld_pid >/dev/null && munged_pid >/dev/null; then
        # Drain the nodes first, so that no job starts while we stop.  The
        # drain is saved with Slurm's state; `start` resumes the nodes.
        scontrol update nodename="$NODE_LIST" state=drain reason="local_cluster.sh stop" 2>/dev/null || true
        cancel_jobs
        if [[ -n "$(running_jobs)" ]]; then
            kill_job_processes tasks
            local deadline=$((SECONDS + 10))
            while [[ -n "$(running_jobs)" ]] && ((SECONDS < deadline)); do sleep 0.5; done
        fi
    fi
    if pid="$(slurmctld_pid)"; then
        say "stopping slurmctld (pid $pid)"
        stop_pid "$pid" slurmctld
    fi
    rm -f "$CTLD_PID"
    for n in "${NODES[@]}"; do
        if pid="$(slurmd_pid "$n")"; then
            say "stopping slurmd $n (pid $pid)"
            stop_pid "$pid" "slurmd $n"
        fi
        rm -f "$(slurmd_pid_file "$n")"
    done
    kill_job_processes all  # whatever outlived its slurmd
    if pid="$(munged_pid)"; then
        say "stopping munged (pid $pid)"
        stop_pid "$pid" munged
    fi
    rm -f "$MUNGE_PID"
    say "stopped (state and logs kept in $DIR)"
}

# ----------------------------------------------------------------------------
# Status and env
# ----------------------------------------------------------------------------

cmd_status() {
    check_dir
    local ok=0 pid n
    report() {  # report NAME PID-OR-EMPTY
        if [[ -n "$2" ]]; then printf '%-10s running (pid %s)\n' "$1" "$2"
        else printf '%-10s not running\n' "$1"; ok=1; fi
    }
    report munged "$(munged_pid || true)"
    report slurmctld "$(slurmctld_pid || true)"
    for n in "${NODES[@]}"; do report "slurmd $n" "$(slurmd_pid "$n" || true)"; done
    if slurmctld_pid >/dev/null && munged_pid >/dev/null; then
        echo
        timeout 20 sinfo || ok=1
    fi
    return "$ok"
}

cmd_env() {
    printf 'export SLURM_CONF=%q\n' "$CONF"
}

# ----------------------------------------------------------------------------

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    install) need_root; ensure_packages ;;
    *) usage ;;
esac

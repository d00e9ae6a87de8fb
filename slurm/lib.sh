# shellcheck shell=bash
# The logic behind slurm/train.sh and the per-dataset job scripts (slurm/inat_stage1.sh, ...): sourced by them,
# never submitted itself. The variables it reads are documented at the top of slurm/train.sh; the whole flow in
# docs/cluster.md.
#
# One Slurm task per node runs `accelerate launch`, which starts one training process per GPU of its node:
#
#   srun --nodes=N --ntasks-per-node=1 bash -c 'exec accelerate launch --machine_rank $SLURM_NODEID ...' \
#       --num_processes N*G --num_machines N --rdzv_backend c10d --main_process_ip <first host> \
#       --main_process_port 29500 [--multi_gpu] bigltr/train.py recipe=R out=RUN stage=S resume=auto \
#       dist.world_size=N*G [key=value ...]
#
# Preemption and time limit: Slurm sends USR1 to this (batch) shell only (`--signal=B:USR1@90`). The shell does
# NOT pass it on (torchrun's agent dies on SIGUSR1 without letting its workers checkpoint): it creates
# RUN/PREEMPT on the shared filesystem, the trainer sees the file, finishes its step, writes a checkpoint and
# exits with 75 (which `accelerate launch` reports as 1); the shell then runs `scontrol requeue $SLURM_JOB_ID` and
# the requeued job reruns the same command, which resumes from the newest checkpoint (resume=auto).

BIGLTR_EX_TEMPFAIL=75  # the trainer's exit code after a preemption checkpoint

bigltr_log() { echo "bigltr-slurm: $(date '+%F %T') $*"; }
bigltr_die() { echo "bigltr-slurm: error: $*" >&2; exit 2; }

# Training processes per node: GPUS_PER_NODE, else what Slurm says about the allocation. With BIGLTR_CPU=1:
# GPUS_PER_NODE processes (default 1) on CPU.
bigltr_procs_per_node() {
    local n=${GPUS_PER_NODE:-}
    if [ -z "$n" ] && [ "${BIGLTR_CPU:-0}" = 1 ]; then
        n=1
    fi
    if [ -z "$n" ]; then
        n=${SLURM_GPUS_ON_NODE:-}
    fi
    if [ -z "$n" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
        n=${SLURM_GPUS_PER_NODE##*:}  # "4" or "h100:4"
    fi
    if [ -z "$n" ]; then
        bigltr_die "cannot tell how many GPUs each node has: request them (#SBATCH --gres=gpu:N or" \
            "--gpus-per-node=N) or set GPUS_PER_NODE (BIGLTR_CPU=1 runs on CPU)"
    fi
    case "$n" in
        '' | *[!0-9]* | 0) bigltr_die "GPUS_PER_NODE must be a positive integer, got '$n'" ;;
    esac
    echo "$n"
}

# Called once the trap fired: keep RUN/PREEMPT present while srun runs. The trainer deletes a stale PREEMPT
# when it starts, so a signal that arrives during its start-up would otherwise be lost.
bigltr_keep_preempt_file() {
    (
        while kill -0 "$BIGLTR_SRUN_PID" 2>/dev/null; do
            touch "$BIGLTR_RUN/PREEMPT" 2>/dev/null
            sleep "${BIGLTR_PREEMPT_RETOUCH_S:-10}"
        done
    ) </dev/null >/dev/null 2>&1 &
    BIGLTR_TOUCHER_PID=$!
}

bigltr_on_signal() {  # $1: USR1 or TERM
    BIGLTR_INTERRUPTED=1
    if [ "$1" = TERM ]; then
        BIGLTR_GOT_TERM=1
    fi
    if [ "$BIGLTR_PREEMPTED" = 1 ]; then
        bigltr_log "SIG$1 again: still waiting for the checkpoint"
        return
    fi
    BIGLTR_PREEMPTED=1
    bigltr_log "SIG$1: asking the trainer to checkpoint and stop (touch $BIGLTR_RUN/PREEMPT); the signal is not" \
        "forwarded to srun/accelerate"
    touch "$BIGLTR_RUN/PREEMPT" || bigltr_log "cannot create $BIGLTR_RUN/PREEMPT"
    bigltr_keep_preempt_file
}

# bigltr_job RECIPE STAGE RUN [key=value ...]: the per-dataset job scripts (slurm/inat_stage1.sh, ...): recipe RECIPE,
# stage STAGE, run directory RUN unless BIGLTR_RUN is set (arguments still win), then bigltr_slurm_main.
bigltr_job() {
    BIGLTR_RECIPE=$1
    BIGLTR_STAGE=$2
    BIGLTR_RUN=${BIGLTR_RUN:-$3}
    shift 3
    bigltr_slurm_main "$@"
}

# bigltr_slurm_main [recipe=NAME] [out=DIR] [stage=1|2|all] [key=value ...]; BIGLTR_ROOT: the checkout, as the
# calling script found it.
bigltr_slurm_main() {
    BIGLTR_ROOT=$(cd "$BIGLTR_ROOT" && pwd)
    set -uo pipefail
    BIGLTR_EARLY_SIGNAL=  # a signal before srun starts must not kill the shell (USR1's default action)
    trap 'BIGLTR_EARLY_SIGNAL=USR1' USR1
    trap 'BIGLTR_EARLY_SIGNAL=TERM' TERM
    local recipe=${BIGLTR_RECIPE:-} run=${BIGLTR_RUN:-} stage=${BIGLTR_STAGE:-all} a
    local -a extra=()
    local -a env_extra=() accel_extra=() srun_extra=()  # whitespace-separated lists (no quoting)
    read -r -a env_extra <<<"${BIGLTR_OVERRIDES:-}"
    read -r -a accel_extra <<<"${BIGLTR_ACCELERATE_ARGS:-}"
    read -r -a srun_extra <<<"${BIGLTR_SRUN_ARGS:-}"
    for a in "${env_extra[@]}" "$@"; do
        case "$a" in
            recipe=*) recipe=${a#recipe=} ;;
            out=*) run=${a#out=} ;;
            stage=*) stage=${a#stage=} ;;
            ?*=*) extra+=("$a") ;;
            *) bigltr_die "argument '$a' is not key=value (usage: sbatch slurm/train.sh recipe=NAME [out=DIR]" \
                "[stage=1|2|all] [key=value ...])" ;;
        esac
    done
    [ -n "$recipe" ] || bigltr_die "no recipe: set BIGLTR_RECIPE or pass recipe=NAME"
    case "$stage" in
        1 | 2 | all) ;;
        *) bigltr_die "stage must be 1, 2 or all, got '$stage'" ;;
    esac
    [ -n "${SLURM_JOB_ID:-}" ] || bigltr_die "SLURM_JOB_ID is not set: submit this script with sbatch"

    cd "$BIGLTR_ROOT" || bigltr_die "cannot cd to $BIGLTR_ROOT"
    if [ -z "$run" ]; then
        run=runs/$(basename "$recipe" .yaml)  # the trainer's default
    fi
    case "$run" in
        /*) ;;
        *) run=$BIGLTR_ROOT/$run ;;
    esac
    BIGLTR_RUN=$run
    mkdir -p "$run" || bigltr_die "cannot create the run directory $run"

    local per_node nnodes total hosts master port
    per_node=$(bigltr_procs_per_node) || exit 2
    nnodes=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
    total=$((nnodes * per_node))
    hosts=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}") ||
        bigltr_die "scontrol show hostnames failed"
    master=${hosts%%$'\n'*}
    [ -n "$master" ] || bigltr_die "no host names in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
    port=${MAIN_PROCESS_PORT:-29500}
    if [ "${BIGLTR_CPU:-0}" = 1 ]; then
        export ACCELERATE_USE_CPU=1  # with --multi_gpu: one gloo job (--cpu --num_processes N runs ONE process)
    fi
    # A signal sent to the job step (scancel --signal=USR1 JOB, a preemption's TERM) reaches the launcher on each
    # node: let torchrun's agent forward USR1 to the workers too (by default it dies on USR1 without a checkpoint),
    # and give them time to finish the step and write the checkpoint before it kills them.
    export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}

    local -a launch=(--num_processes "$total" --num_machines "$nnodes" --rdzv_backend c10d
        --main_process_ip "$master" --main_process_port "$port" --mixed_precision no --dynamo_backend no)
    if [ "$total" -gt 1 ]; then
        launch+=(--multi_gpu)
    fi
    launch+=("${accel_extra[@]}")
    local -a train=(bigltr/train.py "recipe=$recipe" "out=$run" "stage=$stage" resume=auto
        "dist.world_size=$total" "${extra[@]}")
    local -a srun_opts=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1)
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")  # srun no longer inherits it (Slurm >= 22.05)
    fi
    srun_opts+=("${srun_extra[@]}")
    local accelerate=${ACCELERATE:-accelerate}

    bigltr_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $recipe stage=$stage out=$run on" \
        "$nnodes node(s) x $per_node process(es)$([ "${BIGLTR_CPU:-0}" = 1 ] && echo ' (CPU)'), main host $master:$port"
    bigltr_log "srun ${srun_opts[*]} $accelerate launch --machine_rank \$SLURM_NODEID ${launch[*]} ${train[*]}"

    # From here on, RUN/PREEMPT exists only if someone asked this run to stop (this shell's trap, or a user).
    rm -f "$run/PREEMPT"
    BIGLTR_PREEMPTED=0 BIGLTR_GOT_TERM=0 BIGLTR_INTERRUPTED=0 BIGLTR_TOUCHER_PID=
    # srun in the background: bash runs a trap only between commands, and `wait` is interruptible.
    # SLURM_NODEID must be read by each node's task, hence `bash -c` with the arguments passed as "$@".
    srun "${srun_opts[@]}" bash -c 'a=$1; shift; exec "$a" launch --machine_rank "$SLURM_NODEID" "$@"' \
        bigltr-launch "$accelerate" "${launch[@]}" "${train[@]}" &
    BIGLTR_SRUN_PID=$!
    trap 'bigltr_on_signal USR1' USR1
    trap 'bigltr_on_signal TERM' TERM
    if [ -n "$BIGLTR_EARLY_SIGNAL" ]; then
        bigltr_on_signal "$BIGLTR_EARLY_SIGNAL"
    fi
    local rc
    while :; do
        BIGLTR_INTERRUPTED=0
        wait "$BIGLTR_SRUN_PID"
        rc=$?
        # A trapped signal makes `wait` return 128+signal while srun still runs: wait for srun again.
        if [ "$BIGLTR_INTERRUPTED" = 1 ] && [ "$rc" -gt 128 ]; then
            continue
        fi
        break
    done
    trap '' USR1 TERM  # too late to act on: srun is gone
    if [ -n "$BIGLTR_TOUCHER_PID" ]; then
        kill "$BIGLTR_TOUCHER_PID" 2>/dev/null
        wait "$BIGLTR_TOUCHER_PID" 2>/dev/null
    fi

    if [ "$rc" = 0 ]; then
        bigltr_log "srun finished (exit 0): stage=$stage done, not requeueing"
        exit 0
    fi
    # The trainer exits 75 after its stop checkpoint, but `accelerate launch` (torchrun's agent) reports any
    # failed worker as 1: the PREEMPT file, not the exit code, says that the run stopped on request.
    if [ "$rc" != "$BIGLTR_EX_TEMPFAIL" ] && [ "$BIGLTR_PREEMPTED" != 1 ] && [ ! -f "$run/PREEMPT" ]; then
        bigltr_log "srun failed with exit code $rc: not requeueing"
        exit "$rc"
    fi
    if [ "$BIGLTR_GOT_TERM" = 1 ]; then
        bigltr_log "srun exited with $rc after SIGTERM (scancel, or preemption, which Slurm requeues itself):" \
            "not requeueing; resubmit the same script to resume"
        exit "$rc"
    fi
    if [ -n "${BIGLTR_MAX_REQUEUES:-}" ] && [ "${SLURM_RESTART_COUNT:-0}" -ge "$BIGLTR_MAX_REQUEUES" ]; then
        bigltr_log "srun exited with $rc; already requeued ${SLURM_RESTART_COUNT:-0} time(s)" \
            "(BIGLTR_MAX_REQUEUES=$BIGLTR_MAX_REQUEUES): not requeueing"
        exit "$rc"
    fi
    bigltr_log "srun exited with $rc after a stop request (the trainer checkpoints, then exits 75):" \
        "scontrol requeue $SLURM_JOB_ID"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        bigltr_log "scontrol requeue $SLURM_JOB_ID failed: resubmit the same script to resume"
        exit "$rc"
    fi
    exit 0
}

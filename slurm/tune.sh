#!/bin/bash
# One Optuna worker of a bigltr-tune study per Slurm array task (docs/tuning.md).
#
#   sbatch --array=0-7 slurm/tune.sh recipe=cifar100_lt out=tune/c100 --trials 32 [--phase both] [--pruner median]
#
# Every task runs `python -m bigltr.tune ARGS --worker-only`: the tasks share one study through the journal file
# OUT/study.journal (or --storage URL), each takes the next trial until the study's budget (--trials, counted over
# all tasks) is used, and each writes OUT/tune_summary.{csv,md}, OUT/tune_result.json and OUT/plots/ when it ends.
# A trial runs on this task's allocation (one GPU by default); use --launch 'torchrun --standalone
# --nproc_per_node 4 -m' with --gres=gpu:4 for multi-GPU trials. Submit from the checkout (or set BIGLTR_ROOT);
# relative paths (out=, data.root=) are relative to the checkout. Each task's log: %x-%A_%a.out.
#
# Time limit / preemption: Slurm sends USR1 to this shell 90 s before the end (--signal=B:USR1@90). The shell sends
# SIGTERM to the worker, the worker stops its trial (the trainer writes a resume checkpoint), marks it FAIL and
# queues its parameters again, and exits 75; the shell then requeues the task (scontrol requeue), and the
# requeued task runs the queued trial first, resuming it from its checkpoint (trials run with resume=auto). A
# task killed without warning leaves its trial RUNNING: another worker fails it once its heartbeat is older
# than --stale-after (default 900 s), and queues it again.
#
# Environment: BIGLTR_PYTHON (default: python) runs the worker; BIGLTR_ROOT is the checkout (put on PYTHONPATH).
# The #SBATCH lines are defaults: options on the sbatch command line win.
#SBATCH --job-name=bigltr-tune
#SBATCH --requeue
#SBATCH --signal=B:USR1@90
#SBATCH --open-mode=append
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
set -uo pipefail

for BIGLTR_ROOT in "${BIGLTR_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" ""; do
    [ -n "$BIGLTR_ROOT" ] && [ -f "$BIGLTR_ROOT/bigltr/tune/__init__.py" ] && break
done
if [ -z "$BIGLTR_ROOT" ]; then
    echo "tune.sh: error: bigltr/tune/ not found: submit from the bigltr checkout or set BIGLTR_ROOT" >&2
    exit 2
fi
BIGLTR_ROOT=$(cd "$BIGLTR_ROOT" && pwd)
cd "$BIGLTR_ROOT" || exit 2
export PYTHONPATH="$BIGLTR_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# through torchrun (--launch): let its agent pass USR1/TERM on to the trainer, which checkpoints on either
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
PY=${BIGLTR_PYTHON:-python}
TASK="${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-?}}_${SLURM_ARRAY_TASK_ID:-0}"
echo "tune.sh: task $TASK (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname) at $(date '+%F %T'):" \
    "$PY -m bigltr.tune $* --worker-only"

# The worker runs in the background so that bash can run the trap while waiting for it.
"$PY" -m bigltr.tune "$@" --worker-only &
CHILD=$!
STOPPED=""
on_signal() {  # $1: USR1 (time limit near: requeue) or TERM (scancel / preemption: Slurm decides)
    if [ -z "$STOPPED" ]; then
        STOPPED=$1
        echo "tune.sh: SIG$1: stopping the worker (its trial is queued again)"
        kill -TERM "$CHILD" 2>/dev/null
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
while :; do
    wait "$CHILD"
    RC=$?
    # a trapped signal makes `wait` return 128+signal while the worker still runs: wait for it again
    if kill -0 "$CHILD" 2>/dev/null; then
        continue
    fi
    break
done
if [ "$STOPPED" = USR1 ]; then
    echo "tune.sh: worker exited with $RC after USR1: scontrol requeue $TASK"
    scontrol requeue "$TASK" || { echo "tune.sh: requeue failed: resubmit the same command to continue"; exit "$RC"; }
    exit 0
fi
echo "tune.sh: worker finished with exit code $RC"
exit "$RC"

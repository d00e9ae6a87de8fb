#!/bin/bash
# One trial of a tools/sweep.py weight-decay sweep per Slurm array task.
#
#   sbatch --array=0-4 slurm/sweep.sh SWEEP_DIR/trials.txt     (tools/sweep.py --launcher slurm writes and submits this)
#
# Line $SLURM_ARRAY_TASK_ID (0-based) of the trials file holds one trial's `python -m bigltr.train` arguments,
# shell-quoted (recipe=... out=SWEEP_DIR/trials/<name> stage=... key=value ...). The trainer's output goes to
# <out>/stdout.log and <out>/stderr.log, its exit status to <out>/exit_code (tools/sweep.py --collect reads them).
#
# Preemption / time limit: Slurm sends USR1 to this script 90 s before the end (--signal=B:USR1@90); the trial is
# stopped and the task requeued (--requeue). A requeued trial starts again from epoch 1 (the trainer has no
# mid-run resume); a trial whose results.json already holds its stage is not run again.
#
# Environment: BIGLTR_PYTHON (default: python) runs the trainer; BIGLTR_ROOT (set by tools/sweep.py) is the
# checkout, put on PYTHONPATH. The options below are defaults: those on the sbatch command line win.
#SBATCH --job-name=bigltr-sweep
#SBATCH --requeue
#SBATCH --signal=B:USR1@90
#SBATCH --open-mode=append
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=12:00:00
set -uo pipefail

TRIALS=${1:-${SWEEP_TRIALS:-}}
if [ -z "$TRIALS" ] || [ ! -f "$TRIALS" ]; then
    echo "sweep.sh: trials file '${TRIALS}' not found (usage: sbatch --array=0-N slurm/sweep.sh DIR/trials.txt)" >&2
    exit 2
fi
TASK=${SLURM_ARRAY_TASK_ID:?sweep.sh: SLURM_ARRAY_TASK_ID is not set (submit with sbatch --array)}
LINE=$(sed -n "$((TASK + 1))p" "$TRIALS")
if [ -z "$LINE" ]; then
    echo "sweep.sh: no line $TASK in $TRIALS" >&2
    exit 2
fi
eval "set -- $LINE"   # the file is written by tools/sweep.py with shlex quoting

OUT="" STAGE=""
for a in "$@"; do
    case "$a" in
        out=*) OUT=${a#out=} ;;
        stage=*) STAGE=${a#stage=} ;;
    esac
done
if [ -z "$OUT" ]; then
    echo "sweep.sh: line $TASK of $TRIALS has no out=DIR" >&2
    exit 2
fi
mkdir -p "$OUT"
if [ -n "$STAGE" ] && [ -f "$OUT/results.json" ] && grep -q "\"stage${STAGE}\": {" "$OUT/results.json" \
        && grep -q '"val"' "$OUT/results.json"; then
    echo "sweep.sh: task $TASK: $OUT already holds stage $STAGE results; nothing to do"
    exit 0
fi

if [ -n "${BIGLTR_ROOT:-}" ]; then
    export PYTHONPATH="$BIGLTR_ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
PY=${BIGLTR_PYTHON:-python}
rm -f "$OUT/exit_code"
echo "sweep.sh: task $TASK on $(hostname) at $(date '+%F %T'): $PY -m bigltr.train $LINE"
echo "sweep.sh: logs in $OUT/stdout.log and $OUT/stderr.log"
echo "=== $(date '+%F %T') task ${SLURM_ARRAY_JOB_ID:-?}_$TASK" | tee -a "$OUT/stdout.log" >> "$OUT/stderr.log"

# The trainer runs in the background so that bash can run the USR1 trap while waiting for it.
$PY -m bigltr.train "$@" >> "$OUT/stdout.log" 2>> "$OUT/stderr.log" &
CHILD=$!
requeue() {
    echo "sweep.sh: USR1 (time limit or preemption near): stopping trial $OUT and requeueing"
    kill -TERM "$CHILD" 2>/dev/null
    wait "$CHILD" 2>/dev/null
    scontrol requeue "${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}}_${TASK}"
    exit 0
}
trap requeue USR1
wait "$CHILD"
RC=$?
echo "$RC" > "$OUT/exit_code"
echo "sweep.sh: task $TASK finished with exit code $RC"
exit "$RC"

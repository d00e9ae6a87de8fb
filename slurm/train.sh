#!/bin/bash
# Generic bigltr training job: one Slurm task per node runs `accelerate launch`, one process per GPU.
#
#   sbatch [--nodes=N --gres=gpu:G ...] slurm/train.sh recipe=NAME [out=RUN] [stage=1|2|all] [key=value ...]
#   BIGLTR_RECIPE=inat2018 BIGLTR_STAGE=1 sbatch --nodes=2 --gres=gpu:4 slurm/train.sh stage1.weight_decay=5e-4
#
# Submit from the bigltr checkout (or set BIGLTR_ROOT): Slurm runs a copy of this file, so the checkout is found
# from BIGLTR_ROOT or SLURM_SUBMIT_DIR. Relative paths (out=, data.root=) are relative to the checkout.
# Arguments win over the environment. The trainer always gets `resume=auto` (a requeued job reruns the same
# command and resumes from the newest complete checkpoint in RUN) and `dist.world_size=<nodes x processes>` (a
# launch that started another number of processes fails at start-up instead of training something else).
#
# Variables (sbatch exports the submitting shell's environment):
#   BIGLTR_RECIPE       recipe name in recipes/ or a path (or the argument recipe=NAME)            [required]
#   BIGLTR_RUN          run directory, the trainer's out= (or out=DIR)                  [runs/<recipe name>]
#   BIGLTR_STAGE        1, 2 or all (or stage=S); stage 2 reads RUN/stage1/best.pt                      [all]
#   BIGLTR_OVERRIDES    more key=value overrides, whitespace-separated (arguments come after them)
#   GPUS_PER_NODE       training processes per node       [SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE]
#   BIGLTR_CPU=1        train on CPU (gloo): exports ACCELERATE_USE_CPU=1 and launches GPUS_PER_NODE [1]
#                       processes per node with --multi_gpu (that pair forms one job; --cpu does not)
#   ACCELERATE          the accelerate executable, e.g. $PWD/.venv/bin/accelerate                [accelerate]
#   MAIN_PROCESS_PORT   rendezvous port on the first node                                              [29500]
#   BIGLTR_ACCELERATE_ARGS  extra `accelerate launch` options, whitespace-separated
#   BIGLTR_SRUN_ARGS    extra srun options, whitespace-separated, in --opt=value form
#   BIGLTR_MAX_REQUEUES stop requeueing once SLURM_RESTART_COUNT reaches this                     [no limit]
#   BIGLTR_PREEMPT_RETOUCH_S  after the signal, RUN/PREEMPT is re-created every this many seconds     [10]
#
# Exit: 0 when the stage(s) finished; after USR1 (Slurm's warning 90 s before the time limit) the trainer
# checkpoints and exits 75, and the job is requeued (exit 0); any other failure exits with the trainer's code.
# Preemption flow and multi-node notes: docs/cluster.md. The #SBATCH lines are defaults: sbatch options win.
#SBATCH --job-name=bigltr
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@90
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# Slurm runs a copy of this file: find the checkout (BIGLTR_ROOT, this file's parent, or where sbatch was called)
# and load slurm/lib.sh from it, which does the rest (or say that it is not found, exit 2).
for BIGLTR_ROOT in "${BIGLTR_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" ""; do
    [ -n "$BIGLTR_ROOT" ] && [ -f "$BIGLTR_ROOT/slurm/lib.sh" ] && break
done
# shellcheck source=slurm/lib.sh disable=SC2015
[ -n "$BIGLTR_ROOT" ] && . "$BIGLTR_ROOT/slurm/lib.sh" || { echo "bigltr-slurm: error: slurm/lib.sh not found: submit from the bigltr checkout or set BIGLTR_ROOT" >&2; exit 2; }
bigltr_slurm_main "$@"

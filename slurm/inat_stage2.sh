#!/bin/bash
# iNaturalist 2018, stage 2 (classifier: class-balanced loss, weight decay, MaxNorm), 10 epochs, 1 node x 4 GPUs.
#
#   sbatch --dependency=afterok:<stage-1 job id> slurm/inat_stage2.sh [key=value ...]
#
# Reads stage 1's model from RUN/stage1/best.pt (same BIGLTR_RUN as stage 1, default runs/inat2018).
# The logic is in slurm/lib.sh (variables: slurm/train.sh); key=value arguments are passed to the trainer.
#SBATCH --job-name=bigltr-inat-s2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=40
#SBATCH --mem=0
#SBATCH --time=06:00:00
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
bigltr_job inat2018 2 runs/inat2018 "$@"

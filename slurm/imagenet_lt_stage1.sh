#!/bin/bash
# ImageNet-LT, stage 1 (features): ResNeXt-50, 200 epochs, on 1 node x 4 GPUs.
#
#   sbatch slurm/imagenet_lt_stage1.sh [key=value ...]          # run directory: runs/imagenet_lt (BIGLTR_RUN)
#   sbatch --dependency=afterok:<job id> slurm/imagenet_lt_stage2.sh
#
# Requeued on USR1 (90 s before the time limit) until the epochs are done; each run resumes from the last
# checkpoint. stage1.batch_size (recipes/imagenet_lt.yaml) is the paper's GLOBAL 64: 16 per GPU on these 4 GPUs,
# whatever --nodes/--gres you give (a count that does not divide 64 is refused at start-up).
# The logic is in slurm/lib.sh (variables: slurm/train.sh); key=value arguments are passed to the trainer.
#SBATCH --job-name=bigltr-imnlt-s1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=40
#SBATCH --mem=0
#SBATCH --time=24:00:00
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
bigltr_job imagenet_lt 1 runs/imagenet_lt "$@"

#!/bin/bash
# iNaturalist 2018, stage 1 (features): ResNet-50, 200 epochs, global batch 512 (the paper's; stage1.batch_size is
# global: 64 per GPU on these 2 nodes x 4 GPUs, 32 per GPU on 16), on 2 nodes x 4 GPUs.
#
#   sbatch slurm/inat_stage1.sh [key=value ...]                 # run directory: runs/inat2018 (BIGLTR_RUN)
#   sbatch --dependency=afterok:<job id> slurm/inat_stage2.sh    # then stage 2 on the same run directory
#
# Requeued on USR1 (90 s before the time limit) until the 200 epochs are done: each run resumes from the last
# checkpoint. Change the resources on the sbatch command line (--nodes=4, --time=48:00:00): GPUS_PER_NODE
# follows the allocation, so --num_processes and dist.world_size follow too.
# The logic is in slurm/lib.sh (variables: slurm/train.sh); key=value arguments are passed to the trainer.
#SBATCH --job-name=bigltr-inat-s1
#SBATCH --nodes=2
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
bigltr_job inat2018 1 runs/inat2018 "$@"

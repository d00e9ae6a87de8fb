#!/bin/bash
# ImageNet-LT, stage 1 (features): ResNeXt-50, 200 epochs, on 1 node x 4 GPUs.
#
#   sbatch slurm/imagenet_lt_stage1.sh [key=value ...]          # run directory: runs/imagenet_lt (BIGLTR_RUN)
#   sbatch --dependency=afterok:<job id> slurm/imagenet_lt_stage2.sh
#
# Requeued on USR1 (90 s before the time limit) until the epochs are done; each run resumes from the last
# checkpoint. stage1.batch_size in recipes/imagenet_lt.yaml is the paper's 64: see the recipe about scaling.
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

BIGLTR_RECIPE=imagenet_lt
BIGLTR_STAGE=1
BIGLTR_RUN=${BIGLTR_RUN:-runs/imagenet_lt}
for BIGLTR_ROOT in "${BIGLTR_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" ""; do
    [ -n "$BIGLTR_ROOT" ] && [ -f "$BIGLTR_ROOT/slurm/lib.sh" ] && break
done
if [ -z "$BIGLTR_ROOT" ]; then
    echo "bigltr-slurm: error: slurm/lib.sh not found: submit from the bigltr checkout or set BIGLTR_ROOT" >&2
    exit 2
fi
BIGLTR_ROOT=$(cd "$BIGLTR_ROOT" && pwd)
# shellcheck source=slurm/lib.sh
. "$BIGLTR_ROOT/slurm/lib.sh"
bigltr_slurm_main "$@"

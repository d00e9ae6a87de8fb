#!/bin/bash
# Submit both stages of a benchmark as two jobs: stage 2 starts only after stage 1 finished successfully
# (stage 1 may be requeued any number of times in between; the dependency waits for its final success).
#
#   slurm/submit.sh inat|imagenet_lt [sbatch options --] [key=value ...]
#   BIGLTR_RUN=runs/inat_wd5e-4 slurm/submit.sh inat --time=12:00:00 -- stage1.weight_decay=5e-4
#
# Options before `--` go to both sbatch calls; key=value arguments go to both trainers (the config accepts every
# key in both stages). Run from the bigltr checkout; BIGLTR_RUN and the other variables of slurm/train.sh are
# passed to the jobs through the environment (sbatch's default --export=ALL).
set -euo pipefail
case "${1:-}" in
    inat | imagenet_lt) bench=$1 ;;
    *) echo "usage: slurm/submit.sh inat|imagenet_lt [sbatch options --] [key=value ...]" >&2; exit 2 ;;
esac
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export BIGLTR_ROOT=$root  # the jobs run a copy of their script: this is how they find slurm/lib.sh
sb=()
if [[ " $* " == *" -- "* ]]; then
    while [ "$1" != -- ]; do sb+=("$1"); shift; done
    shift
fi
s1=$(sbatch --parsable "${sb[@]}" "$root/slurm/${bench}_stage1.sh" "$@")
s1=${s1%%;*}  # "id" or "id;cluster"
s2=$(sbatch --parsable "${sb[@]}" --dependency="afterok:$s1" "$root/slurm/${bench}_stage2.sh" "$@")
s2=${s2%%;*}
echo "submitted $bench: stage 1 job $s1, stage 2 job $s2 (afterok:$s1)"
echo "follow with: squeue -j $s1,$s2   (logs: bigltr-*-$s1.out, bigltr-*-$s2.out in $PWD)"

#!/usr/bin/env bash
# One prepared GPU session (a lent H100/H200): correctness + timings that only a GPU can show.
#   bash tools/gpu_check.sh OUTDIR
# 1. MaxNorm: Triton kernel self-check on the device, then the benchmark (vs torch.renorm_, the official code,
#    and the device's measured copy bandwidth), and the fused SGD+MaxNorm kernel.
# 2. Stage-1 step: bigltr's loop vs a plain PyTorch loop, resnet50 224px bf16 channels_last, synthetic data.
# 3. Stage 2: online vs cached features through the real trainer, on synthetic shards.
# 4. data.pipeline=dali: eval outputs vs the torch path, decode + augment throughput on the GPU with 4 CPU threads
#    (500x375 JPEGs -> 224 px ImageNet-style), and resnet50 bf16 steps fed by it vs on a synthetic batch.
set -u
OUT=${1:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1; unset TRITON_INTERPRET
python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$OUT/versions.txt"
echo "== maxnorm"; timeout 200 python3 tools/bench_maxnorm.py --device cuda --selfcheck --sgd --markdown \
  --json "$OUT/maxnorm_gpu.json" 2>&1 | tee "$OUT/maxnorm.txt"
echo "== step"; timeout 150 python3 tools/bench_step.py --device cuda --model resnet50 --img 224 --batch 128 \
  --classes 1000 --amp bf16 --channels-last --steps 15 --rounds 5 2>&1 | tee "$OUT/step.txt"
echo "== stage2"; timeout 200 python3 tools/bench_stage2.py --synthetic 3000 --stage1-epochs 1 --epochs 10 \
  --out /tmp/bench_stage2 data.num_workers=6 2>&1 | grep -v "it/s\]" | tail -25 | tee "$OUT/stage2.txt"
echo "== dali"
if python3 -c "import nvidia.dali" 2>/dev/null; then
  timeout 300 python3 tools/bench_dali.py --device cuda --threads 4 --count 1024 --epochs 4 --batch-size 128 2>&1 \
    | grep -v "Warning" | tee "$OUT/dali.txt"
else
  echo "NVIDIA DALI is not installed on this machine (pip install nvidia-dali-cuda130==2.4.0): skipped" | tee "$OUT/dali.txt"
fi

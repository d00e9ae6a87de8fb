"""The process group, made from the launcher's environment, and the check that the launcher agrees with the config.

The group is created from WORLD_SIZE/RANK/LOCAL_RANK (torchrun, `accelerate launch`, srun): gloo on CPU, NCCL on
CUDA, with a collective timeout (`dist.timeout_s`) so the survivors of a dead rank exit instead of hanging. Because
the group is made here, `accelerate launch --multi_gpu` on CPU forms one job with or without ACCELERATE_USE_CPU;
`accelerate launch --cpu --num_processes 2` silently starts ONE process, which `dist.world_size=2` turns into a
start-up error. An accelerate config that names a backend (DeepSpeed and its ZeRO stage, FSDP and its version,
mixed precision) must agree with the bigltr config: `check_launcher` turns a disagreement into a start-up error
instead of a silently different run.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

BACKENDS = ("ddp", "fsdp2", "deepspeed")


class DistError(RuntimeError):
    """The launch does not match the config (world size, backend, distributed type)."""


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def launched_world_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE of torchrun / accelerate launch / srun; 1 without
    a launcher)."""
    return _env_int("WORLD_SIZE", 1)


def check_launcher(backend: str, zero_stage: int, amp: str, accum_steps: int, env=os.environ) -> None:
    """Compare what `accelerate launch --config_file X` asked for (its environment) with the bigltr config."""
    problems = []
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        if backend != "deepspeed":
            problems.append(f"the accelerate config is DeepSpeed but dist.backend={backend} (set "
                            f"dist.backend=deepspeed, or launch with recipes/accelerate/{backend}.yaml)")
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if backend == "deepspeed" and stage not in (None, "") and int(stage) != zero_stage:
            problems.append(f"the accelerate config asks for ZeRO stage {stage} but dist.zero_stage={zero_stage}")
        gas = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
        if gas not in (None, "") and int(gas) != accum_steps:
            problems.append(f"the accelerate config has gradient_accumulation_steps={gas} but stage1.batch_size / "
                            f"(processes x stage1.micro_batch_size) gives {accum_steps}")
    elif backend == "deepspeed" and env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        problems.append("the accelerate config is FSDP but dist.backend=deepspeed")
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if backend != "fsdp2":
            problems.append(f"the accelerate config is FSDP but dist.backend={backend} (set dist.backend=fsdp2)")
        elif env.get("FSDP_VERSION", "2") != "2":
            problems.append(f"the accelerate config asks for FSDP version {env['FSDP_VERSION']}; bigltr runs FSDP2 "
                            f"(set fsdp_version: 2)")
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no")
    if mp in ("bf16", "fp16") and amp != mp:
        problems.append(f"the accelerate config asks for mixed_precision={mp} but stage1.amp={amp} (set "
                        f"stage1.amp={mp}; bigltr applies autocast itself)")
    if problems:
        raise DistError("launcher and config disagree: " + "; ".join(problems))


def resolve_device(device_pref: str, local_rank: int = 0) -> torch.device:
    """The config's `device` (auto, cpu, cuda) as this process's device: cuda:LOCAL_RANK when CUDA is chosen (auto
    with a GPU, or cuda), else cpu. The one place the choice is made: `init_process_group` and every
    single-process user (`bigltr.engine.run`'s default Dist, bigltr-eval, tools/ablation.py) call it."""
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise DistError("device=cuda requested but no CUDA device is available (use device=cpu or auto)")
    use_cuda = device_pref != "cpu" and torch.cuda.is_available()
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def init_process_group(backend: str, device_pref: str, expect_world_size: int, timeout_s: float, zero_stage: int,
                       amp: str, accum_steps: int) -> tuple[int, int, int, torch.device]:
    """Check the launch against the config, then join the process group (world size > 1).

    Returns (rank, world size, local rank, device). The backend's own set-up (DeepSpeed adopting the group) is the
    backend's `join`, called by `Dist.setup` after this.
    """
    world = launched_world_size()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_pref, local_rank)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    if expect_world_size and expect_world_size != world:
        raise DistError(
            f"dist.world_size={expect_world_size} but the launcher started {world} process(es). Known silent "
            f"failures: `accelerate launch --cpu --num_processes 2` runs ONE process; on CPU use "
            f"`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` or torchrun.")
    if backend not in BACKENDS:
        raise DistError(f"dist.backend={backend} is not one of {', '.join(BACKENDS)}")
    check_launcher(backend, zero_stage, amp, accum_steps)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, local_rank, device

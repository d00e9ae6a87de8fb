"""Distributed runtime: the process group, the backend's wrapping of what trains, and the few collectives the
engine uses.

Everything backend-specific lives here, behind `Dist` and the `Trainable` it returns; the engine never asks which
backend runs. The interface the stages use:

- `prepare(module, make_optimizer, ...)` -> `Trainable`: call it, `backward(loss, boundary)`, `step()`;
- `row_projector`: MaxNorm's projection, as this backend stores the classifier;
- `full_state_dict(model)`: whole weights for last.pt / best.pt; `save_train_state` / `load_train_state`: the
  sharded resume state; a few collectives (`all_reduce_`, `gather_objects`, `barrier`).

Backends (world size 1: nothing is wrapped, every collective is a no-op):
- `ddp`: DistributedDataParallel; stage 2 wraps only the classifier (the frozen backbone needs no communication).
- `fsdp2`: `torch.distributed.fsdp.fully_shard` per backbone block, then the backbone, then the classifier, as
  separate units (torchtitan's per-block-then-parent pattern). The classifier weight becomes a DTensor sharded
  on dim 0, so each rank owns whole class rows and MaxNorm runs on its local rows with no gather. The backbone and
  classifier are separate units because stage 2 and evaluation call them one at a time.
- `deepspeed`: a DeepSpeed engine with ZeRO stage 1, 2 or 3 over a torch optimizer (bigltr's SGD). ZeRO keeps
  flat fp32 master partitions that cut across class rows, so MaxNorm reduces partial row norms with one
  all-reduce and scales each rank's slice of BOTH the fp32 master and the working copy; editing only the
  module's weight would be undone by the next step, which updates the master and copies it over.

The process group is created here from the launcher's environment (torchrun, `accelerate launch`, srun): gloo on
CPU, NCCL on CUDA, with a collective timeout (`dist.timeout_s`) so the survivors of a dead rank exit instead of
hanging. DeepSpeed adopts that group. Because the group is made here from WORLD_SIZE/RANK, `accelerate launch
--multi_gpu` on CPU forms one job with or without ACCELERATE_USE_CPU; `accelerate launch --cpu --num_processes 2`
silently starts ONE process, which `dist.world_size=2` turns into a start-up error. An accelerate config that
names a backend (DeepSpeed and its ZeRO stage, FSDP and its version, mixed precision) must agree with the bigltr
config: `check_launcher` turns a disagreement into a start-up error instead of a silently different run.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from bigltr.checkpoint import (CheckpointError, dcp_load, dcp_save, load_checkpoint, save_checkpoint, verify_dcp,
                               verify_torch_files, write_error)
from bigltr.ops import flat_row_sumsq, flat_rows_scale_, maxnorm_clipped_, maxnorm_scales

log = logging.getLogger("bigltr")

BACKENDS = ("ddp", "fsdp2", "deepspeed")


class DistError(RuntimeError):
    """The launch does not match the config (world size, backend, distributed type)."""


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


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
            problems.append(f"the accelerate config has gradient_accumulation_steps={gas} but "
                            f"stage1.accum_steps={accum_steps}")
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


class Dist:
    def __init__(self, backend: str, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | None = None, zero_stage: int = 2, zero3_persistence_threshold: int = 100000):
        self.backend, self.rank, self.world_size, self.local_rank = backend, rank, world_size, local_rank
        self.device = device or torch.device("cpu")
        self.zero_stage, self.zero3_persistence_threshold = zero_stage, zero3_persistence_threshold

    # ------------------------------------------------------------------------------------------ set-up
    @classmethod
    def setup(cls, backend: str, device_pref: str = "auto", expect_world_size: int = 0,
              timeout_s: float = 600.0, zero_stage: int = 2, zero3_persistence_threshold: int = 100000,
              amp: str = "none", accum_steps: int = 1) -> "Dist":
        world = _env_int("WORLD_SIZE", 1)
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        use_cuda = torch.cuda.is_available() and device_pref != "cpu"
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise DistError("device=cuda requested but no CUDA device is available")
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
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
        if world > 1 and backend == "deepspeed":
            # DeepSpeed picks its accelerator at import; without this it looks for CUDA and fails on CPU.
            os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda else "cpu")
            # DeepSpeed 0.19 calls torch collectives that torch 2.14 deprecates, once per call: keep logs readable
            warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated",
                                    category=FutureWarning)
            try:
                import deepspeed
            except ImportError:
                raise DistError("dist.backend=deepspeed needs the deepspeed package (pip install deepspeed)") from None
            deepspeed.init_distributed(dist_backend=dist.get_backend(),
                                       timeout=datetime.timedelta(seconds=timeout_s))  # adopts the group above
        return cls(backend, rank, world, local_rank, device, zero_stage, zero3_persistence_threshold)

    def describe(self) -> str:
        if not self.distributed:
            return "1 process"
        name = f"deepspeed ZeRO-{self.zero_stage}" if self.deepspeed else self.backend
        return f"{self.world_size} process(es) ({name}, {dist.get_backend()})"

    def shutdown(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def deepspeed(self) -> bool:
        return self.distributed and self.backend == "deepspeed"

    @property
    def fsdp(self) -> bool:
        return self.distributed and self.backend == "fsdp2"

    @property
    def checkpoint_format(self) -> str:
        """How `save_train_state` writes: "dcp" (one process, DDP, FSDP2: interchangeable) or "deepspeed"."""
        return "deepspeed" if self.deepspeed else "dcp"

    @property
    def rows_sharded(self) -> bool:
        """True when the projector's clipped-row count covers only this rank's rows (FSDP2): the counts are summed
        over ranks."""
        return self.fsdp

    # ------------------------------------------------------------------------------------------ training
    def prepare(self, module: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], *,
                scaler=None, accum_steps: int = 1, micro_batch_size: int = 1) -> "Trainable":
        """Wrap `module` (the whole model in stage 1, the classifier in stage 2) for training.

        `make_optimizer` is called after sharding (FSDP2's optimizer must see the DTensor parameters) and before
        DeepSpeed takes it over. The returned Trainable's `optimizer` is the torch optimizer: schedulers use it.
        """
        if not self.distributed:
            return Trainable(module, make_optimizer(), scaler)
        if self.backend == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return Trainable(nn.parallel.DistributedDataParallel(module, device_ids=ids), make_optimizer(), scaler)
        if self.backend == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            if hasattr(module, "backbone"):  # stage 1: the whole model
                for block in _blocks(module.backbone):
                    fully_shard(block)
                fully_shard(module.backbone)
                fully_shard(module.classifier)
            else:
                fully_shard(module)
            return Trainable(module, make_optimizer(), scaler)
        if scaler is not None:
            raise DistError("amp=fp16 with a GradScaler is not supported under dist.backend=deepspeed; use bf16")
        import deepspeed

        optimizer = make_optimizer()
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=self._ds_config(
            micro_batch_size, accum_steps))
        return Trainable(engine, optimizer, engine=engine, inner=module)

    def _ds_config(self, micro_batch_size: int, accum_steps: int) -> dict:
        # Written out in full because DeepSpeed's defaults differ from DDP's: gradient_clipping defaults to 1.0
        # (a silently different run), "auto" bucket sizes read model.config.hidden_size (timm models have none),
        # a torch optimizer needs zero_allow_untested_optimizer. Precision stays fp32 here: bigltr's autocast
        # (stageN.amp=bf16) gives mixed-precision compute, master weights and reductions stay fp32.
        zero = {"stage": self.zero_stage, "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000,
                "contiguous_gradients": True, "overlap_comm": self.device.type == "cuda"}
        if self.zero_stage == 3:
            zero.update(stage3_param_persistence_threshold=self.zero3_persistence_threshold,
                        stage3_prefetch_bucket_size=50_000_000)
        return {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": accum_steps,
                "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "zero_optimization": zero,
                "fp16": {"enabled": False}, "bf16": {"enabled": False}, "steps_per_print": 2**31 - 1,
                "wall_clock_breakdown": False}

    @property
    def row_projector(self) -> Callable:
        """`project(weight, radius, tau, projection) -> rows clipped`: MaxNorm on the classifier as this backend
        stores it (`projection`: the rule of `bigltr.ops.maxnorm_`).

        DDP / one process: the weight. FSDP2: this rank's whole rows (Shard(0)), no communication; the count is
        this rank's. DeepSpeed: the flat partitions of the fp32 master (and, under ZeRO-3, of the working copy)
        cut across rows, so each rank computes its partial row sums of squares, one all-reduce of `num_classes`
        values gives the row norms, and each rank scales its own slice of the master AND the working copy (a
        projection of the working copy alone would be undone by the next step, which starts from the master).
        No rank gathers the weight; the count covers all rows.
        """
        return self._ds_project_rows if self.deepspeed else maxnorm_clipped_

    def _ds_project_rows(self, weight: nn.Parameter, radius: float, tau: float = 1.0,
                         projection: str = "exact") -> torch.Tensor:
        zero3 = hasattr(weight, "ds_id")
        num_rows, row_len = weight.ds_shape if zero3 else weight.shape
        if zero3:  # rank r holds the r-th of equal, padded slices of the flat weight
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            part = weight.ds_tensor.numel()
            start = min(part * self.rank, weight.ds_numel)
            valid = min(part, weight.ds_numel - start)
            master = safe_get_local_fp32_param(weight).clone()
            slices = [master[:valid], weight.ds_tensor.data.view(-1)[:valid]]  # fp32 master, working partition
        else:  # ZeRO-1/2: this rank's fp32 master fragment (maybe none); the working weight is whole everywhere
            mapping = weight._hp_mapping
            start = mapping.lp_fragment_address.start if mapping is not None else 0
            slices = [mapping.get_hp_fragment()] if mapping is not None else []
        sumsq = flat_row_sumsq(slices[0] if slices else weight.new_empty(0, dtype=torch.float32), start, num_rows,
                               row_len)
        scales = maxnorm_scales(self.all_reduce_(sumsq), radius, tau=tau, projection=projection)
        for flat in slices:
            flat_rows_scale_(flat, start, row_len, scales)
        if zero3:
            safe_set_local_fp32_param(weight, master)
        if weight.data.numel() == num_rows * row_len:  # whole on this rank: ZeRO-1/2, or a persistent ZeRO-3 param
            weight.data.mul_(scales.view(-1, 1).to(weight.dtype))
        return (scales < 1).sum()

    # ------------------------------------------------------------------------------------------ state
    def full_state_dict(self, model: nn.Module) -> dict:
        """The whole model's state on every rank (a collective under FSDP2 and ZeRO-3: call it on all ranks)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        if self.deepspeed and self.zero_stage == 3:
            import deepspeed

            params = [p for p in model.parameters() if hasattr(p, "ds_id")]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def save_train_state(self, directory: Path, model: nn.Module, trainer: "Trainable") -> None:
        """Model and optimizer, sharded: each rank writes its own part (collective).

        torch.distributed.checkpoint (DCP) for one process, DDP and FSDP2 (FSDP2 ranks write their shards; DDP's
        replicated tensors are written once); DeepSpeed's own engine format for ZeRO (per-rank optimizer partitions),
        plus the model entries outside the engine (stage 2's frozen backbone, whose BatchNorm statistics move
        with bn_mode=train).
        """
        directory = Path(directory)
        if self.deepspeed:
            try:
                trainer.engine.save_checkpoint(str(directory / self.checkpoint_format), tag="state",
                                               save_latest=False)
            except (OSError, RuntimeError) as e:
                raise write_error(directory, e) from None
            outside = self._outside_engine(model, trainer)
            if self.is_main and outside is not None:
                save_checkpoint(outside, directory / "outside_engine.pt")
            return
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, trainer.optimizer)
        with _quiet_single_process_dcp():
            dcp_save({"model": model_sd, "optim": optim_sd}, directory / self.checkpoint_format,
                     no_dist=not self.distributed)

    def verify_train_state(self, directory: Path) -> None:
        """Raise CheckpointError unless the model/optimizer part of a resume folder is complete and safe to load
        (no rank collective: every rank checks the same files)."""
        state_dir = Path(directory) / self.checkpoint_format
        if self.deepspeed:
            verify_torch_files(state_dir)
        else:
            verify_dcp(state_dir)

    def load_train_state(self, directory: Path, model: nn.Module, trainer: "Trainable") -> None:
        """The caller has checked that the checkpoint's format is this backend's (`checkpoint_format`)."""
        directory = Path(directory)
        state_dir = directory / self.checkpoint_format
        if self.deepspeed:
            # DeepSpeed unpickles its files with weights_only=False: they pass bigltr's safe loader first
            verify_torch_files(state_dir)
            path, _ = trainer.engine.load_checkpoint(str(state_dir), tag="state", load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load {state_dir}")
            if (directory / "outside_engine.pt").is_file():
                model.load_state_dict(load_checkpoint(directory / "outside_engine.pt", map_location=self.device),
                                      strict=False)
            return
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, trainer.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _quiet_single_process_dcp():
            dcp_load(state, state_dir, no_dist=not self.distributed)  # never unpickles anything but DCP metadata
        set_state_dict(model, trainer.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    @staticmethod
    def _outside_engine(model: nn.Module, trainer: "Trainable") -> dict | None:
        if trainer.inner is model:
            return None
        prefix = next(n for n, m in model.named_modules() if m is trainer.inner)
        return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(prefix + ".")}

    # ------------------------------------------------------------------------------------------ collectives
    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                   "max": dist.ReduceOp.MAX}[op])
        return t

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


class Trainable:
    """What a stage trains, as the backend runs it: `trainable(x)`, `backward(loss, boundary)`, `step()`.

    `boundary` says whether this backward closes a gradient-accumulation group (the next call is `step()`):
    DeepSpeed reduces gradients only then. The loss arrives already divided by the accumulation steps.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scaler=None, engine=None,
                 inner: nn.Module | None = None):
        self.module, self.optimizer, self.scaler, self.engine = module, optimizer, scaler, engine
        self.inner = inner if inner is not None else getattr(module, "module", module)  # the unwrapped module

    def __call__(self, x):
        return self.module(x)

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(boundary)
            self.engine.backward(loss, scale_wrt_gas=False)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self) -> None:
        """Optimizer step, then gradients cleared."""
        if self.engine is not None:
            self.engine.step()  # steps the optimizer on the fp32 master and clears the gradients
            return
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        if self.engine is not None:
            self.engine.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _quiet_single_process_dcp():
    """DCP warns on every single-process save and load that it is single-process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _blocks(backbone: nn.Module) -> list[nn.Module]:
    """FSDP units inside a backbone: the children of every nn.Sequential (ResNet stages' blocks, ViT blocks)."""
    blocks = []
    for m in backbone.modules():
        if isinstance(m, nn.Sequential):
            blocks += [c for c in m.children() if any(p.numel() for p in c.parameters())
                       and not isinstance(c, nn.Sequential)]
    return blocks

"""DeepSpeed: an engine with ZeRO stage 1, 2 or 3 over a torch optimizer (bigltr's SGD).

ZeRO keeps flat fp32 master partitions that cut across class rows, so MaxNorm reduces partial row norms with one
all-reduce and scales each rank's slice of BOTH the fp32 master and the working copy; editing only the module's
weight would be undone by the next step, which updates the master and copies it over. Checkpoints are DeepSpeed's
own format (per-rank optimizer partitions): they resume only under the same ZeRO stage and world size.
"""
from __future__ import annotations

import datetime
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from bigltr.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_torch_files, write_error
from bigltr.distributed.backend import state_copy
from bigltr.distributed.launch import DistError
from bigltr.distributed.trainable import Trainable
from bigltr.ops import flat_row_sumsq, flat_rows_scale_, maxnorm_scales


class EngineTrainable(Trainable):
    """A DeepSpeed engine: it reduces gradients only at the accumulation boundary and steps the fp32 master."""

    def __init__(self, engine, optimizer: torch.optim.Optimizer, inner: nn.Module):
        super().__init__(engine, optimizer, inner=inner)
        self.engine = engine

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self.engine.step()  # steps the optimizer on the fp32 master and clears the gradients

    def zero_grad(self) -> None:
        self.engine.zero_grad()


class DeepSpeedBackend:
    checkpoint_format = "deepspeed"
    checkpoint_reshards = False
    rows_sharded = False

    def __init__(self, rank: int, device: torch.device, zero_stage: int, zero3_persistence_threshold: int):
        self.rank, self.device = rank, device
        self.zero_stage, self.zero3_persistence_threshold = zero_stage, zero3_persistence_threshold

    @property
    def name(self) -> str:
        return f"deepspeed ZeRO-{self.zero_stage}"

    def join(self, timeout_s: float) -> None:
        # DeepSpeed picks its accelerator at import; without this it looks for CUDA and fails on CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.device.type == "cuda" else "cpu")
        # DeepSpeed 0.19 calls torch collectives that torch 2.14 deprecates, once per call: keep logs readable
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated",
                                category=FutureWarning)
        try:
            import deepspeed
        except ImportError:
            raise DistError("dist.backend=deepspeed needs the deepspeed package (pip install deepspeed)") from None
        deepspeed.init_distributed(dist_backend=dist.get_backend(),
                                   timeout=datetime.timedelta(seconds=timeout_s))  # adopts the torch group

    # ------------------------------------------------------------------------------------------ training
    def prepare(self, module: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], *, what: str,
                scaler=None, accum_steps: int = 1, micro_batch_size: int = 1) -> Trainable:
        import deepspeed  # (no GradScaler arrives here: config validation rejects amp=fp16 with DeepSpeed)

        optimizer = make_optimizer()
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=self.config(
            micro_batch_size, accum_steps))
        return EngineTrainable(engine, optimizer, inner=module)

    def config(self, micro_batch_size: int, accum_steps: int) -> dict:
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
        """The flat partitions of the fp32 master (and, under ZeRO-3, of the working copy) cut across rows, so each
        rank computes its partial row sums of squares, one all-reduce of `num_classes` values gives the row norms,
        and each rank scales its own slice of the master AND the working copy (a projection of the working copy
        alone would be undone by the next step, which starts from the master). No rank gathers the weight; the
        count covers all rows."""
        return self._project_rows

    def _project_rows(self, weight: nn.Parameter, radius: float, tau: float = 1.0,
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
        dist.all_reduce(sumsq, op=dist.ReduceOp.SUM)  # partial sums -> every row's squared norm, on every rank
        scales = maxnorm_scales(sumsq, radius, tau=tau, projection=projection)
        for flat in slices:
            flat_rows_scale_(flat, start, row_len, scales)
        if zero3:
            safe_set_local_fp32_param(weight, master)
        if weight.data.numel() == num_rows * row_len:  # whole on this rank: ZeRO-1/2, or a persistent ZeRO-3 param
            weight.data.mul_(scales.view(-1, 1).to(weight.dtype))
        return (scales < 1).sum()

    # ------------------------------------------------------------------------------------------ state
    def full_state_dict(self, model: nn.Module) -> dict:
        if self.zero_stage == 3:
            import deepspeed

            params = [p for p in model.parameters() if hasattr(p, "ds_id")]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return state_copy(model)
        return state_copy(model)

    def save_train_state(self, directory: Path, model: nn.Module, trainer: EngineTrainable) -> None:
        """DeepSpeed's engine format, plus the model entries outside the engine (stage 2's frozen backbone, whose
        BatchNorm statistics move with bn_mode=train)."""
        directory = Path(directory)
        try:
            trainer.engine.save_checkpoint(str(directory / self.checkpoint_format), tag="state",
                                           save_latest=False)
        except (OSError, RuntimeError) as e:
            raise write_error(directory, e) from None
        outside = _outside_engine(model, trainer)
        if self.rank == 0 and outside is not None:
            save_checkpoint(outside, directory / "outside_engine.pt")

    def verify_train_state(self, directory: Path) -> None:
        verify_torch_files(Path(directory) / self.checkpoint_format)

    def load_train_state(self, directory: Path, model: nn.Module, trainer: EngineTrainable) -> None:
        directory = Path(directory)
        state_dir = directory / self.checkpoint_format
        # DeepSpeed unpickles its files with weights_only=False: they pass bigltr's safe loader first
        verify_torch_files(state_dir)
        path, _ = trainer.engine.load_checkpoint(str(state_dir), tag="state", load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {state_dir}")
        if (directory / "outside_engine.pt").is_file():
            model.load_state_dict(load_checkpoint(directory / "outside_engine.pt", map_location=self.device),
                                  strict=False)


def _outside_engine(model: nn.Module, trainer: Trainable) -> dict | None:
    if trainer.inner is model:
        return None
    prefix = next(n for n, m in model.named_modules() if m is trainer.inner)
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(prefix + ".")}

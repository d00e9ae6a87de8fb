"""Distributed runtime: the process group, the backend's wrapping of what trains, and the few collectives the
engine uses. The only package that knows which backend runs; the stages see `Dist` and the `Trainable` it returns.

- `facade.py`    `Dist`: rank, world size, device, collectives, and every backend-specific operation delegated to
                 the backend chosen once (world size 1: nothing is wrapped, every collective is a no-op);
- `launch.py`    the process group from the launcher's environment, `check_launcher` (launcher vs config),
                 `resolve_device` (the config's device as this process's device);
- `backend.py`   the `Backend` protocol, and DCP checkpointing shared by one process, DDP and FSDP2;
- `ddp.py`, `fsdp2.py`, `deepspeed.py`   one backend each (DeepSpeed: also its config and ZeRO MaxNorm);
- `trainable.py` `Trainable`: `trainable(x)`, `backward(loss, boundary)`, `step()`.
"""
from bigltr.distributed.facade import Dist
from bigltr.distributed.launch import BACKENDS, DistError, check_launcher, launched_world_size, resolve_device
from bigltr.distributed.trainable import Trainable

__all__ = ["Dist", "DistError", "Trainable", "check_launcher", "launched_world_size", "resolve_device",
           "BACKENDS"]

"""How one stage's GLOBAL batch (`batch_size`, the paper's number) is made on a launch of N processes: each process
runs micro-batches of `micro_batch_size` and accumulates gradients until the global batch is reached."""
from __future__ import annotations

from dataclasses import dataclass

from bigltr.config.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How one stage's global batch is made on this launch: processes x per_process x accum_steps = global_."""
    global_: int
    processes: int
    per_process: int  # images per process per forward pass (the loader's batch)
    accum_steps: int  # forward/backward passes per optimiser step

    def record(self) -> dict:
        return {"global": self.global_, "processes": self.processes, "per_process": self.per_process,
                "accum_steps": self.accum_steps}

    def describe(self) -> str:
        return (f"global batch {self.global_} = {self.processes} process(es) x {self.per_process} per process x "
                f"{self.accum_steps} accumulation step(s)")


def batch_plan(stage_cfg, processes: int, key: str) -> BatchPlan:
    """The stage's BatchPlan for `processes` processes; ConfigError (naming both numbers) when the global batch
    cannot be split into equal micro-batches on that many processes."""
    g, micro = stage_cfg.batch_size, stage_cfg.micro_batch_size
    if g % processes:
        raise ConfigError(f"config key '{key}.batch_size': the global batch {g} does not split over {processes} "
                          f"processes ({g} / {processes} is not a whole number); pick a batch_size that is a "
                          f"multiple of {processes}, or launch a number of processes that divides {g}")
    per_rank = g // processes
    micro = micro or per_rank
    if per_rank % micro:
        raise ConfigError(f"config key '{key}.micro_batch_size': {micro} does not divide the {per_rank} images each "
                          f"of {processes} processes takes of {key}.batch_size={g}; pick a divisor of {per_rank}")
    return BatchPlan(global_=g, processes=processes, per_process=micro, accum_steps=per_rank // micro)

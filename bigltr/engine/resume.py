"""Preemption-safe training: resume checkpoints that carry the data position, and the check that resume=auto
continues with the config the run was trained with (when to stop: bigltr.engine.stop).

A stage writes a resume checkpoint every `ckpt_every_steps` optimiser steps, at every epoch end and when it is
asked to stop, as a folder `<out>/stage{N}/resume/e{epoch}-b{batch}/`:
- the model and optimizer, SHARDED: each rank writes its own part (`Dist.save_train_state`: torch.distributed.
  checkpoint for one process / DDP / FSDP2, DeepSpeed's engine format for ZeRO), so no rank ever holds the whole
  optimizer state;
- `meta.pt` (rank 0): epoch and the number of batches of that epoch already trained, scheduler, grad scaler, best
  validation result so far, per-epoch norm history, the resolved config, world size and backend;
- `rank/rank{R}.pt`: each rank's RNG states and per-rank counters (MaxNorm's clipped rows since the epoch began;
  mid-epoch, the epoch's running train loss sum, correct count, samples and steps, so a resumed epoch reports the
  numbers of the whole epoch) and its own copy of the model's buffers (BatchNorm statistics: under DDP a rank's copy
  differs from rank 0's by its last batch until the next forward broadcasts rank 0's, and the sharded save keeps
  one copy of each replicated tensor, not necessarily rank 0's).
The folder is written under a temporary name and renamed when every rank has finished, so a crash during a save
leaves the previous checkpoint complete; the newest two are kept. `resume=auto` picks the newest complete one.
Resuming replays the epoch's deterministic (seed, epoch) order and skips the batches already trained, so an
interrupted run ends with the same weights as a straight one. That needs the loaders to draw nothing from the
process's global RNGs (restored here) while they replay: ShardLoader's augmentation has its own per-(seed, epoch,
rank) RNG also with num_workers=0, DALI's pipeline is seeded per (seed, epoch, rank), and the stage-2 feature
cache's order per (seed, epoch).
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from bigltr.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_error
from bigltr.config import Config, ConfigError, config_diff, key_in, to_dict
from bigltr.engine.stop import check_finite_weights
from bigltr.rundir import STAGES, RunDir, StageDir

log = logging.getLogger("bigltr")

def rng_state() -> dict:
    st = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (st[0], torch.from_numpy(st[1].astype(np.int64)), *st[2:]),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuples(x):
    """torch.load(weights_only) returns lists where tuples were saved; random.setstate needs tuples back."""
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


KEEP = 2  # complete resume checkpoints kept per stage
_TAG = re.compile(r"^e(\d{5})-b(\d{8})$")


def resume_candidates(stage_dir: Path) -> list[Path]:
    """Complete resume checkpoints of a stage (folders with meta.pt), newest first."""
    root = StageDir(stage_dir).resume
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _TAG.match(p.name) and (p / "meta.pt").is_file()), reverse=True)


class StageState:
    """A stage's position and history, and the resume checkpoints that carry them."""

    def __init__(self, stage_dir: Path, stage: int, config: dict, *, dist, model, trainer, scheduler,
                 stateful: dict | None = None):
        """`stateful`: more objects with state_dict()/load_state_dict() to carry, per rank (stage 2's MaxNorm
        counters, which count this rank's rows under FSDP2)."""
        self.root, self.stage, self.config = StageDir(stage_dir).resume, stage, config
        self.dist, self.model, self.trainer, self.scheduler = dist, model, trainer, scheduler
        self.stateful = stateful or {}
        self.epoch, self.batch = 0, 0  # where training (re)starts
        self.best = None  # (epoch, val_all) of the best epoch so far
        self.norms_per_epoch: list = []
        self.tally: dict = {}  # the running epoch's train loss sum, correct, samples, steps (common.train_epoch)
        self.resumed = False
        self._steps = 0

    def steps_taken(self) -> int:
        self._steps += 1
        return self._steps

    def restore_newest(self, candidates: list[Path]) -> "StageState":
        """Restore the newest readable checkpoint of `candidates` (newest first). An unreadable one (truncated,
        corrupt, or refused by the safe loader) is skipped with a warning naming it; all ranks agree on the one
        they load. None readable: an error (starting the stage over silently would discard the run)."""
        skipped = []
        for directory in candidates:
            problem = self._check_readable(directory)
            ok = torch.tensor(0 if problem else 1, device=self.dist.device)
            if int(self.dist.all_reduce_(ok, "min")) == 1:
                if skipped:
                    log.warning(f"stage {self.stage}: resuming from {directory}; skipped newer unreadable "
                                f"checkpoint(s): " + "; ".join(skipped))
                return self.restore(directory)
            skipped.append(f"{directory.name} ({problem or 'unreadable on another rank'})")
            log.warning(f"stage {self.stage}: skipping resume checkpoint {directory}: {problem or 'unreadable on another rank'}")
        if candidates:
            raise CheckpointError(f"no readable resume checkpoint in {self.root}: " + "; ".join(skipped)
                                  + f". Remove {self.root} to start stage {self.stage} over")
        return self

    def _check_readable(self, directory: Path) -> str:
        """'' if the folder's files load safely and completely on this rank, else the reason."""
        try:
            meta = load_checkpoint(directory / "meta.pt")
            if not isinstance(meta, dict) or "format" not in meta or "epoch" not in meta:
                return "meta.pt is not a bigltr resume checkpoint"
            if meta["format"] == self.dist.checkpoint_format:  # a foreign format is refused by restore, by name
                self.dist.verify_train_state(directory)
            mine = directory / "rank" / f"rank{self.dist.rank}.pt"
            if mine.is_file():
                load_checkpoint(mine)
        except (CheckpointError, FileNotFoundError) as e:
            return str(e)
        return ""

    def restore(self, directory: Path | None) -> "StageState":
        """Load model, optimizer, scheduler, scaler, RNG and position from a resume checkpoint folder."""
        if directory is None:
            return self
        meta = load_checkpoint(directory / "meta.pt")
        d = self.dist
        if meta["format"] != d.checkpoint_format:  # DCP (one process, DDP, FSDP2: interchangeable) or DeepSpeed's
            raise ConfigError(f"{directory} was written by dist.backend={meta['backend']} on {meta['world_size']} "
                              f"process(es) ({meta['format']} format); this run (dist.backend={d.backend}, "
                              f"{d.world_size} process(es)) cannot read it: resume with dist.backend={meta['backend']}")
        if d.zero_stage is not None and meta.get("zero_stage") != d.zero_stage:
            raise ConfigError(f"{directory} was written with ZeRO stage {meta.get('zero_stage')}; resume it with "
                              f"dist.zero_stage={meta.get('zero_stage')} (DeepSpeed's partitions differ per stage)")
        if meta["world_size"] != d.world_size and (meta["batch"] or not d.checkpoint_reshards):
            raise ConfigError(
                f"{directory} was written by {meta['world_size']} process(es), this run has {d.world_size}: a "
                f"mid-epoch position (and DeepSpeed's optimizer partitions) only resume on the same number of "
                f"processes; relaunch with {meta['world_size']}")
        d.load_train_state(directory, self.model, self.trainer)
        self.scheduler.load_state_dict(meta["scheduler"])
        if self.trainer.scaler is not None and meta["scaler"]:
            self.trainer.scaler.load_state_dict(meta["scaler"])
        mine = directory / "rank" / f"rank{d.rank}.pt"
        if mine.is_file():  # absent when resuming on more ranks (an epoch end of a DCP checkpoint): fresh state
            state = load_checkpoint(mine)
            _load_buffers(self.model, state.get("buffers") or {})  # this rank's own, over the deduplicated copy
            set_rng_state(_rng_from_file(state["rng"]))
            for name, obj in self.stateful.items():
                obj.load_state_dict(state["stateful"][name])
            self.tally = dict(state.get("tally") or {})  # older checkpoints: none (the epoch reports its rest only)
        self.epoch, self.batch = meta["epoch"], meta["batch"]
        # [C] float32 per epoch (a checkpoint of an older bigltr: lists of floats)
        self.norms_per_epoch = [torch.as_tensor(n, dtype=torch.float32) for n in meta["norms_per_epoch"]]
        self.best = tuple(meta["best"]) if meta["best"] else None
        self.resumed = True
        log.info(f"stage {self.stage}: resuming {directory} at epoch {self.epoch + 1}, batch {self.batch}")
        return self

    def start_batch(self, epoch: int) -> int:
        return self.batch if epoch == self.epoch else 0

    def checkpoint(self, epoch: int, batch: int) -> Path:
        """Collective: every rank writes its part into a temporary folder; rank 0 renames it when all are done."""
        check_finite_weights(self.model, self.dist, self.stage, epoch, batch)
        d, tag = self.dist, f"e{epoch:05d}-b{batch:08d}"
        final, tmp = self.root / tag, self.root / f".tmp-{tag}"
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            try:
                (tmp / "rank").mkdir(parents=True)
            except OSError as e:
                raise write_error(tmp, e) from None
        d.barrier()
        err = None
        try:
            d.save_train_state(tmp, self.model, self.trainer)
            tally = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in self.tally.items()
                     if batch and self.tally.get("batches") == batch}  # mid-epoch only: this epoch's numbers
            save_checkpoint({"rng": rng_state(), "stateful": {k: v.state_dict() for k, v in self.stateful.items()},
                             "tally": tally, "buffers": _buffers(self.model)}, tmp / "rank" / f"rank{d.rank}.pt")
        except CheckpointError as e:
            err = e
        self._agree_written(err, tmp)  # every rank's files are written, or every rank raises
        err = None
        if d.is_main:
            try:
                self._write_meta(tmp, epoch, batch)
            except CheckpointError as e:
                err = e
        self._agree_written(err, tmp)
        if d.is_main:
            if final.exists():  # the same position saved again (a stop right after resuming)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            entries = list(self.root.iterdir())
            done = sorted(p for p in entries if _TAG.match(p.name) and (p / "meta.pt").is_file())
            partial = [p for p in entries if p.is_dir() and p not in done]  # debris of saves cut short
            for old in done[:-KEEP] + partial:
                shutil.rmtree(old, ignore_errors=True)
        d.barrier()  # the checkpoint is complete before any rank goes on (or exits)
        return final

    def _agree_written(self, err: Exception | None, tmp: Path) -> None:
        """Collective: if any rank failed to write (e.g. a full disk), remove the temporary folder and raise on
        every rank (a rank that raised alone would leave the others waiting in the next collective)."""
        ok = torch.tensor(0 if err else 1, device=self.dist.device)
        if int(self.dist.all_reduce_(ok, "min")) == 1:
            return
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # leave no half-written folder behind
        raise err or CheckpointError(f"another rank failed writing {tmp}")

    def _write_meta(self, tmp: Path, epoch: int, batch: int) -> None:
        d = self.dist
        scaler = self.trainer.scaler.state_dict() if self.trainer.scaler else None
        save_checkpoint({"epoch": epoch, "batch": batch, "stage": self.stage,
                         "scheduler": self.scheduler.state_dict(), "scaler": scaler,
                         "best": list(self.best) if self.best else None, "norms_per_epoch": self.norms_per_epoch,
                         "config": self.config, "world_size": d.world_size, "backend": d.backend,
                         "format": d.checkpoint_format, "zero_stage": d.zero_stage},
                        tmp / "meta.pt")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _buffers(model) -> dict:
    """This rank's copy of the model's plain-tensor buffers (BatchNorm statistics; small)."""
    return {n: b.detach().cpu().clone() for n, b in model.named_buffers()
            if type(b) is torch.Tensor}  # not DTensors (sharded: DCP holds them)


@torch.no_grad()
def _load_buffers(model, saved: dict) -> None:
    for n, b in model.named_buffers():
        if n in saved and type(b) is torch.Tensor and b.shape == saved[n].shape:
            b.copy_(saved[n])


def _rng_from_file(state: dict) -> dict:
    """torch.load(weights_only) returns lists where tuples were saved; random/numpy setstate need tuples."""
    state["python"] = _to_tuples(state["python"])
    state["numpy"] = tuple(state["numpy"])
    return state


# Keys that may differ when a run is resumed: how long it trains, where things are, logging, the launch.
RESUMABLE = ("recipe", "stage", "out", "resume", "device", "log_every", "ckpt_every_steps", "preempt_check_every",
             "stage1.epochs", "stage2.epochs", "stage1.micro_batch_size", "stage2.micro_batch_size", "data.root", "data.num_workers", "data.pin_memory",
             "data.max_skip_fraction", "data.eval_partial", "data.pipeline", "stage2.cache.location",
             "stage2.cache.dir", "eval.", "dist.", "log.")


def compare_for_resume(saved: dict, new: dict, defaults: dict, started: set[str]) -> tuple[list[str], list[str]]:
    """(errors, allowed changes) between the saved and the new resolved config.

    `started`: the stages ("stage1", "stage2") with results or resume checkpoints; a key of a stage that has not
    started may change. A key the saved config lacks (written by an older bigltr) counts as its default. Both
    lists are sorted by key."""
    may_change = RESUMABLE + tuple(f"{s}." for s in ("stage1", "stage2") if s not in started)
    errors, allowed = [], []
    for key, old, value in sorted(config_diff(saved, new, defaults=defaults), key=lambda d: d[0]):
        (allowed if key_in(key, may_change) else errors).append(f"{key}: {old!r} -> {value!r}")
    return errors, allowed


def check_resume_config(cfg: Config, out: Path, results: dict) -> None:
    """resume=auto continues checkpoints trained with out/config.yaml: a key that changes the model, data or
    method of a stage that has started is an error; keys that may change are listed."""
    run_dir = RunDir(out)
    saved_path = run_dir.config
    if not saved_path.exists():
        return
    try:
        saved = run_dir.read_config()
    except (yaml.YAMLError, OSError) as e:
        raise ConfigError(f"resume=auto: {saved_path} is not readable ({e})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"resume=auto: {saved_path} does not hold a config mapping")
    started = {s for s in STAGES if s in results or resume_candidates(run_dir.stage(s).path)}
    if not started:
        return
    errors, allowed = compare_for_resume(saved, to_dict(cfg), to_dict(Config()), started)
    if errors:
        raise ConfigError(f"resume=auto in {out}: the checkpoints there were trained with {saved_path}, and these "
                          f"keys change the model, data or method: " + "; ".join(errors)
                          + ". Use another out= for a new run, or resume with the saved values")
    if allowed:
        log.info("resume=auto: changed since the run started: " + "; ".join(allowed))

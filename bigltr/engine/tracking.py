"""Experiment tracking (config `log.trackers`: tensorboard, wandb, mlflow, ...) through Accelerate's tracker classes.

bigltr sets up its process group itself and never builds an `accelerate.Accelerator`, so it uses Accelerate's
`GeneralTracker` subclasses (`accelerate.tracking.LOGGER_TYPE_TO_CLASS`) directly, the way
`Accelerator.init_trackers` does: constructed with the project name (and `logging_dir=<out>/trackers` where the
class takes one), `start()`, `store_init_configuration(config)`, `log(values, step)`, `finish()`. Only the main rank
tracks; the trackers need Accelerate's `PartialState`, which is made then (it adopts bigltr's process group).

What is logged, per stage N:
- every epoch, at step = the epoch number within the stage (1-based, summary.csv's `epoch`): `stageN/<column>` for
  the summary.csv columns in TRACKED that the stage writes, with the very values of that row (train loss, lr,
  train accuracy, val all/many/medium/few, img/s; stage 2's MaxNorm radius, clipped rows, rows at the radius, row
  norm min/mean/max). Both stages count from 1, so their names carry the stage;
- after the stage, at step = its last epoch: `stageN/test_all` (many, medium, few) and `stageN/best_epoch`;
- once, at the start: the resolved config, flattened to dotted keys (`stage2.maxnorm.radius`; lists as text).

A tracker that cannot write its local logs (`<out>/trackers` is a file, not writable, ...) stops the run at start
with a ConfigError naming the tracker and the folder (bigltr-train: exit 2), not a traceback.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

from accelerate.state import PartialState
from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from bigltr.config import Config, ConfigError, flatten, to_dict

log = logging.getLogger("bigltr")

# summary.csv columns sent to the trackers (those a stage does not write are left out)
TRACKED = ("train_loss", "lr", "train_acc", "val_all", "val_many", "val_medium", "val_few", "img_per_s",
           "maxnorm_radius", "maxnorm_clipped_rows", "maxnorm_rows_at_radius", "wnorm_min", "wnorm_mean",
           "wnorm_max")


def flatten_config(cfg: Config) -> dict:
    """The resolved config as {"a.b": value} (the dotted keys of resume=auto's comparison), values as trackers take
    them: bool, int, float, str, and a list as its text."""
    return {k: str(v) if isinstance(v, (list, tuple)) else v for k, v in flatten(to_dict(cfg)).items()}


class Tracking:
    """The run's open trackers (none: every call does nothing). A context manager: finished on leaving."""

    def __init__(self, trackers: list | None = None):
        self.trackers = list(trackers or [])

    @classmethod
    def open(cls, cfg: Config, out: Path, is_main: bool) -> "Tracking":
        """Start `cfg.log.trackers` on the main rank (names and packages were checked by bigltr.config.validate)
        and store the resolved config. Project: `cfg.log.project`, else the run directory's name."""
        if not (is_main and cfg.log.trackers):
            return cls()
        project = cfg.log.project or Path(out).resolve().name
        # The trackers log (and pick their main process) through Accelerate's process state. Made here, after
        # bigltr joined its process group, it adopts that group (rank, world size) and this rank's device.
        PartialState()
        opened = cls()
        try:
            for name in dict.fromkeys(cfg.log.trackers):  # a name given twice is one tracker
                tracker_cls = LOGGER_TYPE_TO_CLASS[name]
                kwargs = {}
                if "logging_dir" in inspect.signature(tracker_cls).parameters:  # tensorboard, aim, mlflow
                    kwargs["logging_dir"] = str(Path(out) / "trackers")
                try:
                    tracker = tracker_cls(project, **kwargs)
                    tracker.start()
                except OSError as e:  # its local log folder: a file in the way, no permission, a full disk
                    where = kwargs.get("logging_dir", "its log folder")
                    raise ConfigError(f"log.trackers: {name} cannot write its logs under {where} "
                                      f"({type(e).__name__}: {e.strerror or e}: {e.filename or where}); make it a "
                                      f"writable folder, or drop {name} from log.trackers") from None
                opened.trackers.append(tracker)
            config = flatten_config(cfg)
            for tracker in opened.trackers:
                tracker.store_init_configuration(config)
        except BaseException:
            opened.finish()
            raise
        return opened

    def log_epoch(self, stage: int, row: dict) -> None:
        """One summary.csv row of stage `stage`, at step = its epoch (a group without classes has no value)."""
        values = {f"stage{stage}/{k}": row[k] for k in TRACKED if row.get(k) is not None}
        for tracker in self.trackers:
            tracker.log(values, step=row["epoch"])

    def log_final(self, stage: int, metrics: dict, best_epoch: int, step: int) -> None:
        """The stage's final test results (of its best epoch's weights)."""
        test = metrics["test"]
        values = {f"stage{stage}/test_{g}": test[g] for g in ("all", "many", "medium", "few")
                  if test[g] is not None}  # None: a group without classes
        values[f"stage{stage}/best_epoch"] = best_epoch
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        """Close every tracker (flushes event files, ends wandb/mlflow runs). A tracker that fails to close is
        logged, not raised: it must not hide the error that ended the run, nor fail a finished one."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.finish()
            except Exception as e:  # noqa: BLE001
                log.warning(f"tracker {tracker.name}: finish failed ({type(e).__name__}: {e})")

    def __enter__(self) -> "Tracking":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

"""A run folder (`out=`) and where each of its files lives: the one place that spells the layout.

    <out>/config.yaml         the resolved config the run was started with (resume=auto compares against it)
    <out>/results.json        per-stage metrics (bigltr.results reads it)
    <out>/table.md            Many / Medium / Few / All on test
    <out>/*.png               weight_norms, per_class_accuracy, stage{1,2}_norm_evolution
    <out>/PREEMPT             a stop request (created by the Slurm scripts or a user; removed when a run starts)
    <out>/.bigltr.lock        one run at a time (bigltr.engine.lock.RunLock)
    <out>/stage{1,2}/         a stage's folder (StageDir):
        best.pt, last.pt      model checkpoints (bigltr.checkpoint.load_run_checkpoint reads them)
        summary.csv           one row per epoch
        weight_norms.json/.npy  classifier row norms per epoch
        resume/               resume checkpoints (bigltr.engine.resume)
        feature_cache/        stage 2's cached backbone features (stage2.cache.dir empty)

Foundation level (docs/architecture.md): paths only, no bigltr import at module level, so bigltr.config, the
results reader, bigltr-export, bigltr-ablation and bigltr-tune use it without the engine or torch.
"""
from __future__ import annotations

import os
from pathlib import Path

STAGES = ("stage1", "stage2")


def default_out(recipe: str) -> str:
    """The run folder when out= is empty: runs/<recipe name>, or runs/default without a recipe."""
    return os.path.join("runs", Path(recipe).stem or "default")


def stage_name(stage: int | str) -> str:
    """"stage1" / "stage2" from 1, 2, "1", "2" or the name itself."""
    s = str(stage)
    return s if s.startswith("stage") else f"stage{s}"


class _Folder:
    """A folder addressed by its path (os.fspath works on it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class StageDir(_Folder):
    """`<out>/stage{1,2}/`: a stage's checkpoints, logs and resume state."""

    BEST = "best.pt"
    LAST = "last.pt"
    SUMMARY = "summary.csv"
    WEIGHT_NORMS = "weight_norms.json"
    WEIGHT_NORMS_ARRAY = "weight_norms.npy"
    RESUME = "resume"
    FEATURE_CACHE = "feature_cache"


    @property
    def best(self) -> Path:
        return self.path / self.BEST

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def weight_norms(self) -> Path:
        return self.path / self.WEIGHT_NORMS

    @property
    def weight_norms_array(self) -> Path:
        return self.path / self.WEIGHT_NORMS_ARRAY

    @property
    def resume(self) -> Path:
        return self.path / self.RESUME

    @property
    def feature_cache(self) -> Path:
        return self.path / self.FEATURE_CACHE


class RunDir(_Folder):
    """`<out>/`: a run folder's files (see the module's docstring for the layout)."""

    CONFIG = "config.yaml"
    RESULTS = "results.json"
    TABLE = "table.md"
    PREEMPT = "PREEMPT"
    LOCK = ".bigltr.lock"


    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> "RunDir":
        """The run folder of a stage's checkpoint file (RUN/stageN/best.pt -> RUN); a checkpoint outside a stage
        folder: the folder that holds it."""
        parent = Path(checkpoint).parent
        return cls(parent.parent if parent.name in STAGES else parent)

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def results(self) -> Path:
        return self.path / self.RESULTS

    @property
    def table(self) -> Path:
        return self.path / self.TABLE

    @property
    def preempt(self) -> Path:
        return self.path / self.PREEMPT

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    def plot(self, name: str) -> Path:
        """A plot of the run: `name` is e.g. "weight_norms" or "stage1_norm_evolution" (written as <name>.png)."""
        return self.path / f"{name}.png"

    def stage(self, stage: int | str) -> StageDir:
        """The folder of stage 1 or 2 (1, 2, "1", "2", "stage1", "stage2")."""
        return StageDir(self.path / stage_name(stage))

    def best(self, stage: int | str) -> Path:
        """`<out>/stageN/best.pt`."""
        return self.stage(stage).best

    def read_config(self):
        """config.yaml as YAML loads it (aliases bounded; normally a mapping). Raises OSError (absent, unreadable)
        or yaml.YAMLError; each caller says what that means for it."""
        import yaml

        from bigltr.config import BoundedSafeLoader

        return yaml.load(self.config.read_text(), Loader=BoundedSafeLoader)

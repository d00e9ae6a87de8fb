"""The search space: the --space grammar (KEY=KIND:ARGS), a searched key (Param: its Optuna suggestion, the values
that check it against the config) and each phase's default space."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import optuna

from bigltr.tune.base import RADIUS, S1_WD, S2_WD, TuneError, fmt


def _scalar(text: str):
    """A categorical value: int, float, true/false/null, else the string itself."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)



@dataclass
class Param:
    key: str
    kind: str  # log, log0, float, int, cat, grid
    lo: float = 0.0
    hi: float = 0.0
    step: float | None = None
    choices: list = field(default_factory=list)

    @property
    def phase(self) -> int:
        return 2 if self.key.startswith("stage2.") else 1

    def spec(self) -> str:
        if self.kind in ("cat", "grid"):
            return f"{self.key}={self.kind}:{','.join(fmt(c) for c in self.choices)}"
        return f"{self.key}={self.kind}:{self.lo:g}:{self.hi:g}" + (f":{self.step:g}" if self.step else "")

    def suggest(self, trial: optuna.Trial):
        """The value for the trainer (continuous floats rounded to 4 significant digits, for readable commands)."""
        if self.kind in ("cat", "grid"):
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.lo), int(self.hi), step=int(self.step or 1))
        if self.kind == "log0" and trial.suggest_categorical(f"{self.key} is 0", [False, True]):
            return 0.0
        v = trial.suggest_float(self.key, self.lo, self.hi, log=self.kind != "float", step=self.step)
        return float(f"{v:.4g}")

    def examples(self) -> list:
        """Values that check the key and range against the config before anything runs."""
        if self.kind in ("cat", "grid"):
            return list(self.choices)
        ex = [int(self.lo), int(self.hi)] if self.kind == "int" else [self.lo, self.hi]
        return ([0.0] if self.kind == "log0" else []) + ex


def parse_param(text: str) -> Param:
    usage = ("expected KEY=KIND:ARGS, e.g. stage1.weight_decay=log:1e-5:1e-1, stage2.maxnorm.radius=float:0:0.5, "
             "stage1.wd_scope=cat:all,no_norm_bias or stage1.weight_decay=grid:1e-4,1e-3,5e-3")
    key, _, rest = text.partition("=")
    kind, _, args = rest.partition(":")
    key = key.strip()
    if not key or not args:
        raise TuneError(f"--space {text!r}: {usage}")
    if kind in ("cat", "grid"):
        items = [a.strip() for a in args.split(",")]
        if "" in items:
            raise TuneError(f"--space {text!r}: empty value in the list")
        return Param(key, kind, choices=list(dict.fromkeys(_scalar(a) for a in items)))
    if kind not in ("log", "log0", "float", "int"):
        raise TuneError(f"--space {text!r}: unknown kind {kind!r} (log, log0, float, int, cat, grid)")
    try:
        nums = [float(a) for a in args.split(":")]
    except ValueError:
        raise TuneError(f"--space {text!r}: bounds must be numbers; {usage}") from None
    if len(nums) not in (2, 3) or (kind.startswith("log") and len(nums) != 2):
        raise TuneError(f"--space {text!r}: {kind} takes LO:HI" + ("" if kind.startswith("log") else "[:STEP]"))
    lo, hi = nums[:2]
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or (kind.startswith("log") and lo <= 0):
        raise TuneError(f"--space {text!r}: need LO < HI" + (" and LO > 0 (log scale)" if kind.startswith("log")
                                                            else ""))
    if kind == "int" and not (lo.is_integer() and hi.is_integer()):
        raise TuneError(f"--space {text!r}: int bounds must be integers")
    step = nums[2] if len(nums) == 3 else None
    if step is not None:
        if not (math.isfinite(step) and 0 < step <= hi - lo):
            raise TuneError(f"--space {text!r}: need 0 < STEP <= HI - LO")
        if kind == "int" and not step.is_integer():
            raise TuneError(f"--space {text!r}: an int STEP must be an integer")
    return Param(key, kind, lo, hi, step)


def default_space(phase: int, cfg) -> list[Param]:
    if phase == 1:
        return [parse_param(f"{S1_WD}=log:1e-5:1e-1")]
    space = [parse_param(f"{S2_WD}=log0:1e-4:1")]
    if cfg.stage2.maxnorm.radius_mode == "relative":  # an absolute radius depends on the model: give its range
        space.append(parse_param(f"{RADIUS}=float:0:0.5"))
    return space

"""Checkpoints: atomic writes, and reads that never run code from a file.

Writes go to a temporary file in the same folder, then `os.replace`: a crash during a save leaves the previous file
intact, and a full disk is reported as "no space left writing PATH" with the temporary file removed.

Reads: `.pt` files are loaded with `torch.load(weights_only=True)` (tensors and plain containers only). The
resume checkpoints' model/optimizer part is torch.distributed.checkpoint (DCP), whose `.metadata` file is a plain
pickle and whose non-tensor items (optimizer hyper-parameters) are loaded by DCP's default planner with
`weights_only=False`: both would execute whatever a crafted file asks. `dcp_load` therefore reads the metadata
with an unpickler that accepts only DCP's own metadata classes (an allow-list, below) and loads the non-tensor items
with `weights_only=True`. DeepSpeed loads its files with `weights_only=False` itself, so `verify_torch_files` checks
every file of a DeepSpeed checkpoint with the safe loader before the folder is handed to DeepSpeed.
"""
from __future__ import annotations

import errno
import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from bigltr.config import Config, config_from_dict, field_entry
from bigltr.errors import BadInputError


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path."""


EXIT_NON_FINITE = 3  # bigltr-eval / bigltr-export, like bigltr-train's "the loss or weights became non-finite"


class NonFiniteWeightsError(CheckpointError):
    """A model checkpoint holds nan/inf weights; the message names the file and the first such tensor. The entry
    points that evaluate or export weights exit with EXIT_NON_FINITE (3)."""


def _no_space(e: BaseException, path) -> bool:
    if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e):
        return True
    # torch.save's zip writer reports a short write as "enforce fail at inline_container.cc ... unexpected pos":
    # ask the file system (called before the partial file is removed, so a full disk still reads as full)
    for d in (Path(path), *Path(path).parents):
        if d.exists():
            try:
                st = os.statvfs(d)
            except OSError:
                return False
            return st.f_bavail * st.f_frsize < 1 << 20
    return False


def write_error(path, e: BaseException) -> CheckpointError:
    """The error to raise for a failed write of `path` (a full disk says so in one line)."""
    if _no_space(e, path):
        return CheckpointError(f"no space left writing {path}")
    return CheckpointError(f"could not write {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise write_error(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """Any `.pt` file, tensors and plain values only. `mmap`: tensors are mapped, not read (a caller that wants
    only the small entries)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, **({"mmap": True} if mmap else {}))
    except pickle.UnpicklingError as e:  # weights_only refused a global: the file asks to build/run other objects
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain values "
                              f"({_unsupported_global(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]}") from None


# ------------------------------------------------------------------------------------------ a run's model checkpoint
class NotRunCheckpointError(BadInputError):
    """The file is not a bigltr model checkpoint (`load_run_checkpoint`); the message names it."""


def load_run_checkpoint(path: str | os.PathLike, *, strict: bool = True, mmap: bool = False) -> dict:
    """The one reader of a run's model checkpoints, best.pt / last.pt: {"stage", "epoch", "model": state_dict,
    "val_all", "config", ["classes", "category_ids"]}, read safely (`load_checkpoint`: tensors and plain values
    only). A folder: BadInputError; a missing file: FileNotFoundError; an unreadable one: CheckpointError.

    strict (bigltr-eval, bigltr-export, the tau sweep): 'model' must hold classifier.weight and 'config' must be
    there (else NotRunCheckpointError), and nan/inf in any floating-point tensor of the model raises
    NonFiniteWeightsError (naming the first such tensor), so no command evaluates or exports weights that cannot
    give meaningful logits. strict=False (the trainer: stage 2's stage-1 weights, a stage's final reload of its
    best.pt, the summary table's labels): a mapping with a 'model' entry (else NotRunCheckpointError); the weights
    are not checked (the trainer never saves non-finite weights: StageState.check_finite runs first). `mmap`:
    tensors are mapped, not read (a caller that wants only the config)."""
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"{path} is a folder; give a checkpoint file such as RUN/stage2/best.pt (resume "
                            f"checkpoints under stage*/resume/ are not model checkpoints)")
    ckpt = load_checkpoint(path, mmap=mmap)  # FileNotFoundError / CheckpointError name the path
    if not strict:
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise NotRunCheckpointError(f"{path} is not a bigltr checkpoint (no 'model' entry)")
        return ckpt
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, dict) or not isinstance(ckpt.get("config"), dict) or "classifier.weight" not in model:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise NotRunCheckpointError(f"{path} is not a bigltr model checkpoint (expected a run's stage1/ or stage2/ "
                                    f"best.pt or last.pt, with 'model' holding classifier.weight and 'config'; found "
                                    f"{keys})")
    check_finite(model, path)
    return ckpt


def check_finite(state: dict, path) -> None:
    """Raise NonFiniteWeightsError naming the first floating-point tensor of `state` that holds nan or inf."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not bool(
                torch.isfinite(t).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise NonFiniteWeightsError(f"{path}: tensor '{name}' {tuple(t.shape)} holds non-finite values ({n_nan} "
                                        f"nan, {n_inf} inf of {t.numel()}); refusing to use these weights")


def checkpoint_classes(ckpt: dict) -> dict[str, list] | None:
    """The class identity a checkpoint was trained with: {"classes": [names], ["category_ids": [ids]]}, as its run's
    _info.json gave them (written into best.pt / last.pt since bigltr stored them); None for an older checkpoint."""
    classes = ckpt.get("classes")
    if not isinstance(classes, list):
        return None
    out = {"classes": classes}
    if isinstance(ckpt.get("category_ids"), list):
        out["category_ids"] = ckpt["category_ids"]
    return out


def class_mismatch(ckpt: dict, info: dict) -> str | None:
    """Why the checkpoint's classes are not the data's (`info`: its _info.json): the first index whose class name or
    category id differs, in words; None when they agree. Needs checkpoint_classes(ckpt) (not None)."""
    mine = checkpoint_classes(ckpt)
    for key in ("classes", "category_ids"):
        a, b = mine.get(key), info.get(key)
        if a is None or b is None:
            continue
        if len(a) != len(b):
            return f"{len(a)} {key} in the checkpoint, {len(b)} in the data"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                what = "class" if key == "classes" else "category id"
                return f"{what} {i} is {str(x)[:80]!r} in the checkpoint but {str(y)[:80]!r} in the data"
    return None


def _known_keys(data: dict, prefix: str = "") -> dict:
    """The part of a saved config that the current schema knows (a checkpoint from an older bigltr may carry keys
    that were renamed or removed since: they cannot matter to evaluation and are dropped)."""
    out = {}
    for name, value in data.items():
        entry = field_entry(prefix, name)
        if entry is None:
            continue
        if not entry.is_section:
            out[name] = value
        elif isinstance(value, dict):
            out[name] = _known_keys(value, f"{entry.key}.")
    return out


def checkpoint_config(ckpt: dict, overrides: dict[str, Any] | None = None, *, where: str = "checkpoint") -> Config:
    """The run's config saved in the checkpoint, with dotted `overrides` applied and everything validated
    (ConfigError)."""
    return config_from_dict(_known_keys(ckpt["config"]), overrides, where=where)


def checkpoint_stage(ckpt: dict) -> int:
    """The stage (1 or 2) that wrote the checkpoint; 1 when it does not say."""
    stage = ckpt.get("stage")
    return stage if stage in (1, 2) else 1


# ------------------------------------------------------------------------------------------ DCP without pickles
def _dcp_allowed() -> dict[tuple[str, str], object]:
    """Every global a DCP `.metadata` pickle of this torch version refers to (checked on one process, DDP and
    FSDP2 checkpoints): DCP's metadata dataclasses, torch.Size, dtypes, layouts and paths."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {("torch.distributed.checkpoint.metadata", n): getattr(metadata, n) for n in (
        "Metadata", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING") if hasattr(metadata, n)}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"):
        allowed[("pathlib", name)] = getattr(__import__("pathlib"), name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    _allowed: dict | None = None

    def find_class(self, module: str, name: str):
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _dcp_allowed()
        obj = _MetadataUnpickler._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not a DCP metadata class")
        return obj


def read_dcp_metadata(directory: str | os.PathLike):
    """DCP's `.metadata` of a checkpoint folder, unpickled with the allow-list (never runs code)."""
    path = Path(directory) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (incomplete checkpoint)")
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: {e}") from None
    except Exception as e:  # a truncated or garbled pickle raises many types
        raise CheckpointError(f"cannot read {path} (truncated or corrupt?): {type(e).__name__}: {e}") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(meta, Metadata) or not isinstance(getattr(meta, "storage_data", None), dict):
        raise CheckpointError(f"{path} is not DCP metadata")
    return meta


def verify_dcp(directory: str | os.PathLike) -> None:
    """Metadata readable, every data file it refers to present and long enough (catches truncation)."""
    directory = Path(directory)
    meta = read_dcp_metadata(directory)
    need: dict[str, int] = {}
    for info in meta.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in need.items():
        f = directory / rel
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (incomplete checkpoint)")
        if f.stat().st_size < size:
            raise CheckpointError(f"{f} is truncated ({f.stat().st_size} bytes, the metadata needs {size})")


def _safe_reader_and_planner(directory):
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:  # per-rank metadata files are not used by bigltr
                raise CheckpointError("per-rank DCP metadata is not supported")
            meta = read_dcp_metadata(self.path)
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            # DCP's default loads non-tensor items with weights_only=False; ours are floats/ints/strings/lists
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeReader(str(directory)), SafePlanner()


def dcp_load(state: dict, directory: str | os.PathLike, *, no_dist: bool) -> None:
    """`torch.distributed.checkpoint.load` into `state` without unpickling anything but the allow-list."""
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    reader, planner = _safe_reader_and_planner(directory)
    try:
        dcp.load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        causes = [w[0] if isinstance(w, tuple) else w for w in getattr(e, "failures", {}).values()] or [e]
        for c in causes:  # our own refusal / weights_only's refusal, said in one line
            if isinstance(c, CheckpointError):
                raise c from None
            if isinstance(c, pickle.UnpicklingError):
                raise CheckpointError(f"refusing to load {directory}: an item holds objects other than tensors "
                                      f"and plain values ({_unsupported_global(c)})") from None
        c = causes[0]
        raise CheckpointError(f"cannot load {directory}: {type(c).__name__}: "
                              f"{(str(c).splitlines() or [''])[0][:300]}") from None


def _unsupported_global(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln or "Unsupported operand" in ln]
    return (lines[0] if lines else (str(e).splitlines() or [""])[0])[:200]


def dcp_save(state: dict, directory: str | os.PathLike, *, no_dist: bool) -> None:
    import torch.distributed.checkpoint as dcp

    try:
        dcp.save(state, checkpoint_id=str(directory), no_dist=no_dist)
    except Exception as e:
        raise write_error(directory, e) from None


# ------------------------------------------------------------------------------------------ DeepSpeed's files
# Globals DeepSpeed 0.19's ZeRO-1/2/3 checkpoints of a torch SGD optimizer hold beyond weights_only's defaults.
# (checked with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-1 and ZeRO-3 checkpoints)
_DEEPSPEED_GLOBALS = ["deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.utils.tensor_fragment.fragment_address"]


def verify_torch_files(directory: str | os.PathLike) -> None:
    """Load every `.pt` file under `directory` with the safe loader (weights_only=True and a short allow-list): a
    file that asks for any other object is refused before DeepSpeed, which loads with weights_only=False, sees it.
    (DeepSpeed also writes zero_to_fp32.py beside its files; its loader never runs it.)"""
    directory = Path(directory)
    files = [p for p in sorted(directory.rglob("*.pt")) if p.is_file()]
    if not files:
        raise CheckpointError(f"{directory} holds no files (incomplete checkpoint)")
    extra = [g for g in (_resolve(n) for n in _DEEPSPEED_GLOBALS) if g is not None]
    with torch.serialization.safe_globals(extra):
        for p in files:
            load_checkpoint(p)


def _resolve(dotted: str):
    mod, _, name = dotted.rpartition(".")
    try:
        return getattr(__import__(mod, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None


def remove_tree(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)

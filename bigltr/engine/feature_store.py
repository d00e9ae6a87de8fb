"""Where the stage-2 feature cache (bigltr.engine.feature_cache) keeps its arrays: memory or a disk folder per
cached split, after a size check against free memory or disk.

On disk (`location=disk`) each cached split is one folder `<dir>/<split>-<digest of its key>/` (features.bin,
labels.npy, ..., meta.json with the key). A builder writes into a private `.<split>.building-*` folder in the same
directory and renames it into place when complete (atomic); a builder that loses the race to another one with the
same key drops its own copy and uses the winner's. A reader uses only a folder whose meta.json holds its exact key,
so concurrent stage-2 runs (a tuner's trials) can share one `stage2.cache.dir`. Caches made from an older version
of the same checkpoint file (its mtime and size are in the key) are removed after a new build.

meta.json also records what the files must hold (shape, dtype, row count, the sha256 of the labels, the class
count, and the training samples the build skipped or lost); a reused folder is checked against it (and against
the byte size its .npy headers imply), and one that does not match (truncated, rewritten, labels out of range) is
logged, removed and rebuilt. Training samples skipped as corrupt or lost to short shards while building are left
out of the cache and counted: stage 2 applies data.max_skip_fraction to them every epoch, as stage 1 does.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch


log = logging.getLogger("bigltr")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_space(nbytes: int, location: str, directory: Path | None) -> None:
    """Refuse a cache that would take more than 80% of what is free, naming the knobs that shrink it."""
    if location == "memory":
        free, where = available_memory_bytes(), "available memory"
    else:
        directory.mkdir(parents=True, exist_ok=True)
        free, where = shutil.disk_usage(directory).free, f"free disk space in {directory}"
    if nbytes > 0.8 * free:
        raise MemoryError(f"stage-2 feature cache needs {nbytes / 2**30:.2f} GiB, more than 80% of the "
                          f"{free / 2**30:.2f} GiB {where}: use fewer views (stage2.cache.views, num_aug), "
                          f"stage2.cache.dtype=bf16, stage2.cache.location=disk with stage2.cache.dir on a larger "
                          f"disk, or stage2.features=online")


def storage(shape: tuple, dtype: torch.dtype, location: str, directory: Path | None):
    """(tensor, memmap or None)."""
    if location == "memory":
        return torch.empty(shape, dtype=dtype), None
    # numpy has no bfloat16: a 16-bit integer memmap viewed as bf16 holds the same bytes.
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}[dtype]
    path = directory / "features.bin"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
    t = torch.from_numpy(mm)
    return (t.view(torch.bfloat16) if dtype == torch.bfloat16 else t), mm


# ---------------------------------------------------------------------------------------------- disk entries
def entry_name(split: str, key: dict) -> str:
    """The folder of one cached split inside the cache directory: the split and a digest of its key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{split}-{digest}"


def _read_key(entry: Path):
    try:
        return json.loads((entry / "meta.json").read_text()).get("key")
    except (OSError, ValueError):
        return None


def new_build_dir(root: Path, split: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{split}.building-", dir=root))


def _discard(entry: Path) -> None:
    """Remove a cache folder, renamed away first so that no reader opens a half-deleted one (a reader that has
    already mapped its files keeps them)."""
    trash = entry.with_name(f".{entry.name}.removing-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def publish(tmp: Path, entry: Path, key: dict) -> bool:
    """Rename the complete folder `tmp` to `entry` (atomic). False: another builder published the same key first;
    `tmp` is dropped. A folder at `entry` that is not a complete cache of `key` is removed and replaced."""
    for _ in range(3):
        try:
            os.rename(tmp, entry)
            return True
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if _read_key(entry) == key:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        _discard(entry)
    raise RuntimeError(f"feature cache: could not rename {tmp} to {entry}")


def prune(root: Path, split: str, key: dict) -> None:
    """After a build: remove caches of `split` made from an older version of the same checkpoint file (same path,
    older mtime: their key can never match again) and build folders left behind by a crash (older than 2 days)."""
    now = time.time()
    for p in list(root.iterdir()):
        try:
            if p.name.startswith(".") and (".building-" in p.name or ".removing-" in p.name):
                if now - p.stat().st_mtime > 2 * 86400:
                    shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(f"{split}-") and p.name != entry_name(split, key):
                other = _read_key(p)
                if (other and other.get("checkpoint") == key.get("checkpoint")
                        and other.get("checkpoint_mtime_ns", 0) < key.get("checkpoint_mtime_ns", 0)):
                    log.info(f"feature cache: removing {p} (made from an older version of {key['checkpoint']})")
                    _discard(p)
        except FileNotFoundError:  # removed meanwhile by another process
            pass


_NP_DTYPES = {"bf16": np.dtype(np.int16), "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}


def labels_digest(labels: np.ndarray) -> str:
    """sha256 of the labels as little-endian int64 (stored in meta.json, checked when a cache is reused)."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


def meta_extra(features: torch.Tensor, labels: torch.Tensor, num_classes, **counts) -> dict:
    """What meta.json records besides the key, to check the files against when the cache is reused."""
    return {"shape": list(features.shape), "dtype": str(_NP_DTYPES[_dtype_name(features.dtype)]),
            "rows": int(labels.shape[0]), "labels_sha256": labels_digest(labels.numpy()),
            "num_classes": num_classes, **counts}


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _check_entry(meta: dict, arr: np.ndarray, labels: np.ndarray, key: dict, index) -> str | None:
    """Why the files of a cache folder do not match its meta.json (None: they do)."""
    want = meta.get("shape")
    if not isinstance(want, list) or len(want) != 3 or "labels_sha256" not in meta:
        return "meta.json lacks the shape or the labels' checksum (written by an older bigltr)"
    if list(arr.shape) != want:
        return f"features.bin holds shape {list(arr.shape)}, meta.json records {want}"
    if arr.dtype != _NP_DTYPES.get(key.get("dtype"), arr.dtype) or str(arr.dtype) != meta.get("dtype", str(arr.dtype)):
        return f"features.bin holds {arr.dtype}, meta.json records {meta.get('dtype')} ({key.get('dtype')})"
    if labels.dtype != np.int64 or labels.shape != (want[1],) or meta.get("rows", want[1]) != want[1]:
        return f"labels.npy holds {labels.dtype} {list(labels.shape)}, expected int64 [{want[1]}]"
    if labels_digest(labels) != meta["labels_sha256"]:
        return "labels.npy does not match the checksum in meta.json"
    num_classes = meta.get("num_classes")
    if labels.size and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        return f"labels.npy holds labels outside [0, {num_classes})"
    if index is not None and (len(index.get("keys", ())) != want[1] or sum(index.get("sizes", ())) != want[1]):
        return f"index.json lists {len(index.get('keys', ()))} keys in batches of {sum(index.get('sizes', ()))} " \
               f"samples, features.bin holds {want[1]}"
    return None


def load_entry(entry: Path, key: dict, *, with_index: bool = False):
    """(features, labels, index.json's content or None, meta.json's content) of the complete disk cache in folder
    `entry` if it was written for the same key, else None (also when its files were removed meanwhile: the caller
    builds anew). The files are checked against meta.json (shapes, dtype, row count, the labels' checksum and range,
    and that the features file holds all its bytes); a folder that fails is logged, removed and None returned, so
    that the caller rebuilds it. The features are a copy-on-write mapping: writable for torch, never written back
    (other runs may share the file); bf16 features are viewed as bf16."""
    if _read_key(entry) != key:
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if with_index and not (entry / "index.json").exists() and entry.is_dir():
            raise ValueError("index.json (the sample keys) is missing: written by an older bigltr")
        index = json.loads((entry / "index.json").read_text()) if with_index else None
        arr = np.load(entry / "features.bin", mmap_mode="c", allow_pickle=False)
        labels = np.load(entry / "labels.npy", allow_pickle=False)
        why = _check_entry(meta, arr, labels, key, index)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, EOFError, AttributeError) as e:  # truncated/garbled .npy or JSON
        why = f"{type(e).__name__}: {' '.join(str(e).split())}"
    if why is not None:
        log.warning(f"feature cache: {entry} is damaged ({why}); rebuilding it")
        _discard(entry)
        return None
    feats = torch.from_numpy(arr)
    if key["dtype"] == "bf16":
        feats = feats.view(torch.bfloat16)
    return feats, torch.from_numpy(labels), index, meta


def trim(store: torch.Tensor, mm, rows: int, directory: Path | None) -> torch.Tensor:
    """The first `rows` samples of a [V, N, D] store. In memory a view; on disk features.bin is rewritten with the
    shorter shape (once, when a build skipped samples), so that its header matches meta.json."""
    if mm is None:
        return store[:, :rows]
    mm.flush()
    path = directory / "features.bin"
    short = np.lib.format.open_memmap(directory / "features.short.bin", mode="w+", dtype=mm.dtype,
                                      shape=(mm.shape[0], rows, mm.shape[2]))
    short[:] = mm[:, :rows]
    short.flush()
    del mm, short
    os.replace(directory / "features.short.bin", path)
    arr = np.load(path, mmap_mode="r+", allow_pickle=False)
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if store.dtype == torch.bfloat16 else t


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """numpy has no bfloat16: its bytes are stored as int16."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()

"""Atomic file writes: a temporary file in the destination folder, fsync, then os.replace.

A reader (or a crash) sees either the old file or the complete new one, never a partial write. Used for every
small output (`_info.json`, reports, results.json, config.yaml, cache metadata, weight_norms.npy); checkpoints use
the same pattern in bigltr.checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> str:
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> str:
    return write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")

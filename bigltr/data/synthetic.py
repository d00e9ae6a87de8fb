"""Small learnable image data in MNIST idx format, for tests and benchmarks where no real data can be fetched.

Each of 10 classes is a bright block at its own position on noise, so a CNN learns it in one epoch; written as
gzipped idx files so the real converter (`tools/make_shards.py idx`) and everything after it run unchanged.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, arr: np.ndarray) -> None:
    magic = 0x0803 if arr.ndim == 3 else 0x0801
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def make_fake_idx(folder: str | Path, per_class_train: int = 60, per_class_test: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), n)
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(len(labels), 28, 28))
        for i, c in enumerate(labels):
            r, k = divmod(int(c), 5)
            images[i, 4 + r * 12: 12 + r * 12, 1 + k * 5: 6 + k * 5] += 180
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder

"""Regenerates the synthetic example plots in docs/img/ (bigltr.plots at 8,142 and 100,000 classes).

The numbers are made up, not results: iNaturalist-2018-like class counts (1,000 down to 2 training images; 842 Many,
4,076 Medium, 3,224 Few at 8,142 classes, the same proportions at 100,000), stage-1 row norms growing with the count,
stage-2 norms held by a MaxNorm ball, per-class accuracies rising with the count. Run from the repository root:
`python docs/img/make_plot_examples.py`; prints the seconds each plot took. The PNGs are stored as 64-colour palette
images to keep the repository small.
"""
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bigltr import plots  # noqa: E402

HERE = Path(__file__).resolve().parent


def synthetic(C: int, epochs: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    m, med = round(C * 842 / 8142), round(C * 4076 / 8142)
    counts = np.r_[np.geomspace(1000, 101, m), np.geomspace(100, 20, med), np.geomspace(19, 2, C - m - med)]
    counts = counts.round().astype(int)[rng.permutation(C)]
    n1 = 0.25 * counts ** 0.3 * rng.lognormal(0, 0.12, C)
    radius = float(np.quantile(n1, 0.05))
    n2 = np.minimum(0.5 * n1 + 0.3 * radius, radius) * rng.uniform(0.92, 1.0, C)
    acc1 = np.clip(100 * np.log(counts) / np.log(1000) + rng.normal(0, 15, C), 0, 100)
    acc2 = np.clip(0.7 * acc1 + 25 + rng.normal(0, 10, C), 0, 100)
    t = np.linspace(0.05, 1, epochs)[:, None]
    per_epoch = n1[None, :] * (1 - np.exp(-3 * t)) * rng.lognormal(0, 0.03, (epochs, C))
    return counts.tolist(), n1, n2, radius, acc1, acc2, per_epoch


def shrink(path: Path) -> None:
    Image.open(path).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> None:
    for C, tag, which in ((8142, "8142", ("norms", "accuracy", "evolution")), (100_000, "100k", ("norms", "accuracy"))):
        counts, n1, n2, radius, acc1, acc2, per_epoch = synthetic(C)
        jobs = {
            "norms": (f"synthetic_{tag}_weight_norms.png", lambda p: plots.plot_weight_norms(
                {"stage 1": n1, "stage 2": n2}, counts, p, radius=radius)),
            "accuracy": (f"synthetic_{tag}_per_class_accuracy.png", lambda p: plots.plot_per_class_accuracy(
                {"stage 1": acc1, "stage 2": acc2}, counts, p)),
            "evolution": (f"synthetic_{tag}_norm_evolution.png", lambda p: plots.plot_norm_evolution(
                per_epoch, counts, p, "stage1: classifier row norms per epoch (synthetic)")),
        }
        for w in which:
            name, make = jobs[w]
            t = time.perf_counter()
            make(HERE / name)
            dt = time.perf_counter() - t
            shrink(HERE / name)
            print(f"{name}: {dt:.2f} s, {(HERE / name).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

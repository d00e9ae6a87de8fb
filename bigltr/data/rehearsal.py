"""``bigltr-rehearsal``: a synthetic SOURCE tree shaped like iNaturalist 2018, ImageNet-LT or Places-LT.

A rehearsal any user can run before spending GPU hours on a new cluster: this command writes a source dataset in
the real on-disk format (iNat's COCO-style ``train2018.json`` / ``val2018.json`` and image folders, or the OLTR
``relative/path label`` text lists with train / val / test), with the real number of classes and the real
long-tailed profile (scaled by ``--scale``), real JPEG files and a handful of the odd files real data has. Then
``bigltr-make-shards``, stage 1 and stage 2 (on several ranks) run on it exactly as on the real data
(docs/cluster.md, "Dry-run a new cluster").

What is written (``--out OUT``):

* ``inat2018``: ``OUT/train2018.json``, ``OUT/val2018.json`` (COCO-style: ``images[{id, file_name, width, height,
  ...}]``, ``annotations[{id, image_id, category_id}]``, ``categories[{id, name, supercategory, ...}]``; category
  ids are NOT contiguous and the categories list is not sorted, so the converter's id -> label mapping is
  exercised), images ``OUT/train_val2018/<supercategory>/<category id>/<32 hex>.jpg`` (``file_name`` is relative to
  OUT, as in the real archive). Train counts from 1,000 down to 2 per class (437,513 in all at 8,142 classes and
  scale 1: 842 classes > 100 images, 4,076 with 20-100, 3,224 < 20 of which 2,000 have 2 or 3 images); the
  official val set (the test split by the iNat convention) has 3 images per class (24,426).
* ``imagenet_lt``: ``OUT/ImageNet_LT_{train,val,test}.txt``; train and val images under
  ``OUT/train/<wnid>/<wnid>_<n>.JPEG`` (ImageNet-LT's val comes from ImageNet's train set), test under
  ``OUT/val/<wnid>/ILSVRC2012_val_<n>.JPEG``. Train 1,280 ... 5 per class (115,846 at 1,000 classes), val 20 and
  test 50 per class.
* ``places_lt``: ``OUT/Places_LT_{train,val,test}.txt`` (lines start with ``/``, as the Places365 lists do),
  images ``OUT/data_256/<letter>/<scene>/<n>.jpg`` (train, val) and ``OUT/val_256/Places365_val_<n>.jpg`` (test).
  Train 4,980 ... 5 per class (62,500 at 365 classes), val 20 and test 100 per class.
* ``OUT/rehearsal.json``: the manifest: options, per-class train counts (in label order, i.e. sorted category id /
  list label), totals, the odd files with the conversion key they get and what the converter must do with them,
  the time taken, and the commands that convert and train on the tree.

Counts. The real profile (at the real class count) is computed first: log n piecewise linear in the class rank
through the commonly cited Many / Medium / Few sizes of the real set (classes with > 100, 20-100, < 20 images: iNat
842 / 4,076 / 3,224, ImageNet-LT 385 / 479 / 136, Places-LT 131 / 163 / 71), from n_max to n_min (iNat: its rarest
2,000 classes at 3 and 2), the head segment bent so that the total is the real one. Not the real per-class counts,
but the same extremes, total and group sizes. ``--classes C`` samples that profile at C evenly spaced ranks;
``--scale s`` keeps ``max(2, round(n * s))`` images of a class (never more than ``n`` when s <= 1); val / test
sizes per class are not scaled (``--val-per-class``, ``--test-per-class``). Counts are given to the classes in a
seeded random order (not by label).

Images (learnable): class c is a stripe pattern between two colours of its own (orientation and frequency of its
own too) plus per-image phase, brightness and Gaussian noise, so a small CNN learns above chance in one epoch.
Odd files (a handful, in the largest classes' training images, listed in the manifest): grayscale JPEGs, CMYK
JPEGs, PNG files named ``.jpg``, an image of another size (all converted / stored as they are), and one truncated
JPEG (the converter skips it and counts it in ``conversion_report.json``).

This module is the command: the options, :func:`generate` (counts to labels, odd-file slots, the tree, the manifest)
and the commands that convert and train on the tree. The counts are :mod:`bigltr.data.rehearsal_profile`'s, the
images :mod:`bigltr.data.rehearsal_images`'s, the lists and folders :mod:`bigltr.data.rehearsal_layout`'s.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Optional

import numpy as np

from .rehearsal_images import ODD_PLAN, _paint_all, _write_file
from .rehearsal_layout import _inat, _oltr
from .rehearsal_profile import SPECS, scaled_counts

__all__ = ["generate", "train_overrides", "next_commands", "main", "MANIFEST_NAME"]

MANIFEST_NAME = "rehearsal.json"


def _odd_slots(counts_by_label: np.ndarray, n_odd: int) -> list[tuple[int, int]]:
    """(label, index of the image within that label's training images) for each odd file: the largest classes,
    one file each (the second image of a class, so its first stays an ordinary one)."""
    order = np.argsort(-counts_by_label, kind="stable")
    slots = []
    for k in range(n_odd):
        lab = int(order[k % len(order)])
        idx = 1 + k // len(order)
        if idx < counts_by_label[lab]:
            slots.append((lab, idx))
    return slots


def generate(dataset: str, out: str, *, classes: Optional[int] = None, scale: float = 1.0, img_size: int = 32,
             seed: int = 0, val_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
             odd_files: bool = True, jpeg_quality: int = 90, overwrite: bool = False, workers: int = 1,
             log=print) -> dict:
    """Write the synthetic source tree of ``dataset`` into ``out``; return the manifest (``out/rehearsal.json``)."""
    if dataset not in SPECS:
        raise ValueError(f"--dataset must be one of {', '.join(SPECS)}, got {dataset!r}")
    spec = SPECS[dataset]
    if img_size < 4:
        raise ValueError(f"--img-size must be >= 4, got {img_size}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must lie in [1, 100], got {jpeg_quality}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out} is a file")
    t0 = time.perf_counter()
    by_rank = scaled_counts(dataset, classes, scale)
    C = len(by_rank)
    rng = np.random.default_rng([seed, 0])
    rank_of_label = rng.permutation(C)  # label l gets the count of rank rank_of_label[l]
    train_counts = by_rank[rank_of_label]
    val_k = spec.val_per_class if val_per_class is None else int(val_per_class)
    test_k = spec.test_per_class if test_per_class is None else int(test_per_class)
    if val_k < 0 or test_k < 1:
        raise ValueError("--val-per-class must be >= 0 and --test-per-class >= 1")
    if dataset == "inat2018" and val_k:
        raise ValueError("inat2018 has no val list: its official val set is the test set (--test-per-class); the "
                         "converter holds a val split out of train (make-shards --val-per-class)")
    if os.path.exists(out) and os.listdir(out):  # after every check of the options: nothing removed for a typo
        if not overwrite:
            raise FileExistsError(f"--out {out} is not empty (pass --overwrite to replace an earlier rehearsal tree)")
        if not os.path.isfile(os.path.join(out, MANIFEST_NAME)):
            raise FileExistsError(f"--overwrite: {out} holds no {MANIFEST_NAME}: not a rehearsal tree, left alone")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    odd = _odd_slots(train_counts, len(ODD_PLAN)) if odd_files else []
    odd_at = {slot: kind for slot, (kind, _) in zip(odd, ODD_PLAN)}  # (label, train image index) -> kind
    odd_rule = {kind: rule for kind, rule in ODD_PLAN}
    layout = _inat if dataset == "inat2018" else _oltr
    info, units = layout(out, C, train_counts, val_k, test_k, seed, odd_at, img_size, dataset)
    t_layout = time.perf_counter() - t0
    files, nbytes = _paint_all(units, out, C, img_size, seed, jpeg_quality, max(1, int(workers)))
    seconds = time.perf_counter() - t0
    odd_list = [{**o, "expected": odd_rule[o["kind"]]} for o in info.pop("odd")]
    manifest = {
        "rehearsal": dataset, "generator": "bigltr-rehearsal", "seed": seed, "scale": scale, "img_size": img_size,
        "num_classes": C, "real_num_classes": spec.classes, "jpeg_quality": jpeg_quality,
        "layout": info["layout"],
        "images": {"train": int(train_counts.sum()), **info["eval_totals"], "files": files, "bytes": nbytes},
        "per_class": {"train_max": int(train_counts.max()), "train_min": int(train_counts.min()),
                      "val": val_k, "test": test_k,
                      "train_2_or_3": int(((train_counts >= 2) & (train_counts <= 3)).sum())},
        "class_counts": train_counts.tolist(),  # by label: sorted category id (inat) / list label (OLTR)
        "odd_files": odd_list,
        "seconds": round(seconds, 2), "seconds_lists": round(t_layout, 2), "workers": max(1, int(workers)),
        "next": next_commands(dataset, out, scale, img_size),
    }
    _write_file(os.path.join(out, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
    log(f"bigltr-rehearsal: {dataset}, {C} classes, {manifest['images']['train']} train images "
        f"({manifest['per_class']['train_max']} ... {manifest['per_class']['train_min']} per class), "
        + ", ".join(f"{k} {v}" for k, v in info["eval_totals"].items())
        + f", {len(odd_list)} odd file(s); {files} files, {nbytes / 2**20:.1f} MiB in {seconds:.1f} s "
          f"-> {out}")
    return manifest


# ----------------------------------------------------------------------------------------------- commands
def train_overrides(shards: str, scale: float, img_size: int) -> dict:
    """Overrides of a benchmark recipe for a one-epoch dry run on a rehearsal tree: a tiny timm model, the tree's
    image size, and Many / Medium / Few thresholds scaled with the counts (at least 3 / 5: every class has >= 2
    images, so all three groups stay non-empty)."""
    few = max(3, round(20 * scale))
    many = max(few + 2, round(100 * scale))
    return {"data.root": shards, "data.img_size": img_size, "model.name": "test_resnet", "data.train_aug": "none",
            "data.num_workers": 1, "data.many_thr": many, "data.few_thr": few, "stage1.epochs": 1,
            "stage2.epochs": 1, "stage1.batch_size": 64, "stage1.lr": 0.2, "stage2.batch_size": 256,
            "stage1.amp": "none"}


def next_commands(dataset: str, out: str, scale: float, img_size: int) -> dict:
    """The conversion and training commands for this tree (docs/cluster.md, "Dry-run a new cluster")."""
    out = os.path.abspath(out)  # every node of a job must find the files: no path relative to this shell
    shards = out.rstrip(os.sep) + "_shards"
    if dataset == "inat2018":
        convert = (f"bigltr-make-shards inat --src {out} --train-json {out}/train2018.json "
                   f"--val-json {out}/val2018.json --out {shards}")
    else:
        p = "ImageNet_LT" if dataset == "imagenet_lt" else "Places_LT"
        convert = (f"bigltr-make-shards list --src {out} --train-list {out}/{p}_train.txt "
                   f"--val-list {out}/{p}_val.txt --test-list {out}/{p}_test.txt --out {shards}")
    overrides = " ".join(f"{k}={v}" for k, v in train_overrides(shards, scale, img_size).items())
    return {"convert": convert, "train_overrides": overrides,
            "stage1": f"python -m bigltr.train recipe={SPECS[dataset].recipe} out=runs/rehearsal stage=1 {overrides}",
            "stage2": (f"torchrun --standalone --nproc_per_node 2 -m bigltr.train recipe={SPECS[dataset].recipe} "
                       f"out=runs/rehearsal stage=2 dist.world_size=2 {overrides}")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigltr-rehearsal",
                                description="Write a synthetic source tree shaped like iNaturalist 2018 (COCO-style "
                                            "JSON), ImageNet-LT or Places-LT (OLTR lists): the real class count and "
                                            "long-tailed profile (scaled), learnable JPEGs and a few odd files, for "
                                            "a dry run of conversion and training (docs/cluster.md, 'Dry-run a new "
                                            "cluster').",
                                epilog="Then: the 'next' commands in OUT/rehearsal.json, or docs/cluster.md "
                                       "('Dry-run a new cluster').")
    p.add_argument("--dataset", choices=tuple(SPECS), default="inat2018", help="which source to imitate "
                                                                               "(default inat2018)")
    p.add_argument("--out", required=True, help="folder to write the source tree into (must be empty or absent)")
    p.add_argument("--classes", type=int, default=None,
                   help="number of classes (default: the real count, 8142 / 1000 / 365)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="fraction of each class's training images: max(2, round(n * scale)) (default 1: the real "
                        "437,513 / 115,846 / 62,500)")
    p.add_argument("--img-size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of counts order, ids, patterns and noise (default 0)")
    p.add_argument("--val-per-class", type=int, default=None,
                   help="val list images per class (ImageNet-LT / Places-LT; default 20; inat2018 has none)")
    p.add_argument("--test-per-class", type=int, default=None,
                   help="test images per class (default: 3 iNat val2018.json, 50 ImageNet-LT, 100 Places-LT)")
    p.add_argument("--no-odd-files", dest="odd_files", action="store_false",
                   help="no grayscale / CMYK / PNG-named-.jpg / other-size / truncated files")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes that draw, encode and write the images (default: min(4, cores)); the files do "
                        "not depend on it")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier rehearsal tree in --out")
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return generate(args.dataset, args.out, classes=args.classes, scale=args.scale, img_size=args.img_size,
                        seed=args.seed, val_per_class=args.val_per_class, test_per_class=args.test_per_class,
                        odd_files=args.odd_files, jpeg_quality=args.jpeg_quality, overwrite=args.overwrite,
                        workers=args.workers)
    except (ValueError, FileExistsError) as e:
        raise SystemExit(f"bigltr-rehearsal: error: {e}") from e


def console_main() -> int:
    m = main()
    nxt = m["next"]
    print("next:\n  " + nxt["convert"] + "\n  " + nxt["stage1"] + "\n  " + nxt["stage2"], file=sys.stdout)
    return 0


if __name__ == "__main__":
    console_main()

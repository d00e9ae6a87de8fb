"""bigltr-rehearsal (bigltr/data/rehearsal.py): the dry run of docs/cluster.md, "Dry-run a new cluster", at
iNaturalist 2018's real class count, CI-sized.

One chain, through the real entry points: generate an iNat-shaped source tree (8,142 classes, non-contiguous
category ids, 2-image classes, odd files), convert it with `bigltr-make-shards inat`, stage 1 for one epoch in this
process, stage 2 on 2 gloo ranks in one torchrun launch, then LWS on class-balanced sampling of the cached features
on 2 ranks (the cRT/LWS path at 8,142 classes). A second, seconds-long test checks the OLTR layouts
(ImageNet-LT, Places-LT) through `bigltr-make-shards list` and the real profiles.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from bigltr.data.rehearsal import main as rehearsal_main, train_overrides
from bigltr.data.rehearsal_profile import SPECS, real_profile
from bigltr.data.sources.cli import main as make_shards_main

ROOT = Path(__file__).resolve().parents[1]
C = 8142
SCALE = 0.03
# The overrides of recipes/inat2018.yaml that the manifest and docs/cluster.md give for 8x8 images and one epoch:
# test_resnet, the counts' groups (2 ... 30 images: Many > 5, Medium 3-5, Few < 3, all three non-empty).
OVERRIDES = [f"{k}={v}" for k, v in train_overrides("", SCALE, 8).items() if k != "data.root"] + ["log_every=50"]


def _members(shards: Path, info: dict) -> dict:
    """key -> (split, extension, bytes) over every shard of every split (tarfile, no webdataset)."""
    out = {}
    for split, entry in info["splits"].items():
        for fname in entry["filenames"]:
            with tarfile.open(shards / fname) as tf:
                for m in tf.getmembers():
                    key, ext = m.name.rsplit(".", 1)
                    if ext != "cls":
                        out[key] = (split, ext, tf.extractfile(m).read())
    return out


def test_inat_rehearsal_8142_classes_converts_and_trains_both_stages_on_2_ranks(tmp_path):
    t0 = time.perf_counter()
    src, shards, run = tmp_path / "inat", tmp_path / "inat_shards", tmp_path / "run"

    # 1. generate: iNat's shape at its real class count, tiny images, 3% of the images (min 2 per class), 1 test
    m = rehearsal_main(["--dataset", "inat2018", "--out", str(src), "--scale", str(SCALE), "--img-size", "8",
                        "--test-per-class", "1", "--workers", "1"])
    t_gen = time.perf_counter() - t0
    assert "data.many_thr=5 data.few_thr=3" in m["next"]["stage2"]
    counts = np.asarray(m["class_counts"])
    assert m["num_classes"] == C and len(counts) == C and counts.min() == 2 and counts.max() == 30
    assert m["per_class"]["train_2_or_3"] > 5000  # thousands of 2- and 3-image classes
    train_json = json.loads((src / "train2018.json").read_text())
    val_json = json.loads((src / "val2018.json").read_text())
    ids = [c["id"] for c in train_json["categories"]]
    assert len(set(ids)) == C and max(ids) > C and ids != sorted(ids)  # non-contiguous, listed unsorted
    assert len(train_json["images"]) == len(train_json["annotations"]) == counts.sum() == m["images"]["train"]
    assert Counter(a["category_id"] for a in val_json["annotations"]) == Counter({i: 1 for i in ids})
    with Image.open(src / train_json["images"][0]["file_name"]) as im:
        assert im.format == "JPEG" and im.size == (8, 8)
    odd = {o["kind"]: o for o in m["odd_files"]}  # one of each kind is enough to check
    assert set(odd) == {"grayscale_jpeg", "cmyk_jpeg", "png_named_jpg", "other_size", "truncated_jpeg"}
    with Image.open(src / odd["cmyk_jpeg"]["file"]) as im:
        assert (im.format, im.mode) == ("JPEG", "CMYK")
    with Image.open(src / odd["png_named_jpg"]["file"]) as im:
        assert im.format == "PNG" and odd["png_named_jpg"]["file"].endswith(".jpg")

    # 2. convert with the real converter and its defaults (the hold-out policy is the converter's)
    info = make_shards_main(["inat", "--src", str(src), "--train-json", str(src / "train2018.json"),
                             "--val-json", str(src / "val2018.json"), "--out", str(shards), "--workers", "1",
                             "--no-progress"])
    t_conv = time.perf_counter() - t0 - t_gen
    assert info["num_classes"] == C and len(info["classes"]) == C and len(info["class_counts"]) == C
    assert info["category_ids"] == sorted(ids)
    assert min(info["class_counts"]) >= 1  # every class keeps a training image
    report = json.loads((shards / "conversion_report.json").read_text())
    truncated = [o for o in m["odd_files"] if o["kind"] == "truncated_jpeg"]
    assert sorted(s["key"] for s in report["skipped"]) == sorted(o["key"] for o in truncated)
    assert all("truncated" in s["error"] for s in report["skipped"])
    assert sum(r["skipped"] for r in report["splits"].values()) == len(truncated) == 1
    n_written = sum(e["num_samples"] for e in info["splits"].values())
    assert n_written == m["images"]["train"] + m["images"]["test (val2018.json)"] - 1
    assert info["splits"]["test"]["num_samples"] == C
    try:  # the check docs/cluster.md asks for after a copy: every shard as recorded
        make_shards_main(["verify", str(shards)])
    except SystemExit as e:
        assert e.code == 0
    members = _members(shards, info)
    for o in m["odd_files"]:  # converted: stored under the key the manifest names, as documented there
        if o["kind"] == "truncated_jpeg":
            assert o["key"] not in members
            continue
        split, ext, data = members[o["key"]]
        assert ext == ("png" if o["kind"] == "png_named_jpg" else "jpg"), o
        assert data == (src / o["file"]).read_bytes()  # --format keep: the original bytes
        assert o["expected"].startswith("converted")

    # 3. stage 1, one epoch, in this process (recipe inat2018 + overrides)
    from bigltr.train import main as train_main

    assert train_main(["recipe=inat2018", f"data.root={shards}", f"out={run}", "stage=1", *OVERRIDES]) == 0
    t_s1 = time.perf_counter() - t0 - t_gen - t_conv

    # 4. stage 2 on 2 gloo ranks, one torchrun launch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "bigltr.train", "recipe=inat2018", f"data.root={shards}", f"out={run}", "stage=2",
                        "dist.world_size=2", *OVERRIDES], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"STDOUT\n{r.stdout[-3000:]}\nSTDERR\n{r.stderr[-5000:]}"
    assert "2 process(es) (ddp, gloo)" in r.stderr and "stage2 epoch 1/1" in r.stderr
    t_s2 = time.perf_counter() - t0 - t_gen - t_conv - t_s1

    res = json.loads((run / "results.json").read_text())
    assert res["world_size"] == 2 and len(res["class_counts"]) == C
    for stage in ("stage1", "stage2"):
        test = res[stage]["test"]
        assert test["num_samples"] == C
        for g in ("many", "medium", "few"):
            assert g in test and test[g] is not None, (stage, g)
    assert (run / "stage2" / "best.pt").is_file() and (run / "table.md").is_file()
    # learnable: the Many classes (6-30 images) are learned far above chance (1/8142 = 0.012%) in one epoch
    assert res["stage1"]["test"]["many"] > 1.0, res["stage1"]["test"]

    # 5. the cRT/LWS path at this shape: LWS scales on class-balanced sampling of the cached features, 2 gloo ranks
    # (each rank gathers every rank's rows once: one global sequence over 8,142 classes, most of them 2-image)
    lws_run = tmp_path / "run_lws"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "bigltr.train", "recipe=inat2018", f"data.root={shards}", f"out={lws_run}", "stage=2",
                        "dist.world_size=2", f"stage1_checkpoint={run / 'stage1' / 'best.pt'}", *OVERRIDES,
                        "stage2.classifier=lws", "stage2.loss=ce", "stage2.sampler=class_balanced",
                        "stage2.maxnorm.when=off", "stage2.weight_decay=0", "stage2.lr=1.0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"STDOUT\n{r.stdout[-3000:]}\nSTDERR\n{r.stderr[-5000:]}"
    assert "stage2 epoch 1/1" in r.stderr
    import torch

    w1 = torch.load(run / "stage1" / "best.pt", weights_only=True)["model"]["classifier.weight"].double()
    w2 = torch.load(lws_run / "stage2" / "best.pt", weights_only=True)["model"]["classifier.weight"].double()
    assert w2.shape == w1.shape == (C, w1.shape[1])
    s = (w2 * w1).sum(1) / (w1 * w1).sum(1)  # LWS: each folded row is its stage-1 row times one scale
    torch.testing.assert_close(w2, s[:, None] * w1, rtol=1e-5, atol=1e-7)
    assert (s - 1).abs().max() > 1e-4  # the scales trained
    t_lws = time.perf_counter() - t0 - t_gen - t_conv - t_s1 - t_s2

    # 6. class-balanced draws of the images themselves (stage2.features=online: BalancedShardLoader) at this shape,
    # rank 0 and 1 of 2 (the loader needs no process group): one epoch of the train split over both ranks draws
    # every one of the 8,142 classes floor(T/C) or ceil(T/C) times, the ranks' draws interleaved are the 1-process
    # sequence, and the first batches each rank yields are those draws, read from the tars
    import itertools

    from bigltr.data.balanced_stream import BalancedShardLoader
    from bigltr.data.transforms import build_transform

    tf = build_transform(img_size=8, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3, train=True, aug="cifar")
    kw = {"batch_size": 256, "transform": tf, "seed": 4, "num_workers": 0, "index_dir": str(tmp_path / "index")}
    ranks = [BalancedShardLoader(shards, "train", rank=r, world_size=2, **kw) for r in (0, 1)]
    one = BalancedShardLoader(shards, "train", **kw)
    assert one.num_samples == info["splits"]["train"]["num_samples"] and one.sampler.num_classes == C
    keys, labels = one.sample_keys, one.sample_labels
    draws = [ld.draws(0)[1] for ld in ranks]
    assert len(draws[0]) == len(draws[1]) == len(ranks[0]) * 256
    inter = np.stack(draws, 1).reshape(-1)
    t = len(inter)
    assert (inter == one.sampler.global_indices(0).numpy()[:t]).all()
    counts = np.bincount(labels[inter], minlength=C)
    assert counts.min() >= t // C and counts.max() <= -(-t // C) and (counts > 0).all()
    for ld, d in zip(ranks, draws):
        batches = list(itertools.islice(iter(ld), 2))
        assert [k for _, _, ks in batches for k in ks] == [keys[i] for i in d[:512]]
        assert all(members[keys[i]][0] == "train" for i in d[:512])
        assert torch.cat([ys for _, ys, _ in batches]).tolist() == labels[d[:512]].tolist()
    t_bal = time.perf_counter() - t0 - t_gen - t_conv - t_s1 - t_s2 - t_lws
    print(f"\nrehearsal timings: generate {t_gen:.1f} s, convert {t_conv:.1f} s, stage 1 {t_s1:.1f} s, "
          f"stage 2 (2 ranks) {t_s2:.1f} s, LWS class-balanced (2 ranks) {t_lws:.1f} s, balanced image stream "
          f"(index, an epoch's {t} draws, 2 batches read per rank) {t_bal:.1f} s; "
          f"stage 1 test many {res['stage1']['test']['many']:.2f}%")


def test_oltr_rehearsals_convert_with_the_list_converter(tmp_path):
    """ImageNet-LT and Places-LT trees (fewer classes, small scale) convert with `bigltr-make-shards list`; the real
    profiles have the real totals, extremes and Many / Medium / Few sizes."""
    for name, spec in SPECS.items():
        prof = real_profile(name)
        assert len(prof) == spec.classes and prof.sum() == spec.total
        assert (prof[0], prof[-1]) == (spec.n_max, spec.n_min) and np.all(np.diff(prof) <= 0)
        groups = ((prof > 100).sum(), ((prof >= 20) & (prof <= 100)).sum(), (prof < 20).sum())
        assert groups == spec.groups, name
    assert (real_profile("inat2018") <= 3).sum() == 2000
    for name, prefix in (("imagenet_lt", "ImageNet_LT"), ("places_lt", "Places_LT")):
        src, shards = tmp_path / name, tmp_path / f"{name}_shards"
        m = rehearsal_main(["--dataset", name, "--out", str(src), "--classes", "40", "--scale", "0.02",
                            "--img-size", "8", "--val-per-class", "2", "--test-per-class", "3", "--workers", "1"])
        counts = m["class_counts"]
        assert len(counts) == 40 and min(counts) == 2
        lines = (src / f"{prefix}_train.txt").read_text().splitlines()
        assert len(lines) == sum(counts) and all(len(ln.rsplit(" ", 1)) == 2 for ln in lines)
        assert lines[0].startswith("/" if name == "places_lt" else "train/")
        info = make_shards_main(["list", "--src", str(src), "--train-list", str(src / f"{prefix}_train.txt"),
                                 "--val-list", str(src / f"{prefix}_val.txt"), "--test-list",
                                 str(src / f"{prefix}_test.txt"), "--out", str(shards), "--workers", "1",
                                 "--no-progress"])
        report = json.loads((shards / "conversion_report.json").read_text())
        assert [s["key"] for s in report["skipped"]] == [o["key"] for o in m["odd_files"]
                                                          if o["kind"] == "truncated_jpeg"]
        assert info["num_classes"] == 40
        assert info["splits"]["val"]["num_samples"] == 80 and info["splits"]["test"]["num_samples"] == 120
        assert sum(info["class_counts"]) == sum(counts) - 1  # the truncated JPEG

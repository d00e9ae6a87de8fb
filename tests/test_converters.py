"""The converters (bigltr.data.sources: imagefolder / list / inat / cifar / idx) on tiny data written in each real
on-disk format.

Everything runs in-process (``bigltr.data.sources.cli.main([...])``, what ``tools/make_shards.py`` and the
``bigltr-make-shards`` console script run); images are real JPEG/PNG files written with PIL, CIFAR files are
pickles with the real files' keys. One conversion per fixture where possible (the file runs in seconds).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bigltr.data import longtail_counts, read_info
from bigltr.data.sources.cli import main as make_shards_main

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "eel"]
TRAIN_COUNTS, VAL_COUNTS, TEST_COUNTS = [9, 5, 2], [2, 2, 2], [3, 3, 3]


def _img(rng, i):
    h, w = 18 + i % 5, 24 + i % 7  # varied sizes, so --resize has work to do
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _save(rng, path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _img(rng, i)
    if path.suffix == ".png":
        img.save(path)
    else:
        img.save(path, quality=90)


def _digest(root) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).iterdir())}


def _read_split(root, info, split) -> dict:
    """key -> (label, extension, bytes) read with tarfile, independent of webdataset."""
    out = {}
    for fname, n in zip(info["splits"][split]["filenames"], info["splits"][split]["shard_lengths"]):
        with tarfile.open(os.path.join(root, fname)) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        keys = sorted({name.rsplit(".", 1)[0] for name in members})
        assert len(keys) == n
        for k in keys:
            ext = next(e for e in ("jpg", "png", "webp") if f"{k}.{e}" in members)
            out[k] = (int(members[f"{k}.cls"]), ext, members[f"{k}.{ext}"])
    return out


def _split_counts(root, info, split, C=3):
    c = Counter(lab for lab, _, _ in _read_split(root, info, split).values())
    return [c[i] for i in range(C)]


def _run(*argv):
    return make_shards_main([*map(str, argv), "--no-progress"])


# ----------------------------------------------------------------------------------------------- ImageFolder
@pytest.fixture(scope="module")
def folder_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder") / "src"
    rng = np.random.default_rng(0)
    for split, counts in (("train", TRAIN_COUNTS), ("val", VAL_COUNTS), ("test", TEST_COUNTS)):
        for c, n in zip(CLASSES, counts):
            for i in range(n):
                name = f"{'sub/' if i == 1 else ''}img{i:02d}.{'png' if i % 3 == 2 else 'jpg'}"
                _save(rng, root / split / c / name, i)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored, like torchvision
    return root


@pytest.fixture(scope="module")
def folder_out(folder_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("folder_out") / "lt"
    _run("imagefolder", "--src", folder_src, "--out", out, "--workers", 1, "--maxcount", 4)
    return out


def test_imagefolder_content(folder_src, folder_out):
    info = read_info(folder_out)
    assert info["classes"] == CLASSES and info["class_counts"] == TRAIN_COUNTS
    for split, counts in (("train", TRAIN_COUNTS), ("val", VAL_COUNTS), ("test", TEST_COUNTS)):
        assert _split_counts(folder_out, info, split) == counts
        e = info["splits"][split]
        assert [sum(h) for h in e["class_hist"]] == e["shard_lengths"] and max(e["shard_lengths"]) <= 4
        assert e["checksums"] == [hashlib.sha256((folder_out / f).read_bytes()).hexdigest() for f in e["filenames"]]
    # --format keep: the original files' bytes, under their own extension (png stays png)
    train = _read_split(folder_out, info, "train")
    src_files = sorted(p for p in (folder_src / "train").rglob("*") if p.suffix in (".jpg", ".png"))
    assert sorted(b for _, _, b in train.values()) == sorted(p.read_bytes() for p in src_files)
    assert Counter(ext for _, ext, _ in train.values()) == Counter(p.suffix[1:] for p in src_files)
    report = json.loads((folder_out / "conversion_report.json").read_text())
    assert report["status"] == "ok" and report["skipped"] == []
    assert report["splits"]["train"] == {"listed": 16, "written": 16, "skipped": 0}
    assert info["source"]["ignored_non_image_files"] == 1


def test_imagefolder_errors(folder_src, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(folder_src, src)
    _save(np.random.default_rng(1), src / "test" / "fox" / "a.jpg", 0)
    with pytest.raises(SystemExit, match=r"test/fox: class folder 'fox' of split 'test' is not a class of the train"):
        _run("imagefolder", "--src", src, "--out", tmp_path / "o1", "--workers", 1)
    with pytest.raises(SystemExit, match="no train/ folder"):
        _run("imagefolder", "--src", src / "test", "--out", tmp_path / "o2", "--workers", 1)
    assert not (tmp_path / "o1" / "_info.json").exists()


def test_bad_images_skipped_reported_and_limited(folder_src, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(folder_src, src)
    (src / "train" / "dog" / "zz_garbage.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    good = (src / "train" / "cat" / "img00.jpg").read_bytes()
    (src / "train" / "cat" / "zz_truncated.jpg").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    # 2 of 18 training images are bad: over the default limit (1%) -> fails, report lists them, no _info.json
    with pytest.raises(SystemExit,
                       match=r"split 'train': 1 of 18 images could not be decoded.*--max-skip-fraction 0.01") as e:
        _run("imagefolder", "--src", src, "--out", out, "--workers", 1)
    assert e.value.code != 0
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["status"] == "failed" and "max-skip-fraction" in report["message"]
    assert not (out / "_info.json").exists() and not [p for p in os.listdir(out) if p.endswith(".tmp")]
    # within the limit: skipped, counted, listed with their error; conversion completes
    info = _run("imagefolder", "--src", src, "--out", out, "--workers", 2, "--max-skip-fraction", 0.2, "--overwrite")
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["status"] == "ok" and report["splits"]["train"] == {"listed": 18, "written": 16, "skipped": 2}
    assert sorted(Path(s["file"]).name for s in report["skipped"]) == ["zz_garbage.jpg", "zz_truncated.jpg"]
    assert all(s["origin"].startswith("train/") and s["error"] for s in report["skipped"])
    assert any("truncated" in s["error"].lower() for s in report["skipped"])
    assert info["class_counts"] == TRAIN_COUNTS and info["source"]["skipped"]["train"] == 2


def test_deterministic_across_workers_and_reruns(folder_src, tmp_path):
    args = ["imagefolder", "--src", folder_src, "--maxcount", 100, "--maxsize", 3000, "--resize", 12,
            "--format", "jpg", "--jpeg-quality", 80, "--name", "det", "--seed", 5]
    _run(*args, "--out", tmp_path / "w1", "--workers", 1)
    _run(*args, "--out", tmp_path / "w2", "--workers", 2)
    d1 = _digest(tmp_path / "w1")
    assert d1 == _digest(tmp_path / "w2")  # byte-identical shards, _info.json and report
    with pytest.raises(SystemExit, match="not empty.*--overwrite"):
        _run(*args, "--out", tmp_path / "w1", "--workers", 1)
    (tmp_path / "w1" / "train-000077.tar").write_bytes(b"stale")
    _run(*args, "--out", tmp_path / "w1", "--workers", 1, "--overwrite")
    assert _digest(tmp_path / "w1") == d1
    info = read_info(tmp_path / "w1")
    tr = info["splits"]["train"]
    assert len(tr["filenames"]) > 2 and max(tr["shard_lengths"]) < 16  # --maxsize cut the shards
    for lab, ext, data in _read_split(tmp_path / "w1", info, "train").values():
        img = Image.open(io.BytesIO(data))
        assert ext == "jpg" and img.format == "JPEG" and min(img.size) == 12  # shorter side resized to 12


# ----------------------------------------------------------------------------------------------- OLTR lists
@pytest.fixture(scope="module")
def list_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("lists")
    rng = np.random.default_rng(2)
    lines = {}
    for split, counts in (("train", [8, 4, 0, 2]), ("val", [1, 1, 1, 1]), ("test", [2, 2, 2, 2])):
        lines[split] = []
        for c, n in enumerate(counts):
            for i in range(n):
                rel = f"{split}/n0{c}/n0{c}_{i}.JPEG"
                _save(rng, root / "images" / rel, i)
                lead = "/" if (split, c, i) == ("train", 0, 0) else ""  # some redistributed lists start with /
                lines[split].append(f"{lead}{rel} {c}")
        rng.shuffle(lines[split])
        (root / f"LT_{split}.txt").write_text("\n".join(lines[split]) + "\n")
    (root / "classes.txt").write_text("tench\ngoldfish\nshark\nhen\n")
    return root


def test_list_content_and_holdout(list_src, tmp_path):
    # --num-classes 4: class 2 has no training image (warned, kept); test list given, no val list -> hold-out
    info = _run("list", "--src", list_src / "images", "--train-list", list_src / "LT_train.txt",
                "--test-list", list_src / "LT_test.txt", "--classes-file", list_src / "classes.txt",
                "--val-per-class", 2, "--val-max-fraction", 0.5, "--val-min-count", 2, "--out", tmp_path / "a",
                "--workers", 1)
    assert info["classes"] == ["tench", "goldfish", "shark", "hen"]
    # held out min(2, floor(0.5 n)) per class of n >= 2: 2, 2, 0, 1
    assert info["class_counts"] == [6, 2, 0, 1]
    assert _split_counts(tmp_path / "a", info, "val", 4) == [2, 2, 0, 1]
    assert info["source"]["source_train_class_counts"] == info["official_train_counts"] == [8, 4, 0, 2]
    assert info["official_train_splits"] == ["train", "val"]
    assert _split_counts(tmp_path / "a", info, "test", 4) == [2, 2, 2, 2]
    val = _read_split(tmp_path / "a", info, "val")
    assert all(k.startswith("train_") for k in val)  # held-out images keep their train_<line> key
    assert not set(val) & set(_read_split(tmp_path / "a", info, "train"))
    # with a val list and default class names: C = max train label + 1
    info = _run("list", "--src", list_src / "images", "--train-list", list_src / "LT_train.txt",
                "--val-list", list_src / "LT_val.txt", "--test-list", list_src / "LT_test.txt",
                "--out", tmp_path / "b", "--workers", 1)
    assert info["classes"] == ["0", "1", "2", "3"] and info["class_counts"] == [8, 4, 0, 2]
    assert sorted(info["splits"]) == ["test", "train", "val"] and info["splits"]["val"]["num_samples"] == 4
    assert info["official_train_counts"] == [8, 4, 0, 2] and info["official_train_splits"] == ["train"]
    line = (list_src / "LT_train.txt").read_text().splitlines().index(
        next(ln for ln in (list_src / "LT_train.txt").read_text().splitlines() if ln.endswith(" 3"))) + 1
    assert _read_split(tmp_path / "b", info, "train")[f"train_{line:07d}"][0] == 3


@pytest.mark.parametrize("bad_line, split, message", [
    ("train/n00/n00_0.JPEG", "train", r"LT_train\.txt line 3: expected '<relative/path> <integer label>'"),
    ("train/n00/n00_0.JPEG zero", "train", r"LT_train\.txt line 3: expected"),
    ("val/n00/n00_0.JPEG 7", "val", r"LT_val\.txt line 3: label 7 outside \[0, 4\)"),
    ("val/n00/n00_0.JPEG -1", "val", r"LT_val\.txt line 3: label -1 is negative"),
    ("val/n00/missing.JPEG 0", "val", r"LT_val\.txt line 3: image file .*missing\.JPEG does not exist"),
])
def test_list_errors_name_file_and_line(list_src, tmp_path, bad_line, split, message):
    lists = {}
    for s in ("train", "val"):
        lines = (list_src / f"LT_{s}.txt").read_text().splitlines()
        if s == split:
            lines.insert(2, bad_line)
        lists[s] = tmp_path / f"LT_{s}.txt"
        lists[s].write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=message):
        _run("list", "--src", list_src / "images", "--train-list", lists["train"], "--val-list", lists["val"],
             "--out", tmp_path / "out", "--workers", 1)
    assert not (tmp_path / "out" / "_info.json").exists()


# ----------------------------------------------------------------------------------------------- iNat JSON
INAT_CATS = [42, 3, 7]  # non-contiguous, unsorted: labels follow sorted ids 3 -> 0, 7 -> 1, 42 -> 2
INAT_TRAIN = {3: 6, 7: 3, 42: 1}


@pytest.fixture(scope="module")
def inat_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("inat")
    rng = np.random.default_rng(3)

    def coco(name, per_cat, start_id):
        images, anns, i = [], [], start_id
        for cid in INAT_CATS:
            for j in range(per_cat[cid]):
                rel = f"{name}/Plantae/{cid}/{i:04x}.jpg"
                _save(rng, root / "images" / rel, j)
                images.append({"id": i, "file_name": rel, "width": 1, "height": 1})
                anns.append({"id": 1000 + i, "image_id": i, "category_id": cid})
                i += 1
        return {"info": {}, "images": images, "annotations": anns,
                "categories": [{"id": c, "name": f"species_{c}", "supercategory": "Plantae"} for c in INAT_CATS]}

    (root / "train2018.json").write_text(json.dumps(coco("train_val2018", INAT_TRAIN, 1)))
    (root / "val2018.json").write_text(json.dumps(coco("train_val2018", {3: 2, 7: 2, 42: 2}, 500)))
    return root


def test_inat_content(inat_src, tmp_path):
    info = _run("inat", "--src", inat_src / "images", "--train-json", inat_src / "train2018.json",
                "--val-json", inat_src / "val2018.json", "--val-per-class", 1, "--val-max-fraction", 0.5,
                "--val-min-count", 2, "--out", tmp_path / "o", "--workers", 1)
    assert info["category_ids"] == [3, 7, 42] and info["classes"] == ["species_3", "species_7", "species_42"]
    # iNat convention: val2018 -> test; val held out of train (min(1, floor(0.5 n)) from n >= 2: 1, 1, 0)
    assert info["class_counts"] == [5, 2, 1]
    assert info["source"]["source_train_class_counts"] == info["official_train_counts"] == [6, 3, 1]
    assert _split_counts(tmp_path / "o", info, "test") == [2, 2, 2]
    assert _split_counts(tmp_path / "o", info, "val") == [1, 1, 0]
    test = _read_split(tmp_path / "o", info, "test")
    assert sorted(test) == [f"test_{i:07d}" for i in range(6)]


def test_inat_errors(inat_src, tmp_path):
    val = json.loads((inat_src / "val2018.json").read_text())
    val["annotations"][4]["category_id"] = 99
    (tmp_path / "v1.json").write_text(json.dumps(val))
    with pytest.raises(SystemExit, match=r"v1\.json: annotations\[4\] \(image_id 504\): unknown category_id 99"):
        _run("inat", "--src", inat_src / "images", "--train-json", inat_src / "train2018.json",
             "--val-json", tmp_path / "v1.json", "--out", tmp_path / "o1", "--workers", 1)
    val = json.loads((inat_src / "val2018.json").read_text())
    val["images"][3]["file_name"] = "train_val2018/Plantae/7/nothere.jpg"
    (tmp_path / "v2.json").write_text(json.dumps(val))
    with pytest.raises(SystemExit, match=r"v2\.json images\[3\] \(id 503\): image file .*nothere\.jpg does not exist"):
        _run("inat", "--src", inat_src / "images", "--train-json", inat_src / "train2018.json",
             "--val-json", tmp_path / "v2.json", "--out", tmp_path / "o2", "--workers", 1)
    (tmp_path / "v3.json").write_text('{"images": [')
    with pytest.raises(SystemExit, match=r"v3\.json: not valid JSON"):
        _run("inat", "--src", inat_src / "images", "--train-json", inat_src / "train2018.json",
             "--val-json", tmp_path / "v3.json", "--out", tmp_path / "o3", "--workers", 1)


# ----------------------------------------------------------------------------------------------- hold-out policy
# A tail-shaped iNat set: category id -> listed training images (and how many of them are truncated JPEGs)
TAIL_TRAIN = {5: 2, 9: 3, 11: 12, 20: 25, 31: 52}


def _coco(root: Path, name: str, per_cat: dict, start_id: int, rng, bad: dict | None = None) -> dict:
    """A COCO-style JSON dict whose images are real JPEG files under root/images; ``bad[cid]`` of category cid's
    images (its last ones) are truncated halfway (they exist, but do not decode)."""
    images, anns, i = [], [], start_id
    for cid, n in per_cat.items():
        for j in range(n):
            rel = f"{name}/Aves/{cid}/{i:05d}.jpg"
            _save(rng, root / "images" / rel, j)
            if j >= n - (bad or {}).get(cid, 0):
                data = (root / "images" / rel).read_bytes()
                (root / "images" / rel).write_bytes(data[: len(data) // 2])
            images.append({"id": i, "file_name": rel})
            anns.append({"id": 10000 + i, "image_id": i, "category_id": cid})
            i += 1
    return {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"species_{c}"} for c in per_cat]}


@pytest.fixture(scope="module")
def tail_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("tail")
    rng = np.random.default_rng(6)
    (root / "train.json").write_text(json.dumps(_coco(root, "train", TAIL_TRAIN, 1, rng)))
    (root / "val.json").write_text(json.dumps(_coco(root, "val", {c: 1 for c in TAIL_TRAIN}, 5000, rng)))
    return root


def _split_hist(info, split):
    e = info["splits"].get(split)
    return [sum(h[c] for h in e["class_hist"]) for c in range(info["num_classes"])] if e else [0] * info["num_classes"]


def test_holdout_never_starves_the_tail_and_groups_use_official_counts(tail_src, tmp_path, capsys):
    from bigltr.metrics import class_groups, group_counts

    out = tmp_path / "o"
    info = _run("inat", "--src", tail_src / "images", "--train-json", tail_src / "train.json",
                "--val-json", tail_src / "val.json", "--out", out, "--workers", 2)
    official = list(TAIL_TRAIN.values())  # categories 5, 9, 11, 20, 31 -> labels 0..4
    assert info["official_train_counts"] == official and info["official_train_splits"] == ["train", "val"]
    # default policy: nothing from a class under 10 images, at most floor(0.1 n) and at most 5 of any class
    val = [0, 0, 1, 2, 5]
    assert _split_counts(out, info, "val", 5) == _split_hist(info, "val") == val
    assert info["class_counts"] == _split_counts(out, info, "train", 5) == [n - v for n, v in zip(official, val)]
    assert [a + b for a, b in zip(info["class_counts"], _split_hist(info, "val"))] == official  # the refit set
    train, held = _read_split(out, info, "train"), _read_split(out, info, "val")
    assert not set(train) & set(held) and all(k.startswith("train_") for k in held)
    assert _split_counts(out, info, "test", 5) == [1] * 5
    summary = {"per_class": 5, "max_fraction": 0.1, "min_count": 10, "seed": 0, "images": 8, "classes": 3,
               "num_classes": 5, "decodable_train_images": 94, "classes_under_min_count": 2}
    assert {k: info["source"]["holdout"][k] for k in summary} == summary
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["holdout"]["images"] == 8
    assert report["splits"]["train"] == {"listed": 94, "written": 86, "skipped": 0, "held_out": 8}
    assert report["splits"]["val"]["written"] == 8
    assert "val held out of train: 8 image(s) from 3 of 5 classes (8.5% of 94" in capsys.readouterr().out
    # groups from the official counts: the 52-image class is Many (> 50) though 47 of its images are trained on
    assert group_counts(info) == official
    assert class_groups(group_counts(info), 50, 20) == {"many": [4], "medium": [3], "few": [0, 1, 2]}
    assert class_groups(info["class_counts"], 50, 20)["many"] == []  # what the groups were computed from before
    assert read_info(out)["official_train_counts"] == official  # validated on read
    # the decode-first path is deterministic too: refused on a non-empty --out, byte-identical with 1 worker
    digest = _digest(out)
    args = ["inat", "--src", tail_src / "images", "--train-json", tail_src / "train.json", "--val-json",
            tail_src / "val.json", "--out", out, "--workers", 1]
    with pytest.raises(SystemExit, match="not empty.*--overwrite"):
        _run(*args)
    _run(*args, "--overwrite")
    assert _digest(out) == digest and not [p for p in os.listdir(out) if p.startswith(".")]


def test_val_per_class_zero_trains_on_the_whole_official_set(tail_src, tmp_path, capsys):
    info = _run("inat", "--src", tail_src / "images", "--train-json", tail_src / "train.json",
                "--val-json", tail_src / "val.json", "--val-per-class", 0, "--out", tmp_path / "o", "--workers", 1)
    assert sorted(info["splits"]) == ["test", "train"]
    assert info["class_counts"] == info["official_train_counts"] == list(TAIL_TRAIN.values())
    assert info["official_train_splits"] == ["train"] and info["source"]["val_rule"] == "none (--val-per-class 0)"
    assert "val: none (--val-per-class 0)" in capsys.readouterr().out


def test_undecodable_files_are_removed_before_the_holdout(tmp_path):
    rng = np.random.default_rng(7)
    # cat 11: 12 listed, 3 truncated -> 9 decodable: under 10, no val (drawn before decoding it gave 1 of 12)
    # cat 20: 25 listed, 4 truncated -> 21 decodable: floor(0.1 * 21) = 2 val (from 25 it was also 2, but could
    #         land on a truncated file); cat 31: 52 listed, 3 truncated -> 49: 4 val (from 52: 5)
    per_cat, bad = {11: 12, 20: 25, 31: 52}, {11: 3, 20: 4, 31: 3}
    (tmp_path / "train.json").write_text(json.dumps(_coco(tmp_path, "train", per_cat, 1, rng, bad)))
    out = tmp_path / "o"
    info = _run("inat", "--src", tmp_path / "images", "--train-json", tmp_path / "train.json", "--out", out,
                "--workers", 2, "--max-skip-fraction", 0.2)
    assert info["official_train_counts"] == [12, 25, 52]
    assert _split_hist(info, "val") == [0, 2, 4] and info["class_counts"] == [9, 19, 45]
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["splits"]["train"] == {"listed": 89, "written": 73, "skipped": 10, "held_out": 6}
    assert report["splits"]["val"] == {"listed": 6, "written": 6, "skipped": 0, "held_out_of": "train"}
    skipped = {s["key"] for s in report["skipped"]}
    assert len(skipped) == 10 and all(s["split"] == "train" for s in report["skipped"])
    assert not skipped & (set(_read_split(out, info, "train")) | set(_read_split(out, info, "val")))
    for _, ext, data in _read_split(out, info, "val").values():
        Image.open(io.BytesIO(data)).load()  # every val image decodes


def test_class_emptied_by_undecodable_files_is_an_error(tmp_path, capsys):
    rng = np.random.default_rng(8)
    per_cat, bad = {3: 30, 77: 2, 90: 5}, {77: 2}
    (tmp_path / "train.json").write_text(json.dumps(_coco(tmp_path, "train", per_cat, 1, rng, bad)))
    (tmp_path / "val.json").write_text(json.dumps(_coco(tmp_path, "val", {3: 2, 77: 2, 90: 2}, 900, rng)))
    (tmp_path / "test.json").write_text(json.dumps(_coco(tmp_path, "test", {3: 1, 77: 1, 90: 1}, 950, rng)))
    msg = (r"class 1 \('species_77', category_id 77\): all 2 of its listed training image\(s\) could not be "
           r"decoded \(last: .*train\.json images\[3[01]\] \(id 3[12]\): .*[Tt]runcated")
    common = ["inat", "--src", tmp_path / "images", "--train-json", tmp_path / "train.json", "--workers", 1,
              "--max-skip-fraction", 0.5]
    for extra in ([], ["--test-json", tmp_path / "test.json"]):  # hold-out path, then val given (no hold-out)
        out = tmp_path / f"o{len(extra)}"
        with pytest.raises(SystemExit, match=msg) as e:
            _run(*common, "--val-json", tmp_path / "val.json", *extra, "--out", out)
        assert e.value.code == 2 and "species_77" in capsys.readouterr().err  # one line on stderr, exit status 2
        report = json.loads((out / "conversion_report.json").read_text())
        assert report["status"] == "failed" and "category_id 77" in report["message"]
        assert not (out / "_info.json").exists()


def test_val_equal_to_test_is_refused(tail_src, list_src, tmp_path):
    import shutil

    common = ["inat", "--src", tail_src / "images", "--train-json", tail_src / "train.json", "--workers", 1]
    same = r"--val-json .*val\.json and --test-json .*val\.json are the same file"
    with pytest.raises(SystemExit, match=same) as e:
        _run(*common, "--val-json", tail_src / "val.json", "--test-json", tail_src / "val.json", "--out",
             tmp_path / "a")
    assert e.value.code == 2
    shutil.copy(tail_src / "val.json", tmp_path / "copy.json")
    with pytest.raises(SystemExit, match=r"the val split \(--val-json\) shares the same images as the test split "
                                         r"\(first: .*val\.json images\[0\] .* = .*copy\.json images\[0\]") as e:
        _run(*common, "--val-json", tail_src / "val.json", "--test-json", tmp_path / "copy.json", "--out",
             tmp_path / "b")
    assert e.value.code == 2
    lines = (list_src / "LT_test.txt").read_text().splitlines()
    (tmp_path / "val.txt").write_text("\n".join(lines[:3]) + "\n")  # 3 test images in the val list
    with pytest.raises(SystemExit, match=r"shares 3 image\(s\) with the test split") as e:
        _run("list", "--src", list_src / "images", "--train-list", list_src / "LT_train.txt", "--val-list",
             tmp_path / "val.txt", "--test-list", list_src / "LT_test.txt", "--out", tmp_path / "c", "--workers", 1)
    assert e.value.code == 2
    with pytest.raises(SystemExit, match=r"are the same file") as e:
        _run("list", "--src", list_src / "images", "--train-list", list_src / "LT_train.txt", "--val-list",
             list_src / "LT_test.txt", "--test-list", list_src / "LT_test.txt", "--out", tmp_path / "d", "--workers", 1)
    assert e.value.code == 2 and not any((tmp_path / d).exists() for d in "abcd")


def test_holdout_policy_at_inat_shape():
    """iNat 2018's class count with counts from 100 down to 2 (the rehearsal's scale): the default policy holds out
    ~7%, never from a class under 10 images, never more than 10% or 5 of a class (`min(5, n // 2)` took 15.4% of
    this profile and halved every 2- and 3-image class)."""
    from bigltr.data.holdout import HoldoutPolicy, holdout_per_class

    C = 8142
    counts = np.array([int(round(100 * 0.02 ** (c / (C - 1)))) for c in range(C)])
    labels = np.repeat(np.arange(C), counts)
    tr, va = holdout_per_class(labels, C, 5, seed=0)
    took = np.bincount(labels[va], minlength=C)
    assert np.array_equal(np.sort(np.r_[tr, va]), np.arange(labels.size))
    assert took[counts < 10].sum() == 0 and np.all(took <= np.minimum(5, np.floor(0.1 * counts)))
    assert np.array_equal(took, [HoldoutPolicy().take(n) for n in counts])
    assert 0.06 < va.size / labels.size < 0.08 and np.all(counts - took >= 1)
    for bad in (dict(max_fraction=0.6), dict(min_count=0), dict(max_fraction=float("nan"))):
        with pytest.raises(ValueError, match="--val-m"):
            holdout_per_class(labels[:10], C, 5, 0, **bad)


# ----------------------------------------------------------------------------------------------- CIFAR pickles
C10, PER_CLASS, PER_TEST, N_MAX, IF = 10, 50, 5, 40, 10


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the real files are Python-2 pickles (bytes keys)


@pytest.fixture(scope="module")
def cifar10_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(4)
    labels = rng.permutation(np.repeat(np.arange(C10), PER_CLASS))
    data = rng.integers(0, 256, (labels.size, 3072), dtype=np.uint8)
    for b in range(5):
        sl = slice(b * 100, (b + 1) * 100)
        _pickle(root / f"data_batch_{b + 1}", {b"batch_label": f"training batch {b + 1} of 5".encode(),
                                                b"labels": labels[sl].tolist(), b"data": data[sl],
                                                b"filenames": [b"x.png"] * 100})
    tl = np.repeat(np.arange(C10), PER_TEST)
    _pickle(root / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": tl.tolist(),
                                  b"data": rng.integers(0, 256, (tl.size, 3072), dtype=np.uint8)})
    _pickle(root / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(C10)],
                                    b"num_cases_per_batch": 100, b"num_vis": 3072})
    return root, labels, data


def test_cifar_conventions(cifar10_src, tmp_path):
    root, labels, data = cifar10_src
    counts = longtail_counts(N_MAX, IF, C10)
    picked = {}
    for conv in ("ldam", "official"):
        out = tmp_path / conv
        info = _run("cifar", "--src", root, "--out", out, "--n-max", N_MAX, "--imbalance", IF, "--convention", conv,
                    "--val-per-class", 3, "--workers", 1, "--maxcount", 64)
        assert info["class_counts"] == counts and info["classes"][0] == "c0"
        # CIFAR-LT: val comes from the images the subset leaves unused, so train IS the official LT training set
        assert info["official_train_counts"] == counts and info["official_train_splits"] == ["train"]
        train = _read_split(out, info, "train")
        picked[conv] = {int(k.split("_")[1]) for k in train}
        for k, (lab, ext, png) in train.items():  # pixels and labels match the source row
            i = int(k.split("_")[1])
            assert lab == labels[i] and ext == "png"
            pixels = np.asarray(Image.open(io.BytesIO(png)))
            assert np.array_equal(pixels, data[i].reshape(3, 32, 32).transpose(1, 2, 0))
        val = _read_split(out, info, "val")
        # val from the unused training images: class 0 has 50 - 40 = 10 left, every class gets 3
        assert _split_counts(out, info, "val", C10) == [3] * C10 and not {int(k[6:]) for k in val} & picked[conv]
        assert _split_counts(out, info, "test", C10) == [PER_TEST] * C10
    expected_official = {int(i) for c in range(C10) for i in np.flatnonzero(labels == c)[:counts[c]]}
    np.random.seed(0)  # LDAM-DRW's own code path, for reference
    expected_ldam = set()
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        expected_ldam |= {int(i) for i in idx[:counts[c]]}
    assert picked["official"] == expected_official and picked["ldam"] == expected_ldam
    assert picked["ldam"] != picked["official"] and len(picked["ldam"]) == sum(counts)


def test_cifar100_format_and_errors(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(4), 12)
    _pickle(root / "train", {b"filenames": [], b"batch_label": b"training batch 1 of 1",
                             b"fine_labels": labels.tolist(),
                             b"coarse_labels": [0] * labels.size,
                             b"data": rng.integers(0, 256, (labels.size, 3072), dtype=np.uint8)})
    _pickle(root / "test", {b"fine_labels": [0, 1, 2, 3], b"coarse_labels": [0] * 4,
                            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8)})
    _pickle(root / "meta", {b"fine_label_names": [b"apple", b"bear", b"cup", b"dog"], b"coarse_label_names": [b"x"]})
    info = _run("cifar", "--src", root, "--out", tmp_path / "o", "--n-max", 10, "--imbalance", 5, "--workers", 2)
    assert info["class_counts"] == longtail_counts(10, 5, 4) and info["classes"][1] == "bear"
    unused = [12 - n for n in longtail_counts(10, 5, 4)]  # default 20/class, capped by the unused images
    assert _split_counts(tmp_path / "o", info, "val", 4) == unused == [2, 7, 9, 10]
    _pickle(root / "test", {b"fine_labels": [0, 1, 4, 3], b"data": np.zeros((4, 3072), np.uint8)})
    with pytest.raises(SystemExit, match=r"cifar-100-python/test: fine_labels\[2\] = 4 outside \[0, 4\)"):
        _run("cifar", "--src", root, "--out", tmp_path / "o2", "--n-max", 10, "--workers", 1)


# ----------------------------------------------------------------------------------------------- timm reads all
def test_timm_reads_every_converter(folder_out, list_src, inat_src, cifar10_src, tmp_path):
    import timm.data

    outs = {"folder": folder_out}
    _run("list", "--src", list_src / "images", "--train-list", list_src / "LT_train.txt",
         "--val-list", list_src / "LT_val.txt", "--test-list", list_src / "LT_test.txt", "--out", tmp_path / "list",
         "--workers", 1)
    _run("inat", "--src", inat_src / "images", "--train-json", inat_src / "train2018.json",
         "--val-json", inat_src / "val2018.json", "--out", tmp_path / "inat", "--workers", 1)
    _run("cifar", "--src", cifar10_src[0], "--out", tmp_path / "cifar", "--n-max", N_MAX, "--imbalance", IF,
         "--workers", 1, "--maxcount", 50)
    outs.update(list=tmp_path / "list", inat=tmp_path / "inat", cifar=tmp_path / "cifar")
    for name, out in outs.items():
        info = read_info(out)
        for split in ("train", "test"):
            ds = timm.data.create_dataset(f"wds/{info['name']}", root=str(out), split=split)
            assert len(ds) == info["splits"][split]["num_samples"], name
            got = Counter(int(t) for _, t in ds)
            want = [sum(h[c] for h in info["splits"][split]["class_hist"]) for c in range(info["num_classes"])]
            assert [got[c] for c in range(info["num_classes"])] == want, (name, split)


def test_shardloader_reads_mixed_jpg_png_shards(folder_out):
    from bigltr.data import ShardLoader, build_transform

    tf = build_transform(img_size=16, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3, train=True, aug="cifar")
    ld = ShardLoader(folder_out, "train", batch_size=4, transform=tf, train=True, num_workers=0, drop_last=False)
    labels = [y for _, ys, _ in ld for y in ys.tolist()]
    assert Counter(labels) == Counter({c: n for c, n in enumerate(TRAIN_COUNTS)}) and ld.skipped == 0


# ----------------------------------------------------------------------------------------------- one path for all
def test_idx_goes_through_convert_and_writes_the_report(tiny_shards):
    report = json.loads((tiny_shards / "conversion_report.json").read_text())
    info = read_info(tiny_shards)
    assert report["status"] == "ok" and report["skipped"] == []
    assert {s: r["written"] for s, r in report["splits"].items()} == {
        s: e["num_samples"] for s, e in info["splits"].items()}
    # idx's _info.json "source" keeps its layout (no encode / skipped keys): byte-identical to earlier conversions
    assert list(info["source"])[-3:] == ["keys", "image_format", "maxcount"] and "skipped" not in info["source"]


def test_split_rules_share_one_draw():
    from bigltr.data.holdout import holdout_per_class
    from bigltr.data.longtail import draw_per_class, val_from_unused

    labels = np.array([0, 1, 0, 2, 1, 0, 0, 1, 2, 0, 1, 1])
    pools = [np.flatnonzero(labels == c) for c in range(3)]
    tr, va = holdout_per_class(labels, 3, 2, seed=4, max_fraction=0.5, min_count=2)
    assert np.array_equal(va, draw_per_class(pools, [2, 2, 1], 4)) and np.array_equal(np.sort(np.r_[tr, va]),
                                                                                      np.arange(labels.size))
    rng = np.random.default_rng(4)  # the rule as it was written inline: one generator, class by class
    expected = np.sort(np.concatenate([p[np.sort(rng.permutation(p.size)[:min(3, p.size)])] for p in pools]))
    assert np.array_equal(val_from_unused(pools, 3, 4)[0], expected)
    with pytest.raises(ValueError, match="--val-per-class must be >= 0"):
        holdout_per_class(labels, 3, -1, 0)


def test_script_alias_and_console_script(tiny_shards):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), "verify", str(tiny_shards)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    exe = Path(sys.executable).with_name("bigltr-make-shards")
    if exe.exists():  # installed with pip install -e . (setup.cfg console_scripts)
        r = subprocess.run([str(exe), "idx", "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "--val-per-class" in r.stdout

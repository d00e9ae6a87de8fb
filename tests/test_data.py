"""bigltr.data and tools/make_shards.py on tiny generated idx data (fast: one conversion per fixture)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bigltr.data import holdout_and_longtail, longtail_counts, read_info, write_info
from bigltr.data.info import INFO_NAME

REPO = Path(__file__).resolve().parents[1]
C, PER_CLASS_TRAIN, PER_CLASS_TEST = 10, 30, 10
N_MAX, IMBALANCE, VAL_PER_CLASS, MAXCOUNT, SEED = 20, 10, 5, 16, 3


import make_shards  # noqa: E402  (tools/ is on sys.path: tests/conftest.py)


def _write_idx(path: Path, arr: np.ndarray, *, magic: bytes | None = None) -> None:
    head = magic if magic is not None else bytes([0, 0, 8, arr.ndim])
    head += b"".join(struct.pack(">i", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def _fake_split(rng, per_class):
    labels = np.repeat(np.arange(C), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 256, size=(labels.size, 28, 28), dtype=np.uint8)
    return images, labels


@pytest.fixture(scope="module")
def idx_src(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(123)
    for prefix, per_class in (("train", PER_CLASS_TRAIN), ("t10k", PER_CLASS_TEST)):
        images, labels = _fake_split(rng, per_class)
        _write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return d


def _args(src, out, *extra):
    return ["idx", "--src", str(src), "--out", str(out), "--n-max", str(N_MAX), "--imbalance", str(IMBALANCE),
            "--val-per-class", str(VAL_PER_CLASS), "--maxcount", str(MAXCOUNT), "--seed", str(SEED),
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def shards(idx_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "fmnist_lt"
    make_shards.main(_args(idx_src, out))
    return out


def _read_tars(root, info, split):
    """key -> label for one split, read with tarfile (independent of webdataset)."""
    out = {}
    for fname, n in zip(info["splits"][split]["filenames"], info["splits"][split]["shard_lengths"]):
        with tarfile.open(os.path.join(root, fname)) as tf:
            names = tf.getnames()
            keys = sorted({m.rsplit(".", 1)[0] for m in names})
            assert len(keys) == n
            for k in keys:
                assert f"{k}.png" in names
                out[k] = int(tf.extractfile(f"{k}.cls").read())
    return out


def _source_labels(idx_src, prefix):
    with gzip.open(idx_src / f"{prefix}-labels-idx1-ubyte.gz") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=8)


def _digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).iterdir())}


# ------------------------------------------------------------------------------------------ no torch needed
def test_longtail_counts_and_validation():
    assert longtail_counts(5000, 100, 10) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(longtail_counts(500, 100, 100)) == 10847  # CIFAR-100-LT IF100 (LDAM-DRW)
    assert longtail_counts(7, 1, 4) == [7, 7, 7, 7]
    for bad in [(0, 10, 10), (10, 0.5, 10), (10, 10, 0), (50, 100, 10)]:
        with pytest.raises(ValueError):
            longtail_counts(*bad)
    labels = np.repeat(np.arange(3), [10, 10, 4])
    with pytest.raises(ValueError, match="class 2 has 4 images"):
        holdout_and_longtail(labels, 3, [5, 5, 3], 2, 0)
    tr, va = holdout_and_longtail(labels, 3, [5, 4, 2], 2, 0)
    tr2, va2 = holdout_and_longtail(labels, 3, [5, 4, 2], 2, 0)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert list(np.bincount(labels[tr])) == [5, 4, 2] and list(np.bincount(labels[va])) == [2, 2, 2]
    assert not set(tr) & set(va)


def test_read_info_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no dataset folder .*nowhere.*make_shards\.py"):
        read_info(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no _info.json in .*make_shards\.py idx"):
        read_info(tmp_path)
    (tmp_path / INFO_NAME).write_text(json.dumps({"name": "x", "num_classes": 2, "classes": ["a", "b"],
                                                  "class_counts": [1, 1], "splits": {"train": {"name": "train"}}}))
    with pytest.raises(ValueError, match="splits.train.num_samples"):
        read_info(tmp_path)
    with pytest.raises(ValueError, match="class_counts"):
        write_info(tmp_path, {"name": "x", "num_classes": 2, "classes": ["a", "b"], "class_counts": [1],
                              "splits": {}})


def test_official_train_counts_define_the_groups_and_are_validated(shards, tmp_path):
    from bigltr.metrics import class_groups, group_counts

    # idx (the demo's converter): no hold-out out of the LT train set, so no official_* keys (its _info.json stays
    # byte-identical to earlier conversions) and the groups come from class_counts, as before
    info = read_info(shards)
    assert "official_train_counts" not in info and "official_train_splits" not in info
    assert group_counts(info) == info["class_counts"] == longtail_counts(N_MAX, IMBALANCE, C)
    # a folder whose val was held out of train: groups from the official counts, validated against the shards
    base = {"name": "x", "num_classes": 2, "classes": ["a", "b"], "class_counts": [96, 18],
            "splits": {s: {"name": s, "num_samples": n, "filenames": [f"{s}-000000.tar"], "shard_lengths": [n],
                           "class_hist": [h]} for s, n, h in (("train", 114, [96, 18]), ("val", 6, [5, 1]))}}
    good = {**base, "official_train_counts": [101, 19], "official_train_splits": ["train", "val"]}
    write_info(tmp_path, good)
    assert group_counts(good) == [101, 19] and class_groups(group_counts(good), 100, 20)["many"] == [0]
    assert class_groups(good["class_counts"], 100, 20)["many"] == []  # the reduced counts would regroup class 0
    for bad, key in (({"official_train_counts": [101]}, "official_train_counts"),
                     ({"official_train_counts": [101, -1]}, "official_train_counts"),
                     ({"official_train_splits": ["val", "train"]}, "official_train_splits"),
                     ({"official_train_splits": ["train", "test"]}, "official_train_splits"),
                     ({"official_train_counts": [100, 19]}, r"train\+val hold 101 images of class 0 \('a'\)")):
        with pytest.raises(ValueError, match=key):
            write_info(tmp_path, {**good, **bad})


def test_bad_idx_magic_names_file(tmp_path, idx_src):
    for f in idx_src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    _write_idx(bad, np.zeros(300, dtype=np.uint8), magic=b"\x00\x00\x08\x03")
    with pytest.raises(SystemExit, match=r"train-labels-idx1-ubyte\.gz: bad idx magic number 0x00000803"):
        make_shards.main(_args(tmp_path, tmp_path / "out"))
    assert not (tmp_path / "out" / INFO_NAME).exists()


def test_make_shards_content(shards, idx_src, capsys):
    info = read_info(shards)
    counts = longtail_counts(N_MAX, IMBALANCE, C)
    assert info["name"] == "fmnist_lt" and info["classes"][0] == "T-shirt/top"
    assert info["class_counts"] == counts
    assert info["source"]["seed"] == SEED
    train, val, test = (_read_tars(shards, info, s) for s in ("train", "val", "test"))
    assert [Counter(train.values())[c] for c in range(C)] == counts  # read back from the tars
    assert len(info["splits"]["train"]["filenames"]) == -(-sum(counts) // MAXCOUNT) > 2
    assert [Counter(val.values())[c] for c in range(C)] == [VAL_PER_CLASS] * C  # balanced val
    assert len(test) == C * PER_CLASS_TEST and all(k.startswith("t10k_") for k in test)
    assert not set(train) & set(val)  # disjoint source indices (keys encode them)
    src_train, src_test = _source_labels(idx_src, "train"), _source_labels(idx_src, "t10k")
    for split in (train, val):
        assert all(lab == src_train[int(k.split("_")[1])] for k, lab in split.items())
    assert all(lab == src_test[int(k.split("_")[1])] for k, lab in test.items())
    hist = info["splits"]["train"]["class_hist"]
    assert [sum(h[c] for h in hist) for c in range(C)] == counts
    assert max(sum(1 for x in h if x) for h in hist) > 3  # train shards mix classes (shuffled order)
    with tarfile.open(shards / info["splits"]["val"]["filenames"][0]) as tf:  # val in file order
        keys = [m.rsplit(".", 1)[0] for m in tf.getnames()[::2]]
    assert keys == sorted(keys)
    assert not [p for p in os.listdir(shards) if p.endswith(".tmp")]


def test_rerun_refused_then_overwrite_is_byte_identical(shards, idx_src, tmp_path, capsys):
    out = tmp_path / "again"
    make_shards.main(_args(idx_src, out, "--name", "fmnist_lt"))
    assert "total" in capsys.readouterr().out
    assert _digest(out) == _digest(shards)  # same args, other run: same bytes
    with pytest.raises(SystemExit, match="not empty.*--overwrite"):
        make_shards.main(_args(idx_src, out))
    (out / "train-000099.tar").write_bytes(b"stale")  # stale shard from an older, larger conversion
    make_shards.main(_args(idx_src, out, "--overwrite", "--name", "fmnist_lt"))
    assert _digest(out) == _digest(shards)


def test_interrupted_write_leaves_no_partial_shard(tmp_path):
    from bigltr.data import write_split

    def samples():
        for i in range(20):
            yield f"s_{i:03d}", np.full((4, 4), i, dtype=np.uint8), i % 2
        raise KeyboardInterrupt  # conversion killed while the second shard is open

    with pytest.raises(KeyboardInterrupt):
        write_split(tmp_path, "train", samples(), maxcount=16)
    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar"]  # complete shard only, no temp file
    entry = write_split(tmp_path, "val", ((f"v_{i}", np.zeros((4, 4, 3), np.uint8), 1) for i in range(5)),
                        maxcount=2, image_format="jpg")
    assert entry["shard_lengths"] == [2, 2, 1] and entry["class_hist"] == [[0, 2], [0, 2], [0, 1]]


# ------------------------------------------------------------------------------------------ torch below
def test_timm_reads_our_shards(shards):
    import timm.data

    info = read_info(shards)
    ds = timm.data.create_dataset("wds/fmnist_lt", root=str(shards), split="train")
    assert len(ds) == info["splits"]["train"]["num_samples"]
    labels = Counter(int(t) for _, t in ds)
    assert [labels[c] for c in range(C)] == info["class_counts"]


def _loader(root, split, **kw):
    from bigltr.data import ShardLoader, build_transform

    tf = build_transform(img_size=28, in_chans=1, mean=(0.5,), std=(0.5,), train=kw.get("train", False),
                         aug=kw.pop("aug", "none"))
    kw.setdefault("train", False)
    kw.setdefault("batch_size", 8)
    kw.setdefault("num_workers", 2)
    return ShardLoader(root, split, transform=tf, **kw)


def _epoch(loader):
    keys, labels = [], []
    for x, y, k in loader:
        assert x.dtype.is_floating_point and x.shape[1:] == (1, 28, 28) and x.shape[0] == len(k) == len(y)
        keys += k
        labels += y.tolist()
    return keys, labels


def test_loader_train_exact_pass_and_determinism(shards):
    info = read_info(shards)
    truth = _read_tars(shards, info, "train")
    n = len(truth)
    ld = _loader(shards, "train", train=True, seed=1, drop_last=False, shuffle_buffer=10, aug="cifar")
    assert ld.num_samples == n and len(ld) == -(-n // 8)
    ld.set_epoch(0)
    k0, y0 = _epoch(ld)
    assert sorted(k0) == sorted(truth) and len(k0) == n  # every sample exactly once
    assert all(truth[k] == y for k, y in zip(k0, y0))
    ld.set_epoch(0)
    assert _epoch(ld)[0] == k0  # same (seed, epoch) -> same order
    ld.set_epoch(1)
    k1, _ = _epoch(ld)
    assert sorted(k1) == sorted(k0) and k1 != k0
    dl = _loader(shards, "train", train=True, seed=1, num_workers=0)  # default drop_last for train
    assert len(dl) == n // 8
    batches = list(dl)
    assert len(batches) == n // 8 and all(len(k) == 8 for _, _, k in batches)
    assert dl.skipped == 0


def test_loader_eval_stable_and_ranks(shards):
    info = read_info(shards)
    truth = _read_tars(shards, info, "val")
    ld = _loader(shards, "val")
    k0, y0 = _epoch(ld)
    assert sorted(k0) == sorted(truth) and len(ld) == -(-len(truth) // 8)
    assert _epoch(ld)[0] == k0
    assert sorted(_epoch(_loader(shards, "val", num_workers=0))[0]) == sorted(k0)
    # two ranks (no process group needed): same number of batches; eval covers everything, train is disjoint
    for split, train in (("val", False), ("train", True)):
        rk = [_loader(shards, split, train=train, rank=r, world_size=2) for r in range(2)]
        assert len(rk[0]) == len(rk[1])
        got = [list(iter(r)) for r in rk]
        assert len(got[0]) == len(got[1]) == len(rk[0])
        keys = [[k for _, _, ks in g for k in ks] for g in got]
        if train:
            assert not set(keys[0]) & set(keys[1]) and all(len(k) == rk[0].num_samples // 8 * 8 for k in keys)
        else:
            assert set(keys[0]) | set(keys[1]) == set(truth)


def test_corrupt_sample_is_skipped_and_counted(shards, tmp_path):
    root = tmp_path / "corrupt"
    shutil.copytree(shards, root)
    info = read_info(root)
    entry = info["splits"]["test"]
    shard = root / entry["filenames"][1]
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    extra = [("bad_00000.png", b"\x89PNG\r\n\x1a\n garbage"), ("bad_00000.cls", b"3"),
             ("nolabel_00000.png", members[0][1])]
    with tarfile.open(shard, "w") as tf:
        for i, (m, data) in enumerate(members):
            tf.addfile(m, io.BytesIO(data))
            if i == 3:  # in the middle of the shard
                for name, blob in extra:
                    ti = tarfile.TarInfo(name)
                    ti.size = len(blob)
                    tf.addfile(ti, io.BytesIO(blob))
    ld = _loader(root, "test", num_workers=2)
    keys, _ = _epoch(ld)
    assert len(keys) == entry["num_samples"] and not any(k.startswith(("bad", "nolabel")) for k in keys)
    assert ld.epoch_skipped == 2 and ld.skipped == 2


def test_build_transform_variants():
    from PIL import Image

    from bigltr.data import build_transform

    img = Image.fromarray(np.zeros((28, 28), dtype=np.uint8))
    for aug in ("none", "cifar", "imagenet"):
        for chans in (1, 3):
            tf = build_transform(img_size=32, in_chans=chans, mean=(0.5,) * chans, std=(0.5,) * chans,
                                 train=True, aug=aug)
            assert tuple(tf(img).shape) == (chans, 32, 32)
    with pytest.raises(ValueError, match="aug"):
        build_transform(img_size=32, in_chans=1, mean=(0.5,), std=(0.5,), train=True, aug="bogus")


def test_fewer_shards_than_ranks_splits_by_sample(tiny_shards):
    """1 val shard, 2 ranks: each rank keeps every 2nd sample; disjoint, complete, same number of batches."""
    from bigltr.data.loader import ShardLoader
    from bigltr.data.transforms import build_transform

    tf = build_transform(img_size=28, in_chans=1, mean=(0.5,), std=(0.5,), train=False, aug="none")
    for workers in (0, 2):
        loaders = [ShardLoader(tiny_shards, "val", batch_size=7, transform=tf, train=False, num_workers=workers,
                               rank=r, world_size=2) for r in range(2)]
        keys = [[k for _, _, ks in ld for k in ks] for ld in loaders]
        assert len(loaders[0]) == len(loaders[1])
        assert sum(ld.padded_batches for ld in loaders) <= 1  # 60 samples: 30 + 30 -> 5 batches each, no pad
        uniq = [set(k) for k in keys]
        assert not (uniq[0] & uniq[1]) and len(uniq[0] | uniq[1]) == 60
        train = [ShardLoader(tiny_shards, "train", batch_size=8, transform=tf, train=True, num_workers=workers,
                             rank=r, world_size=4, shuffle_buffer=16) for r in range(4)]
        assert len({len(t) for t in train}) == 1
        seen = []
        for t in train:
            t.set_epoch(1)
            batches = list(t)
            assert len(batches) == len(t)
            seen += [k for _, _, ks in batches for k in ks]
        assert len(seen) == len(set(seen))  # no sample on two ranks

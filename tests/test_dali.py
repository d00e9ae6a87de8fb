"""data.pipeline=dali: bigltr.data.dali.DaliShardLoader in DALI's CPU-only mode, against ShardLoader.

Skipped (with the reason) only when NVIDIA DALI cannot be imported; `make venv` installs it ('.[dali]').
Everything runs on CPU: the GPU path (device="mixed" decoding) differs only in where the operators run and is
checked by tools/gpu_check.sh on a GPU machine.
"""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")

import torch  # noqa: E402

from bigltr.data.errors import DataError  # noqa: E402

GREY = dict(img_size=28, in_chans=1, mean=(0.3,), std=(0.4,))


@pytest.fixture(scope="module")
def shards(tiny_shards, tmp_path_factory):
    """A private copy of the session's tiny shards (10 classes; train 3 shards, val 1, test 2; 28x28 grey PNG)."""
    root = tmp_path_factory.mktemp("dali") / "shards"
    shutil.copytree(tiny_shards, root)
    return root


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    """Colour JPEG shards from the imagefolder converter: 56 images of 4 classes, 32x32, 40x30 and 50x37 px;
    8 val, 48 train in 6 shards of 8 (whole shards per rank with 2 ranks)."""
    import make_shards
    from PIL import Image

    base = tmp_path_factory.mktemp("jpeg")
    rng = np.random.default_rng(0)
    for i in range(56):
        d = base / "src" / "train" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = ((32, 32), (40, 30), (50, 37))[i % 3]
        small = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        arr = np.clip(np.asarray(small, np.float32) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i:03d}.jpg", quality=90)
    make_shards.main(["imagefolder", "--src", str(base / "src"), "--out", str(base / "shards"), "--val-per-class",
                      "2", "--val-max-fraction", "0.5", "--maxcount", "8", "--workers", "1", "--no-progress"])
    return base / "shards"


def _image_sizes(root: Path, split: str) -> dict[str, tuple[int, int]]:
    """key -> (width, height) of the stored image, read from the shards with PIL."""
    import io

    from PIL import Image

    info = json.loads((root / "_info.json").read_text())
    sizes = {}
    for name in info["splits"][split]["filenames"]:
        with tarfile.open(root / name) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    sizes[m.name[:-4]] = Image.open(io.BytesIO(tf.extractfile(m).read())).size
    return sizes


def _dali(root, split, tmp_path, **kw):
    from bigltr.data.dali import DaliShardLoader

    opts = {**GREY, "batch_size": 8, "train": False, "num_workers": 1, "index_dir": str(tmp_path / "idx"), **kw}
    return DaliShardLoader(root, split, **opts)


def _torch(root, split, *, aug="none", augment=None, img_size=28, in_chans=1, mean=(0.3,), std=(0.4,), **kw):
    from bigltr.data.loader import ShardLoader
    from bigltr.data.transforms import build_transform

    kw.setdefault("train", False)
    tf = build_transform(img_size=img_size, in_chans=in_chans, mean=mean, std=std,
                         train=kw["train"] if augment is None else augment, aug=aug)
    return ShardLoader(root, split, transform=tf, batch_size=kw.pop("batch_size", 8), num_workers=0, **kw)


def _epoch(loader):
    """All batches of one epoch: (images, labels, keys) concatenated, and the batch count."""
    xs, ys, ks, n = [], [], [], 0
    for x, y, k in loader:
        assert x.dtype == torch.float32 and x.ndim == 4 and y.dtype == torch.long and x.shape[0] == len(y) == len(k)
        xs.append(x)
        ys.append(y)
        ks += list(k)
        n += 1
    return torch.cat(xs), torch.cat(ys), ks, n


def test_same_samples_labels_and_eval_images_as_shardloader(shards, tmp_path):
    """Eval: same keys in the same order, same labels, images equal to the torch path's after normalisation
    (PNG, native size: within 1e-6; resized: within one grey level, PIL and DALI round bilinear differently).
    Train: the same set of keys per epoch. The index cache lands in index_dir, not in the data folder."""
    before = sorted(p.name for p in shards.iterdir())
    for split in ("val", "test"):
        for aug, size, tol in (("none", 28, 1e-6), ("cifar", 28, 1e-6), ("none", 32, 1 / 255 / 0.4 + 1e-6),
                               ("imagenet", 28, 1 / 255 / 0.4 + 1e-6)):
            d = _dali(shards, split, tmp_path, aug=aug, img_size=size)
            x, y, k, n = _epoch(d)
            tx, ty, tk, tn = _epoch(_torch(shards, split, aug=aug, img_size=size))
            assert k == tk and torch.equal(y, ty) and n == tn == len(d)
            assert x.shape == tx.shape == (d.num_samples, 1, size, size)
            assert (x - tx).abs().max().item() <= tol, (split, aug, size)
            assert d.epoch_skipped == d.epoch_lost == d.padded_batches == 0
    d = _dali(shards, "train", tmp_path, train=True, drop_last=False, aug="cifar")
    t = _torch(shards, "train", train=True, drop_last=False, aug="cifar")
    for epoch in (0, 1):
        d.set_epoch(epoch)
        t.set_epoch(epoch)
        _, y, k, _ = _epoch(d)
        _, ty, tk, _ = _epoch(t)
        assert len(k) == len(set(k)) == d.expected_samples and set(k) == set(tk)
        assert dict(zip(k, y.tolist())) == dict(zip(tk, ty.tolist()))
    assert sorted(p.name for p in shards.iterdir()) == before  # nothing written into the data folder
    assert len(list((tmp_path / "idx").glob("*.json"))) == 6  # one cached index per shard


def test_jpeg_eval_images_match_torch(jpeg_shards, tmp_path):
    """Colour JPEGs: DALI's CPU decoder matches PIL exactly where no resize happens (32x32 images at 32 px, RGB
    and grey); where the eval transform resizes (none: to 32x32; imagenet: timm's shorter side to
    floor(S / 0.875) + centre crop) every pixel is within MAX_LEVELS grey levels of the torch path's."""
    MAX_LEVELS = 2.0  # measured: 1 (bilinear up/down by < 2x), 2 (50x37 -> 32x32 squash, antialiased)
    sizes = _image_sizes(jpeg_shards, "train")
    rgb = dict(in_chans=3, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
    grey = dict(in_chans=1, mean=(0.5,), std=(0.25,))
    for aug, size, kw in (("none", 32, rgb), ("none", 32, grey), ("imagenet", 32, rgb), ("imagenet", 24, grey)):
        x, y, k, _ = _epoch(_dali(jpeg_shards, "train", tmp_path, aug=aug, img_size=size, **kw))
        tx, ty, tk, _ = _epoch(_torch(jpeg_shards, "train", aug=aug, img_size=size, **kw))
        chans = kw["in_chans"]
        assert k == tk and torch.equal(y, ty) and x.shape == tx.shape == (48, chans, size, size)
        levels = (x - tx).abs() * torch.tensor(kw["std"]).view(1, -1, 1, 1) * 255  # in 0..255 grey levels
        assert levels.max().item() <= MAX_LEVELS + 1e-3, (aug, size, chans)
        assert levels.mean().item() < 0.3  # rounding, not geometry: a crop off by one pixel gives ~10
        if aug == "none":
            native = [i for i, key in enumerate(k) if sizes[key] == (32, 32)]
            assert len(native) >= 10 and (x[native] - tx[native]).abs().max().item() <= 1e-6


def test_two_ranks_disjoint_complete_and_in_step(shards, jpeg_shards, tmp_path):
    """rank 0/1 of 2 in one process: equal batch counts (ShardLoader's len) on both ranks, disjoint reading,
    eval complete (padding repeats keys only), train whole-shard and split-by-sample both disjoint."""
    # (split by sample?): tiny val has 1 shard, tiny train 3 uneven ones; jpeg train 6 x 8 is read by whole shards
    cases = [(shards, "test", False, False), (shards, "val", False, True), (shards, "train", True, True),
             (jpeg_shards, "train", True, False), (jpeg_shards, "val", False, True)]
    for root, split, train, by_sample in cases:
        info = json.loads((root / "_info.json").read_text())
        n_split = info["splits"][split]["num_samples"]
        kw = dict(aug="cifar", train=train, world_size=2, batch_size=4)
        if root == jpeg_shards:
            kw.update(in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3)
        keys, counts = [], []
        for rank in (0, 1):
            d = _dali(root, split, tmp_path, rank=rank, **kw)
            t = _torch(root, split, rank=rank, world_size=2, train=train, batch_size=4)
            d.set_epoch(2)
            assert d._split_samples == by_sample
            _, _, k, n = _epoch(d)
            assert n == len(d) == len(t), (split, rank)
            counts.append(n)
            keys.append(k if train else list(dict.fromkeys(k)))  # eval: drop the padding repeats
            if train:
                assert len(k) == len(set(k)) == n * 4 <= d.num_samples
        assert counts[0] == counts[1]
        assert not set(keys[0]) & set(keys[1]), (root, split)
        if not train:
            assert len(keys[0]) + len(keys[1]) == n_split


def test_train_augmentations(shards, jpeg_shards, tmp_path):
    """cifar: every training image is the eval image shifted by -4..4 px per axis (zero padding) and maybe
    flipped, with both flips and several shifts drawn; imagenet/none: shapes and sane values, RGB and grey."""
    ev, _, ek, _ = _epoch(_dali(shards, "test", tmp_path, aug="cifar"))
    tr, _, tk, _ = _epoch(_dali(shards, "test", tmp_path, aug="cifar", augment=True))
    assert tk == ek
    pad = (0 - 0.3) / 0.4
    seen = set()
    for a, b in zip(ev[:, 0], tr[:, 0]):
        padded = torch.nn.functional.pad(a, (4, 4, 4, 4), value=pad)
        hit = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
               if torch.allclose((padded[dy:dy + 28, dx:dx + 28].flip(-1) if f else padded[dy:dy + 28, dx:dx + 28]),
                                 b, atol=1e-6)]
        assert hit
        seen.add(hit[0])
    assert len({f for _, _, f in seen}) == 2 and len(seen) > 10
    for root, chans in ((shards, 1), (jpeg_shards, 3)):
        for aug in ("imagenet", "none"):
            kw = dict(in_chans=chans, mean=(0.5,) * chans, std=(0.25,) * chans, img_size=24)
            x, _, _, _ = _epoch(_dali(root, "train", tmp_path, aug=aug, train=True, drop_last=False, **kw))
            assert x.shape[1:] == (chans, 24, 24) and torch.isfinite(x).all()
            assert -2.0 - 1e-6 <= x.min().item() and x.max().item() <= 2.0 + 1e-6  # (0..1 - 0.5) / 0.25


def test_seed_epoch_determinism_and_mid_epoch_resume(jpeg_shards, tmp_path):
    """Same (seed, epoch): the same batches, images included (augmentation draws too); another epoch or seed:
    another order; skipping the first k batches (what a resumed run does) continues with the same remainder."""
    kw = dict(aug="imagenet", train=True, batch_size=4, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3, img_size=24,
              num_workers=2)
    a, b = _dali(jpeg_shards, "train", tmp_path, **kw), _dali(jpeg_shards, "train", tmp_path, **kw)
    a.set_epoch(3)
    b.set_epoch(3)
    xa, ya, ka, na = _epoch(a)
    xb, yb, kb, nb = _epoch(b)
    assert ka == kb and torch.equal(xa, xb) and torch.equal(ya, yb) and na == nb == len(a) == 12
    a.set_epoch(4)
    assert _epoch(a)[2] != ka
    assert _epoch(_dali(jpeg_shards, "train", tmp_path, seed=1, **{**kw, "train": True}))[2] != \
        _epoch(_dali(jpeg_shards, "train", tmp_path, **kw))[2]
    resumed = _dali(jpeg_shards, "train", tmp_path, **kw)
    resumed.set_epoch(3)
    rest = [batch for i, batch in enumerate(resumed) if i >= 6]  # train_epoch(start_batch=6) reads and skips 6
    assert [k for _, _, ks in rest for k in ks] == ka[6 * 4:]
    assert torch.equal(torch.cat([x for x, _, _ in rest]), xa[6 * 4:])


def _rewrite(shard: Path, extra: list[tuple[str, bytes]], after: int) -> None:
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    import io

    with tarfile.open(shard, "w") as tf:
        for i, (m, data) in enumerate(members):
            tf.addfile(m, io.BytesIO(data))
            if i == after:
                for name, blob in extra:
                    ti = tarfile.TarInfo(name)
                    ti.size = len(blob)
                    tf.addfile(ti, io.BytesIO(blob))


def _drop_sizes(root: Path) -> None:
    """An _info.json without the recorded shard sizes/checksums (older converters), so read_info does not
    refuse a modified shard up front and the loaders' own checks are exercised."""
    info = json.loads((root / "_info.json").read_text())
    for entry in info["splits"].values():
        entry.pop("sizes", None)
        entry.pop("checksums", None)
    (root / "_info.json").write_text(json.dumps(info))


def test_corrupt_image_and_missing_label_are_skipped_and_counted(shards, tmp_path, caplog):
    """An undecodable PNG and an image without .cls in the middle of a shard: both skipped and counted (like
    ShardLoader), the warning names shard and key, every other sample read once; a non-integer label is a
    DataError naming shard and key."""
    root = tmp_path / "corrupt"
    shutil.copytree(shards, root)
    _drop_sizes(root)
    info = json.loads((root / "_info.json").read_text())
    entry = info["splits"]["test"]
    good = list(json.loads((root / "_info.json").read_text())["splits"]["test"]["shard_lengths"])
    png = (root / entry["filenames"][1])
    with tarfile.open(png) as tf:
        first_png = next(tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".png"))
    _rewrite(png, [("bad_00000.png", b"\x89PNG\r\n\x1a\n garbage"), ("bad_00000.cls", b"3"),
                   ("nolabel_00000.png", first_png)], after=3)
    for train in (False, True):
        d = _dali(root, "test", tmp_path, train=train, drop_last=False, batch_size=4)
        with caplog.at_level("WARNING"):
            _, _, k, _ = _epoch(d)
        assert sorted(k) == sorted(set(k)) and len(k) == sum(good) and not any(x.startswith(("bad", "nolabel"))
                                                                               for x in k)
        assert d.epoch_skipped == 2 and d.epoch_lost == 0
        assert "bad_00000" in caplog.text and entry["filenames"][1] in caplog.text
        _, _, k2, _ = _epoch(d)  # the next epoch knows the bad image: same samples, counted again
        assert sorted(k2) == sorted(k) and d.epoch_skipped == 2 and d.skipped == 4
    _rewrite(png, [("badlabel_00000.png", first_png), ("badlabel_00000.cls", b"x7")], after=5)
    with pytest.raises(DataError, match=r"test-000001\.tar: sample badlabel_00000: label .* not an integer"):
        _epoch(_dali(root, "test", tmp_path))


def test_truncated_shard_like_shardloader(shards, tmp_path):
    """A shard cut short: eval raises DataError naming it (allow_partial: the readable samples, the same ones
    ShardLoader reads, counted as lost); train counts it in epoch_lost and goes on."""
    root = tmp_path / "trunc"
    shutil.copytree(shards, root)
    _drop_sizes(root)
    info = json.loads((root / "_info.json").read_text())
    name = info["splits"]["test"]["filenames"][0]
    shard = root / name
    data = shard.read_bytes()
    # a sample is 5 tar blocks: .cls header + data, .png header + 2 data blocks; cut in sample 27's png data
    shard.write_bytes(data[:27 * 5 * 512 + 3 * 512 + 100])
    with pytest.raises(DataError, match=rf"{name} holds \d+ of 64 samples.*eval_partial"):
        _epoch(_dali(root, "test", tmp_path))
    d = _dali(root, "test", tmp_path, allow_partial=True)
    _, _, k, _ = _epoch(d)
    t = _torch(root, "test", allow_partial=True)
    _, _, tk, _ = _epoch(t)
    # a sample cut inside its image member arrives without image: skipped (counted) by both, not lost
    assert k == tk and (d.epoch_lost, d.epoch_skipped) == (t.epoch_lost, t.epoch_skipped)
    assert d.epoch_lost > 0 and d.epoch_lost + d.epoch_skipped == 80 - len(k) and d.lost_shards == [name]
    tr = _dali(root, "test", tmp_path, train=True, drop_last=False)
    _, _, k, _ = _epoch(tr)
    assert sorted(k) == sorted(tk) and tr.epoch_lost == d.epoch_lost and tr.lost_shards == [name]


def test_pipeline_choice_config_and_context(shards, tmp_path, monkeypatch):
    """data.pipeline: torch default; auto -> torch without CUDA (logged); dali -> DaliShardLoader through
    RunContext.loader; dali without DALI importable -> ConfigError naming the install command."""
    from bigltr.config import validation
    from bigltr.config import ConfigError, build_config
    from bigltr.data.dali import DaliShardLoader, resolve_pipeline
    from bigltr.distributed import Dist
    from bigltr.data.info import read_info
    from bigltr.engine.context import RunContext

    assert build_config([]).data.pipeline == "torch"
    resolve_pipeline.cache_clear()
    assert resolve_pipeline("auto", "cpu") == "torch" and resolve_pipeline("dali", "cpu") == "dali"
    cfg = build_config([f"data.root={shards}", "data.pipeline=dali", "data.num_workers=1",
                        f"data.dali_index_dir={tmp_path / 'idx'}", f"out={tmp_path / 'run'}"])
    ctx = RunContext(cfg=cfg, device=torch.device("cpu"), info=read_info(shards), out=tmp_path, dist=Dist("ddp"))
    ld = ctx.loader("val", train=False, batch_size=16)
    assert isinstance(ld, DaliShardLoader) and ld.index_dir == str(tmp_path / "idx")
    assert _epoch(ld)[2] == _epoch(_torch(shards, "val", batch_size=16))[2]
    monkeypatch.setattr(validation, "_dali_importable", lambda: False)
    with pytest.raises(ConfigError, match=r"data.pipeline.*pip install -e '\.\[dali\]'"):
        build_config(["data.pipeline=dali"])
    build_config(["data.pipeline=auto"])  # auto falls back to torch at run time


def _zero_pngs(shard: Path, which: list[int]) -> list[str]:
    """Overwrite PNGs of a shard (positions among its images) with the PNG signature followed by zeros, keeping
    their length (so the shard keeps its recorded byte size, as a bit-rotted copy would); their keys."""
    import io

    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    pngs = [i for i, (m, _) in enumerate(members) if m.name.endswith(".png")]
    keys = []
    for w in which:
        m, data = members[pngs[w]]
        members[pngs[w]] = (m, data[:8] + bytes(len(data) - 8))
        keys.append(m.name.split(".", 1)[0])
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    return keys


# one epoch of each split through DaliShardLoader at batch 64 (where DALI's CPU PNG decoder crashed on a zeroed PNG)
_DALI_EPOCHS = r"""
import json, sys
from bigltr.data.dali import DaliShardLoader
root, idx = sys.argv[1], sys.argv[2]
out = {}
for split, train in (("val", False), ("test", False), ("train", True)):
    d = DaliShardLoader(root, split, batch_size=64, train=train, drop_last=False, img_size=28, in_chans=1,
                        mean=(0.3,), std=(0.4,), num_workers=2, index_dir=idx, aug="cifar")
    out[split] = {"keys": [k for _, _, ks in d for k in ks], "skipped": d.epoch_skipped}
print(json.dumps(out))
"""


def test_undecodable_images_never_reach_dali(shards, tmp_path):
    """PNGs that are the signature followed by zeros (1 in val, 1 in test, 10 in train) used to kill the process
    inside DALI's decoder (SIGSEGV, exit 139). The index pass decodes every image once with PIL (cached with the
    index): those samples are skipped and counted exactly as ShardLoader skips them, and DALI never sees them."""
    import subprocess
    import sys

    root = tmp_path / "zeroed"
    shutil.copytree(shards, root)
    bad = {"val": _zero_pngs(root / "val-000000.tar", [7]), "test": _zero_pngs(root / "test-000000.tar", [40])}
    bad["train"] = (_zero_pngs(root / "train-000000.tar", [0, 9, 30, 63]) + _zero_pngs(root / "train-000001.tar",
                    [1, 2, 50, 60]) + _zero_pngs(root / "train-000002.tar", [5, 30]))
    idx = tmp_path / "idx"
    p = subprocess.run([sys.executable, "-c", _DALI_EPOCHS, str(root), str(idx)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"DALI pipeline died (exit {p.returncode}):\n{p.stderr[-3000:]}"
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for split, train in (("val", False), ("test", False), ("train", True)):
        t = _torch(root, split, train=train, drop_last=False)
        _, _, tk, _ = _epoch(t)
        keys = got[split]["keys"]
        assert sorted(keys) == sorted(tk) and len(keys) == len(set(keys)), split
        assert not set(keys) & set(bad[split])
        assert got[split]["skipped"] == t.epoch_skipped == len(bad[split]), split
    assert f"sample {bad['val'][0]}: .png does not decode (" in p.stderr  # logged with shard and key
    # the check is cached with each shard's index: 12 undecodable images recorded, none in the clean shards
    cached = [json.loads(f.read_text()) for f in idx.glob("*.json")]
    assert len(cached) == 6 and sum(len(c["bad"]) for c in cached) == 12


def test_trainer_and_eval_skip_undecodable_images_with_dali(shards, tmp_path):
    """The real trainer and bigltr-eval with data.pipeline=dali: a zeroed train PNG (within data.max_skip_fraction)
    is skipped in stage 1 and in stage 2's feature-cache build, and the run finishes; a zeroed test PNG is the
    documented one-line exit 2 of an incomplete test split, and with data.eval_partial=true reports "79 of 80"."""
    import subprocess
    import sys

    root = tmp_path / "data"
    shutil.copytree(shards, root)
    _zero_pngs(root / "train-000001.tar", [3])
    idx, out = tmp_path / "idx", tmp_path / "run"
    common = ["data.pipeline=dali", "data.num_workers=1", f"data.dali_index_dir={idx}"]

    def run(*argv):
        return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=600)

    p = run("bigltr.train", "recipe=tiny_test", f"data.root={root}", *common, "stage1.epochs=1", "stage2.epochs=1",
            "stage1.batch_size=64", "stage2.batch_size=64", "stage2.features=cached", f"out={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "feature cache: 2 view(s) x 158 images" in p.stderr and "1 corrupt sample(s) skipped" in p.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["stage2"]["test"]["samples"] == 80

    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    _zero_pngs(broken / "test-000000.tar", [10])
    ckpt = out / "stage1" / "best.pt"
    p = run("bigltr.evaluate", str(ckpt), f"data.root={broken}", *common, "stage1.batch_size=64")
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("bigltr-eval: data error: test split of") and "only 79 of 80 samples" in last
    assert "Traceback" not in p.stderr
    p = run("bigltr.evaluate", str(ckpt), f"data.root={broken}", *common, "stage1.batch_size=64",
            "data.eval_partial=true")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "79 of 80 images" in p.stdout

"""Class-balanced sampling of the image stream (BalancedShardLoader, bigltr/data/balanced_stream.py): the draws are
the sampler's global sequence over the samples in key order (read here from the tars with tarfile), the same pixels
on 1 process and on 2 ranks, with 0 or 2 workers and when an epoch is read again; the trainer's global RNGs are
untouched. Faults: tests/test_data_faults.py; the trainer on 2 gloo ranks: tests/test_distributed.py."""
from __future__ import annotations

import json
import random
import tarfile
from collections import Counter

import numpy as np
import torch

from bigltr.data.balanced import ClassBalancedSampler
from bigltr.data.balanced_stream import BalancedShardLoader
from bigltr.data.transforms import build_transform


def _tar_samples(root) -> dict[str, int]:
    """key -> label of every train sample, from the tar members themselves."""
    info = json.loads((root / "_info.json").read_text())
    out = {}
    for f in info["splits"]["train"]["filenames"]:
        with tarfile.open(root / f) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".cls"):
                    out[m.name.split(".", 1)[0]] = int(tf.extractfile(m).read())
    return out


def _tf(aug):
    return build_transform(img_size=28, in_chans=1, mean=(0.5,), std=(0.5,), train=True, aug=aug)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    return (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]),
            [k for b in batches for k in b[2]], [len(b[2]) for b in batches])


def test_stream_draws_the_balanced_sequence_alike_on_any_world_size_and_worker_count(tiny_shards, tmp_path):
    idx = str(tmp_path / "index")
    ref = _tar_samples(tiny_shards)
    keys = sorted(ref)
    labels = [ref[k] for k in keys]
    one = BalancedShardLoader(tiny_shards, "train", batch_size=16, transform=_tf("cifar"), seed=3, num_workers=0,
                              index_dir=idx)
    assert one.sample_keys == keys and one.sample_labels.tolist() == labels
    assert len(one) == 159 // 16 == 9 and one.num_samples == 159
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    x0, y0, k0, sizes = _epoch(one, 0)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and (before[2] == after[2]).all()
    assert sizes == [16] * 9 and one.epoch_skipped == one.epoch_lost == 0
    for epoch, got in ((0, k0), (1, _epoch(one, 1)[2])):  # the sampler's sequence, computed here from the tars
        want = ClassBalancedSampler(labels, seed=3).global_indices(epoch)[:144].tolist()
        assert got == [keys[i] for i in want], epoch
    assert y0.tolist() == [ref[k] for k in k0]
    counts = Counter(y0.tolist())
    assert sorted(counts) == list(range(10)) and set(counts.values()) <= {14, 15}  # 144 draws of 10 classes
    tail = min(range(10), key=labels.count)  # 4 images, drawn 14-15 times: repeats with fresh augmentation
    rep = [i for i, k in enumerate(k0) if k == next(k for k in k0 if ref[k] == tail)]
    assert len(rep) >= 2 and any(not torch.equal(x0[rep[0]], x0[j]) for j in rep[1:])

    x0b = _epoch(one, 0)[0]  # the epoch read again (a resumed run): the same pixels
    assert torch.equal(x0, x0b)
    workers = BalancedShardLoader(tiny_shards, "train", batch_size=16, transform=_tf("cifar"), seed=3,
                                  num_workers=2, index_dir=idx)
    xw, yw, kw, _ = _epoch(workers, 0)
    assert torch.equal(xw, x0) and kw == k0

    # 2 ranks, 8 each: rank r holds positions r, r+2, ...; interleaved they are the 1-process draws, pixel for pixel
    ranks = [BalancedShardLoader(tiny_shards, "train", batch_size=8, transform=_tf("cifar"), seed=3, num_workers=0,
                                 rank=r, world_size=2, index_dir=idx) for r in (0, 1)]
    assert [len(r) for r in ranks] == [10, 10]  # 160 draws (159 rounded up to a multiple of 2), 80 a rank
    got = [_epoch(r, 0) for r in ranks]
    inter_x = torch.stack([got[0][0], got[1][0]], 1).flatten(0, 1)[:144]
    inter_k = [k for pair in zip(got[0][2], got[1][2]) for k in pair][:144]
    assert inter_k == k0 and torch.equal(inter_x, x0)
    assert not set(range(0, 160, 2)) & set(range(1, 160, 2))  # positions (draws may repeat a sample)


def test_stream_without_augmentation_gives_the_sequential_readers_images(tiny_shards, tmp_path):
    """train_aug=none: each drawn image is the one ShardLoader yields for that key (another reader of the same
    shards), and the labels are the tar's."""
    from bigltr.data import ShardLoader

    plain = ShardLoader(tiny_shards, "train", batch_size=32, transform=_tf("none"), train=False, num_workers=0)
    by_key = {k: x for xs, _, ks in plain for x, k in zip(xs, ks)}
    ld = BalancedShardLoader(tiny_shards, "train", batch_size=16, transform=_tf("none"), seed=0, num_workers=0,
                             index_dir=str(tmp_path / "index"))
    x, y, keys, _ = _epoch(ld, 2)
    assert len(by_key) == 159 and len(keys) == 144
    for i, k in enumerate(keys):
        assert torch.equal(x[i], by_key[k]), k

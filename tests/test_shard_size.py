"""Shard sizes: the converters' default layout (``--maxcount auto``: balanced shards, a power-of-two multiple of
them) and how ShardLoader assigns it to ranks; an explicit ``--maxcount N`` still fills shards of at most N.

Fast: the loader's rank arithmetic is checked on a demo-sized split through a stubbed ``read_info`` (the
constructor only does arithmetic on ``shard_lengths``); one small real conversion checks the end-to-end path.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bigltr.data.writer import AUTO, auto_shard_lengths, parse_maxcount, write_split

DEMO_TRAIN = 12406  # Fashion-MNIST-LT, IF 100, n_max 5000: the demo's train split
OLD_DEFAULT = [5000, 5000, 2406]  # what --maxcount 5000 (the default before "auto") made of it


# ----------------------------------------------------------------------------------------------- the rule
def test_auto_layout_of_the_demo_splits():
    assert auto_shard_lengths(DEMO_TRAIN) == [776] * 6 + [775] * 10
    assert auto_shard_lengths(2000) == [500] * 4  # demo val
    assert auto_shard_lengths(10000) == [625] * 16  # demo test
    assert len(auto_shard_lengths(115846)) == 128  # ImageNet-LT train
    assert auto_shard_lengths(999) == [999] and auto_shard_lengths(1) == [1] and auto_shard_lengths(0) == []


@pytest.mark.parametrize("n", [1, 499, 500, 999, 1000, 1001, 1980, 4321, 7300, 10847, 12406, 20000, 62500, 115846,
                               437513])
def test_auto_layout_is_balanced_bounded_and_rank_friendly(n):
    lengths = auto_shard_lengths(n)
    k = len(lengths)
    assert sum(lengths) == n and max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)  # deterministic: the longer shards first
    assert max(lengths) <= 1000 and (min(lengths) >= 500 or k == 1)
    m = k & -k  # the largest power of two dividing k
    assert k == -(-n // 1000) or m > 1  # only rounded up to a power-of-two multiple
    assert k < 2 * -(-n // 1000) + 1  # at most about twice ceil(n / 1000)
    if n >= 8000:
        assert k % 8 == 0  # 1, 2, 4 and 8 ranks get the same number of whole shards
    if n >= 64000:
        assert k % 64 == 0


@pytest.mark.parametrize("value, want", [("auto", AUTO), ("AUTO", AUTO), ("64", 64), (64, 64), (1e3, 1000)])
def test_parse_maxcount(value, want):
    assert parse_maxcount(value) == want


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "x", 0, 2.5, True, None])
def test_parse_maxcount_refuses(value):
    with pytest.raises(ValueError, match="maxcount must be 'auto' or an integer >= 1"):
        parse_maxcount(value)


def test_cli_default_is_auto_and_explicit_maxcount_is_kept(capsys):
    from bigltr.data.sources.cli import build_parser

    parse = build_parser().parse_args
    for fmt in ("idx", "imagefolder", "cifar"):
        assert parse([fmt, "--src", "s", "--out", "o"]).maxcount == AUTO
        assert parse([fmt, "--src", "s", "--out", "o", "--maxcount", "64"]).maxcount == 64
        assert parse([fmt, "--src", "s", "--out", "o", "--maxcount", "auto"]).maxcount == AUTO
    with pytest.raises(SystemExit):
        parse(["idx", "--src", "s", "--out", "o", "--maxcount", "0"])
    assert "--maxcount: maxcount must be 'auto' or an integer >= 1, got '0'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- the loader
def _plan(monkeypatch, lengths, world_size, rank=0, num_workers=1):
    """A training ShardLoader over a split with these shard lengths (no files: read_info is stubbed)."""
    import bigltr.data.loader as loader

    info = {"num_classes": 10, "splits": {"train": {
        "num_samples": sum(lengths), "shard_lengths": list(lengths),
        "filenames": [f"train-{i:06d}.tar" for i in range(len(lengths))]}}}
    monkeypatch.setattr(loader, "read_info", lambda root: info)
    return loader.ShardLoader("/nowhere", "train", batch_size=64, transform=None, train=True, rank=rank,
                              world_size=world_size, num_workers=num_workers)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8, 16])
def test_auto_layout_lets_ranks_read_disjoint_whole_shards(monkeypatch, world_size):
    lengths = auto_shard_lengths(DEMO_TRAIN)
    ranks = [_plan(monkeypatch, lengths, world_size, r) for r in range(world_size)]
    assert not any(ld._split_samples for ld in ranks)
    for epoch in (0, 1, 5):
        shards = [ld.shards_for_epoch(epoch) for ld in ranks]
        flat = [s for sh in shards for s in sh]
        assert len(flat) == len(set(flat)) == len(lengths)  # disjoint, all read
        assert {len(sh) for sh in shards} == {len(lengths) // world_size}
    used = {ld.num_samples for ld in ranks}
    assert len(used) == 1 and len({len(ld) for ld in ranks}) == 1  # same share, same batch count
    dropped = DEMO_TRAIN - world_size * used.pop()
    assert dropped == (0 if world_size == 1 else DEMO_TRAIN % len(lengths))  # 6 of 12,406


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_old_default_layout_splits_by_sample(monkeypatch, world_size):
    """The reason for the new default: 3 uneven shards make every rank read the whole split."""
    ld = _plan(monkeypatch, OLD_DEFAULT, world_size)
    assert ld._split_samples and len(ld.shards_for_epoch(0)) == 3
    assert ld.num_samples == DEMO_TRAIN // world_size - 1


def test_explicit_maxcount_1000_on_the_demo_still_splits_by_sample(monkeypatch):
    """Filled shards (12 x 1000 + 406) are uneven: the documented reason to prefer auto over a round N."""
    assert _plan(monkeypatch, [1000] * 12 + [406], 2)._split_samples
    assert not _plan(monkeypatch, auto_shard_lengths(DEMO_TRAIN), 2)._split_samples


# ----------------------------------------------------------------------------------------------- the writer
def _samples(n, label=lambda i: i % 3):
    return [(f"s_{i:05d}", np.full((2, 2), i % 256, np.uint8), label(i)) for i in range(n)]


def test_write_split_auto_balances_and_is_deterministic(tmp_path):
    items = _samples(2400)
    a = write_split(tmp_path / "a", "train", items, total=len(items))  # default: auto
    assert a["shard_lengths"] == [600] * 4 and [sum(h) for h in a["class_hist"]] == a["shard_lengths"]
    b = write_split(tmp_path / "b", "train", iter(items), total=len(items))
    assert a["checksums"] == b["checksums"]  # same input, same bytes
    c = write_split(tmp_path / "c", "train", items)  # a list: its length plans the shards
    assert c["checksums"] == a["checksums"]


def test_write_split_auto_with_fewer_samples_than_total_and_without_total(tmp_path):
    items = _samples(2400)
    short = write_split(tmp_path / "s", "train", iter(items[:2390]), total=2400)  # 10 skipped as undecodable
    assert short["shard_lengths"] == [600, 600, 600, 590]
    unknown = write_split(tmp_path / "u", "train", iter(items))  # no total: shards of at most 1000, filled
    assert unknown["shard_lengths"] == [1000, 1000, 400]
    more = write_split(tmp_path / "m", "train", iter(items), total=1200)  # a wrong total: never above the plan
    assert max(more["shard_lengths"]) <= 600 and sum(more["shard_lengths"]) == 2400


def test_explicit_maxcount_fills_at_most_n(tmp_path):
    items = _samples(2400)
    assert write_split(tmp_path / "n", "train", items, maxcount=1000)["shard_lengths"] == [1000, 1000, 400]
    assert write_split(tmp_path / "k", "train", items, maxcount=5000)["shard_lengths"] == [2400]
    with pytest.raises(ValueError, match="maxcount must be"):
        write_split(tmp_path / "z", "train", items, maxcount=0)


def test_write_split_auto_with_maxsize(tmp_path):
    items = _samples(2400)
    entry = write_split(tmp_path / "x", "train", items, maxsize=10_000)  # ~72 payload bytes per sample
    lengths = entry["shard_lengths"]
    assert sum(lengths) == 2400 and max(lengths) <= 600 and len(lengths) > 4
    assert {600, 1200, 1800} <= set(np.cumsum(lengths).tolist())  # the planned cuts stay where they were


# ----------------------------------------------------------------------------------------------- end to end
def test_converter_default_gives_rank_disjoint_shards(tmp_path):
    """idx with the default --maxcount: 1,200 train images -> 2 shards of 600; 2 ranks read one each, every sample
    once; _info.json records "auto"."""
    from bigltr.data import ShardLoader, build_transform
    from bigltr.data.sources.cli import main as make_shards_main
    from bigltr.data.synthetic import make_fake_idx

    make_fake_idx(tmp_path / "idx", per_class_train=130, per_class_test=100)
    out = tmp_path / "shards"
    make_shards_main(["idx", "--src", str(tmp_path / "idx"), "--out", str(out), "--imbalance", "1", "--n-max",
                      "120", "--val-per-class", "10", "--no-progress"])
    info = json.loads((out / "_info.json").read_text())
    assert info["source"]["maxcount"] == AUTO
    assert {s: e["shard_lengths"] for s, e in info["splits"].items()} == {
        "train": [600, 600], "val": [100], "test": [500, 500]}
    tf = build_transform(img_size=28, in_chans=1, mean=(0.5,), std=(0.5,), train=True, aug="none")
    keys, batches = [], []
    perm = np.random.default_rng([0, 0]).permutation(2)  # seed 0, epoch 0: the same on both ranks
    for rank in (0, 1):
        ld = ShardLoader(out, "train", batch_size=50, transform=tf, train=True, rank=rank, world_size=2,
                         num_workers=0)
        assert not ld._split_samples and ld.num_samples == 600
        assert [os.path.basename(p) for p in ld.shards_for_epoch()] == [f"train-{perm[rank]:06d}.tar"]
        ks = [k for _, _, kb in ld for k in kb]
        keys.append(ks)
        batches.append(len(ks) // 50)
    assert batches == [12, 12] and not set(keys[0]) & set(keys[1]) and len(set(keys[0]) | set(keys[1])) == 1200

"""Data faults never give a silent wrong result: truncated/unreadable shards, bad labels, corrupt images and
inconsistent _info.json are refused, or counted and logged (table in docs/data.md, "Failure behaviour").

Expected numbers are computed independently of the loader, with tarfile on the damaged files.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from bigltr.data import DataError, DataMissingError, check_trainable, read_info
from bigltr.data.info import INFO_NAME

import make_shards  # noqa: E402  (tools/ is on sys.path: tests/conftest.py)


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def root(tiny_shards, tmp_path) -> Path:
    """A private copy of the shared tiny shards (train 64+64+31, val 60, test 64+16; 10 classes)."""
    dst = tmp_path / "ds"
    shutil.copytree(tiny_shards, dst)
    return dst


def _info(root: Path) -> dict:
    return json.loads((root / INFO_NAME).read_text())


def _edit_info(root: Path, fn) -> None:
    info = _info(root)
    fn(info)
    (root / INFO_NAME).write_text(json.dumps(info))


def _drop_sizes(info: dict) -> None:
    """Make the _info.json look like one written before shard sizes were recorded."""
    for entry in info["splits"].values():
        entry.pop("sizes", None)


def _refresh_sizes(root: Path) -> None:
    """Record the current sizes and sha256 (a shard written that way, rather than damaged afterwards)."""
    def fn(info):
        for entry in info["splits"].values():
            entry["sizes"] = [os.path.getsize(root / f) for f in entry["filenames"]]
            entry["checksums"] = [hashlib.sha256((root / f).read_bytes()).hexdigest() for f in entry["filenames"]]
    _edit_info(root, fn)


def _members(shard: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(shard) as tf:
        return [(m, tf.extractfile(m).read()) for m in tf.getmembers()]


def _rewrite(shard: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def _key(name: str) -> str:
    return name.split(".", 1)[0]


def _cut(shard: Path, at: int) -> dict:
    """Truncate ``shard`` to ``at`` bytes; return what survives, by tarfile on the original: ``raw`` keys
    with at least one complete member, ``good`` keys whose members (.cls and .png) are all complete."""
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    complete: dict[str, list[bool]] = {}
    for m in members:
        complete.setdefault(_key(m.name), []).append(m.offset_data + m.size <= at)
    data = shard.read_bytes()
    shard.write_bytes(data[:at])
    return {"raw": {k for k, c in complete.items() if any(c)}, "good": {k for k, c in complete.items() if all(c)},
            "total": len(complete)}


def _member_offset(shard: Path, index: int, *, into_data: int = 0) -> int:
    """Byte offset of member ``index``'s header (or ``into_data`` bytes into its data)."""
    with tarfile.open(shard) as tf:
        m = tf.getmembers()[index]
    return m.offset_data + into_data if into_data else m.offset


def _keys_of(root: Path, split: str, skip: tuple[str, ...] = ()) -> set[str]:
    out = set()
    for f in _info(root)["splits"][split]["filenames"]:
        if f not in skip:
            out |= {_key(m.name) for m, _ in _members(root / f)}
    return out


def _loader(root, split, **kw):
    from bigltr.data import ShardLoader, build_transform

    tf = build_transform(img_size=28, in_chans=1, mean=(0.5,), std=(0.5,), train=False, aug="none")
    kw.setdefault("train", False)
    kw.setdefault("batch_size", 8)
    kw.setdefault("num_workers", 0)
    return ShardLoader(root, split, transform=tf, **kw)


def _epoch_keys(loader) -> list[str]:
    return [k for _, _, ks in loader for k in ks]


# ----------------------------------------------------------------------------------------------- 1a: sizes
def test_writer_records_sizes_and_truncation_is_refused_at_start(root):
    info = read_info(root)
    for entry in info["splits"].values():
        assert entry["sizes"] == [os.path.getsize(root / f) for f in entry["filenames"]]
    shard = root / "test-000000.tar"
    full = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: full // 2])
    msg = rf"truncated or modified shard .*test-000000\.tar: {full // 2} bytes, _info.json records {full}; " \
          r"re-copy it .*make_shards\.py verify"
    with pytest.raises(DataError, match=msg):
        read_info(root)
    with pytest.raises(DataError, match=msg):  # every loader (every rank) reads the info first
        _loader(root, "train", train=True)
    _edit_info(root, _drop_sizes)  # an _info.json from before sizes were recorded still loads
    assert "sizes" not in read_info(root)["splits"]["test"]
    _edit_info(root, lambda i: i["splits"]["val"].__setitem__("sizes", [1, 2]))
    with pytest.raises(DataError, match=r"splits\.val\.sizes"):
        read_info(root)


# ----------------------------------------------------------------------------------------------- 1b: runtime
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("where", ["mid_png", "after_cls"])
def test_truncated_eval_shard_raises_or_counts_partial(root, workers, where):
    _edit_info(root, _drop_sizes)  # only the runtime check is left
    shard = root / "test-000000.tar"
    # mid_png: cut inside sample 20's image; after_cls: cut right after sample 30's .cls (image missing)
    at = _member_offset(shard, 41, into_data=100) if where == "mid_png" else _member_offset(shard, 61)
    surv = _cut(shard, at)
    assert surv["total"] == 64 and len(surv["good"]) < 64
    with pytest.raises(DataError) as e:
        _epoch_keys(_loader(root, "test", num_workers=workers))
    assert type(e.value) is DataError  # not torch's wrapped worker exception
    assert f"test-000000.tar yielded {len(surv['raw'])} of 64 samples recorded in _info.json" in str(e.value)
    assert "eval_partial" in str(e.value) and "\n" not in str(e.value)

    ld = _loader(root, "test", num_workers=workers, allow_partial=True)
    keys = _epoch_keys(ld)
    assert set(keys) == surv["good"] | _keys_of(root, "test", skip=("test-000000.tar",))
    assert len(keys) == len(set(keys))
    assert ld.epoch_lost == 64 - len(surv["raw"]) and ld.lost_shards == ["test-000000.tar"]
    assert ld.epoch_skipped == len(surv["raw"] - surv["good"])  # a sample whose image was cut off
    assert ld.expected_samples == 80
    assert len(keys) + ld.epoch_lost + ld.epoch_skipped == ld.expected_samples


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_train_shard_is_counted_and_logged(root, workers, caplog):
    _edit_info(root, _drop_sizes)
    shard = root / "train-000001.tar"
    surv = _cut(shard, _member_offset(shard, 61, into_data=300))
    ld = _loader(root, "train", train=True, drop_last=False, shuffle_buffer=16, num_workers=workers)
    ld.set_epoch(3)
    with caplog.at_level(logging.WARNING, logger="bigltr.data.loader"):
        keys = _epoch_keys(ld)
    lost = 64 - len(surv["raw"])
    assert set(keys) == surv["good"] | _keys_of(root, "train", skip=("train-000001.tar",))
    assert ld.epoch_lost == lost > 0 and ld.lost == lost and ld.lost_shards == ["train-000001.tar"]
    assert ld.epoch_skipped == len(surv["raw"] - surv["good"]) == 1 and ld.expected_samples == 159
    warn = [r.getMessage() for r in caplog.records if "train-000001.tar yielded" in r.getMessage()]
    assert len(warn) == 1 and f"{lost} sample(s) missing" in warn[0] and "epoch 3" in warn[0]
    _epoch_keys(ld)  # counters are per epoch, totals accumulate
    assert ld.epoch_lost == lost and ld.lost == 2 * lost


def test_unreadable_shard_of_the_right_size(root, caplog):
    """Same byte size as recorded (passes the start-up check), content garbage: every sample lost."""
    shard = root / "train-000002.tar"
    shard.write_bytes(b"\x00garbage" * (shard.stat().st_size // 8))
    _refresh_sizes(root)
    read_info(root)
    ld = _loader(root, "train", train=True, drop_last=False, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="bigltr.data.loader"):
        keys = _epoch_keys(ld)
    assert len(keys) == 128 and ld.epoch_lost == 31 and ld.lost_shards == ["train-000002.tar"]
    assert any("train-000002.tar yielded 0 of 31" in r.getMessage() and "read error" in r.getMessage()
               for r in caplog.records)


def test_split_by_sample_counts_loss_once(root):
    """1 val shard, 2 ranks (every rank reads every shard): both ranks refuse, loss counted on rank 0 only."""
    _edit_info(root, _drop_sizes)
    surv = _cut(root / "val-000000.tar", _member_offset(root / "val-000000.tar", 40))
    for r in range(2):
        with pytest.raises(DataError, match=f"val-000000.tar yielded {len(surv['raw'])} of 60"):
            _epoch_keys(_loader(root, "val", rank=r, world_size=2))
    lds = [_loader(root, "val", rank=r, world_size=2, allow_partial=True, num_workers=1) for r in range(2)]
    keys = [set(_epoch_keys(ld)) for ld in lds]
    assert keys[0] | keys[1] == surv["good"] and not keys[0] & keys[1]
    assert [ld.epoch_lost for ld in lds] == [60 - len(surv["raw"]), 0]


# ----------------------------------------------------------------------------------------------- 2: labels
def _set_label(root: Path, shard_name: str, index: int, value: bytes) -> str:
    """Rewrite sample ``index``'s .cls in a shard (sizes re-recorded: a shard written that way); its key."""
    shard = root / shard_name
    members = _members(shard)
    cls = [i for i, (m, _) in enumerate(members) if m.name.endswith(".cls")][index]
    members[cls] = (members[cls][0], value)
    _rewrite(shard, members)
    _refresh_sizes(root)
    return _key(members[cls][0].name)


@pytest.mark.parametrize("split, shard, value, workers", [
    ("train", "train-000001.tar", b"99", 0),
    ("train", "train-000000.tar", b"-1", 2),
    ("val", "val-000000.tar", b"abc", 2),
    ("val", "val-000000.tar", b"10", 0),
])
def test_bad_label_is_one_clean_data_error(root, split, shard, value, workers):
    key = _set_label(root, shard, 5, value)
    ld = _loader(root, split, train=split == "train", num_workers=workers)
    with pytest.raises(DataError) as e:
        _epoch_keys(ld)
    msg = str(e.value)
    assert type(e.value) is DataError and "\n" not in msg and "Traceback" not in msg
    assert f"{shard}: sample {key}: label" in msg
    assert ("is not an integer" if value == b"abc" else "outside [0, 10)") in msg


# ----------------------------------------------------------------------------------------------- 3: images
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_skipped_with_a_named_warning(root, workers, caplog):
    shard = root / "test-000001.tar"
    members = _members(shard)
    png = [i for i, (m, _) in enumerate(members) if m.name.endswith(".png")][3]
    m, data = members[png]
    members[png] = (m, data[:8] + bytes(len(data) - 8))  # PNG signature, then zeros
    _rewrite(shard, members)
    _refresh_sizes(root)
    bad = _key(m.name)
    ld = _loader(root, "test", num_workers=workers)
    with caplog.at_level(logging.WARNING, logger="bigltr.data.loader"):
        keys = _epoch_keys(ld)
    assert set(keys) == _keys_of(root, "test") - {bad} and len(keys) == 79
    assert ld.epoch_skipped == 1 and ld.skipped == 1 and ld.epoch_lost == 0
    if workers == 0:  # worker processes log to their own stderr, not to caplog
        msgs = [r.getMessage() for r in caplog.records]
        assert any(f"test-000001.tar: sample {bad}: .png does not decode (" in s for s in msgs), msgs


# ----------------------------------------------------------------------------------------------- 4: _info.json
def test_info_problems_are_data_errors(root):
    def counts_off(info):
        info["class_counts"][3] = 120
    _edit_info(root, counts_off)
    with pytest.raises(DataError, match=r"class_counts\[3\]=120 but the train shards' class_hist sums to 18"):
        read_info(root)
    _edit_info(root, lambda i: i.__setitem__("class_counts", [1, 2]))
    with pytest.raises(DataError, match="class_counts"):
        read_info(root)
    (root / INFO_NAME).write_text("{ not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_info(root)
    with pytest.raises(DataMissingError, match="no dataset folder"):
        read_info(root / "nowhere")


def test_missing_shard_is_data_error_and_file_not_found(root):
    (root / "val-000000.tar").unlink()
    with pytest.raises(DataMissingError, match="val-000000.tar, which is missing") as e:
        read_info(root)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, DataError)


def test_check_trainable(tiny_shards):
    info = read_info(tiny_shards)
    check_trainable(info)
    info["class_counts"][9] = 0
    with pytest.raises(DataError, match=r"no training images: 9 \('Ankle boot'\).*at least one training image"):
        check_trainable(info)
    del info["splits"]["train"]
    with pytest.raises(DataError, match="no 'train' split"):
        check_trainable(info)


def test_config_fault_keys():
    from bigltr.config import ConfigError, build_config

    cfg = build_config([])
    assert cfg.data.max_skip_fraction == 0.01 and cfg.data.eval_partial is False
    assert build_config(["data.eval_partial=true", "data.max_skip_fraction=0.5"]).data.eval_partial
    with pytest.raises(ConfigError, match="data.max_skip_fraction"):
        build_config(["data.max_skip_fraction=1.0"])


# ----------------------------------------------------------------------------------------------- 1c: verify
def test_verify_clean_and_damaged(root, capsys):
    with pytest.raises(SystemExit) as e:
        make_shards.main(["verify", str(root), "--decode"])
    out = capsys.readouterr().out.splitlines()
    assert e.value.code == 0 and out == ["verified 6 shard(s), 299 sample(s) read: OK"]

    key = _set_label(root, "test-000001.tar", 2, b"77")  # a shard written with a bad label (sizes re-recorded)
    cut = root / "train-000000.tar"
    full = cut.stat().st_size
    surv = _cut(cut, _member_offset(cut, 20))  # damaged after writing: 10 whole samples survive
    (root / "val-000000.tar").unlink()
    with pytest.raises(SystemExit) as e:
        make_shards.main(["verify", str(root)])
    out = capsys.readouterr().out.splitlines()
    assert e.value.code == 1 and len(surv["raw"]) == 10
    assert out[-1] == f"verified 6 shard(s), {10 + 64 + 31 + 80} sample(s) read: 5 problem(s)"
    assert sorted(out[:-1]) == sorted([
        f"{cut}: {cut.stat().st_size} bytes, _info.json records {full} (truncated or modified)",
        f"{cut}: sha256 differs from _info.json (corrupted or modified)",
        f"{cut}: 10 sample(s), _info.json records 64",
        f"{root / 'test-000001.tar'}: sample {key}: label 77 outside [0, 10)",
        f"{root / 'val-000000.tar'}: missing (split 'val' lists it)",
    ])
    with pytest.raises(SystemExit) as e:
        make_shards.main(["verify", str(root), "--split", "test"])
    out = capsys.readouterr().out.splitlines()
    assert e.value.code == 1 and len(out) == 2 and "label 77" in out[0] and "2 shard(s)" in out[1]


# ----------------------------------------------------------------------------------------------- 5: trainer start
def _train(root: Path, tmp_path: Path, capsys, *extra) -> tuple[int, str]:
    """The real trainer (in this process) on `root`, one short stage 1; (exit status, stderr)."""
    from bigltr.train import main

    capsys.readouterr()
    code = main(["recipe=tiny_test", f"data.root={root}", f"out={tmp_path / 'run'}", "stage=1", "stage1.epochs=1",
                 f"data.dali_index_dir={tmp_path / 'idx'}", *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("key, value", [
    ("class_counts", "100000000000000000000"), ("class_counts", "1" + "0" * 400), ("class_counts", "1e20"),
    ("splits.train.shard_lengths", "1" + "0" * 400), ("splits.test.sizes", "1e20"),
])
def test_huge_counts_are_one_line_data_errors(root, tmp_path, capsys, key, value):
    """A count of 1e20 or 10**400 in _info.json (here without class_hist, as in folders of older converters, so no
    sum can disagree) is a DataError naming file and key, and the trainer's exit 2 with one line; 10**20 in
    class_counts used to train to the end and crash in the plots (OverflowError traceback, exit 1)."""
    def fn(info):
        for entry in info["splits"].values():
            entry.pop("class_hist", None)
        obj = info
        for k in key.split(".")[:-1]:
            obj = obj[k]
        obj[key.split(".")[-1]][0] = "@@"
    _edit_info(root, fn)
    (root / INFO_NAME).write_text((root / INFO_NAME).read_text().replace('"@@"', value))
    with pytest.raises(DataError, match=rf"{INFO_NAME}: key '{key}\[0\]' is .*counts must be integers in "
                                        r"\[0, 2\*\*53\)"):
        read_info(root)
    code, err = _train(root, tmp_path, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines[-1]) < 300
    assert lines[-1].startswith(f"bigltr: data error: {root / INFO_NAME}: key '{key}[0]' is ")


def _swap_classes(info: dict, a: int, b: int, *, hist: bool = True) -> None:
    """Swap classes a and b in class_counts and (hist) in every train class_hist: consistent, so read_info's sum
    check passes, but not what the shards hold."""
    cc = info["class_counts"]
    cc[a], cc[b] = cc[b], cc[a]
    for h in info["splits"]["train"]["class_hist"] if hist else ():
        h[a], h[b] = h[b], h[a]
    if not hist:
        for entry in info["splits"].values():
            entry.pop("class_hist", None)


@pytest.mark.parametrize("hist", [True, False])
def test_swapped_class_counts_stop_the_trainer_at_start(root, tmp_path, capsys, hist):
    """class_counts and class_hist swapped consistently for two classes (or, in a folder without class_hist,
    class_counts alone): read_info cannot notice, `make_shards verify` does, and so does the trainer now, at
    start-up, before any training (it used to train with the wrong Many/Few groups and loss weights)."""
    from bigltr.data.verify import check_label_counts

    _edit_info(root, lambda info: _swap_classes(info, 0, 3, hist=hist))
    read_info(root)  # consistent: passes
    with pytest.raises(SystemExit) as e:
        make_shards.main(["verify", str(root)])
    assert e.value.code == 1  # per shard against class_hist; without class_hist, the train totals vs class_counts
    with pytest.raises(DataError, match=r"class_hist of train-000000\.tar records \d+ sample\(s\) of class 0 "
                       if hist else r"class_counts\[0\]=18 \('T-shirt/top'\) but the train shards' labels hold 40"):
        check_label_counts(root, read_info(root), index_dir=str(tmp_path / "idx"))
    code, err = _train(root, tmp_path, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and last.startswith(f"bigltr: data error: {root / INFO_NAME}: ")
    assert "loss weights and the Many/Medium/Few groups" in last
    assert not (tmp_path / "run" / "stage1").exists()  # stopped before training
    _edit_info(root, lambda info: _swap_classes(info, 0, 3, hist=hist))  # swapped back: passes
    check_label_counts(root, read_info(root), index_dir=str(tmp_path / "idx"))


# ----------------------------------------------------------------------------------------------- 6: class-balanced stream
def _balanced(root, tmp, **kw):
    from bigltr.data import build_transform
    from bigltr.data.balanced_stream import BalancedShardLoader

    tf = build_transform(img_size=28, in_chans=1, mean=(0.5,), std=(0.5,), train=True, aug="cifar")
    kw.setdefault("num_workers", 0)
    return BalancedShardLoader(root, "train", batch_size=16, transform=tf, index_dir=str(tmp / "index"), **kw)


@pytest.mark.parametrize("decode_check", [True, False])
def test_balanced_stream_never_draws_bad_samples_and_counts_them_every_epoch(root, tmp_path, caplog, decode_check):
    """A corrupt image, a sample without .cls and a truncated shard. The sample without .cls and the truncated shard's
    loss are found at start-up from the tar headers, never drawn, and counted every epoch on rank 0 only (every rank
    indexes every shard), so data.max_skip_fraction applies. The corrupt image: with decode_check found at start-up
    likewise; without (the default: converters decode every image before writing it) drawn, skipped where it is
    read and counted once per draw, on the rank that drew it."""
    shard = root / "train-000000.tar"
    members = _members(shard)
    png = [i for i, (m, _) in enumerate(members) if m.name.endswith(".png")][3]
    m, data = members[png]
    members[png] = (m, data[:8] + bytes(len(data) - 8))  # PNG signature, then zeros
    bad = _key(m.name)
    cls = [i for i, (m, _) in enumerate(members) if m.name.endswith(".cls")][7]
    unlabelled = _key(members[cls][0].name)
    del members[cls]
    _rewrite(shard, members)
    _edit_info(root, _drop_sizes)
    cut = root / "train-000001.tar"
    surv = _cut(cut, _member_offset(cut, 61, into_data=300))
    lost = 64 - len(surv["raw"])
    static = 1 + len(surv["raw"] - surv["good"]) + decode_check  # never drawn
    with caplog.at_level(logging.WARNING, logger="bigltr.data.balanced_stream"):
        lds = [_balanced(root, tmp_path, rank=r, world_size=2, seed=1, decode_check=decode_check) for r in (0, 1)]
    msgs = [r.getMessage() for r in caplog.records]
    assert any(f"train-000000.tar: sample {bad}: .png does not decode (" in s for s in msgs) == decode_check, msgs
    assert any(f"train-000000.tar: sample {unlabelled}: no .cls label" in s for s in msgs), msgs
    assert any("train-000001.tar holds" in s and f"{lost} sample(s) missing from every epoch" in s for s in msgs)
    usable = (_keys_of(root, "train", skip=("train-000001.tar",)) | surv["good"]) - {unlabelled}
    if decode_check:
        usable -= {bad}
    assert set(lds[0].sample_keys) == usable and len(usable) == 159 - static - lost
    total_skipped = times_drawn = 0
    for epoch in (0, 1):
        drawn, hits = set(), []
        for ld in lds:
            ld.set_epoch(epoch)
            hits.append(sum(ld.sample_keys[j] == bad for j in ld.draws()[1]))
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="bigltr.data.balanced_stream"):
                drawn |= set(_epoch_keys(ld))
            if hits[-1] and not decode_check:
                assert any(f"sample {bad}: UnidentifiedImageError" in r.getMessage() for r in caplog.records)
        assert drawn <= usable and not {bad, unlabelled} & drawn
        read_fails = [0, 0] if decode_check else hits
        assert [ld.epoch_skipped for ld in lds] == [static + read_fails[0], read_fails[1]]
        assert [ld.epoch_lost for ld in lds] == [lost, 0]
        total_skipped += static + read_fails[0]
        times_drawn += sum(hits)
    assert decode_check or times_drawn > 0  # the corrupt image was drawn (and skipped) in some epoch
    assert lds[0].skipped == total_skipped and lds[0].lost_shards == ["train-000001.tar"] and lds[1].lost_shards == []


def test_balanced_stream_bad_label_stops_at_start(root, tmp_path):
    key = _set_label(root, "train-000002.tar", 4, b"12")
    with pytest.raises(DataError) as e:
        _balanced(root, tmp_path)
    assert f"train-000002.tar: sample {key}: label 12 outside [0, 10)" in str(e.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_balanced_stream_image_damaged_after_start_is_skipped_and_counted(root, tmp_path, workers, caplog):
    """The shard changes while the run reads it: a drawn image no longer decodes (skipped, logged, counted; its
    batch is one smaller per draw of it); every shard gone: the first batch is a DataError, not a hang."""
    ld = _balanced(root, tmp_path, num_workers=workers, seed=5)
    _, samples = ld.draws(0)
    victim = ld.sample_keys[samples[0]]
    hits = int(sum(ld.sample_keys[s] == victim for s in samples))
    shard = next(root / f for f in _info(root)["splits"]["train"]["filenames"]
                 if any(_key(m.name) == victim for m, _ in _members(root / f)))
    with tarfile.open(shard) as tf:
        m = next(m for m in tf.getmembers() if m.name == f"{victim}.png")
    with open(shard, "r+b") as f:  # same size, image bytes zeroed after the PNG signature
        f.seek(m.offset_data + 8)
        f.write(bytes(m.size - 8))
    with caplog.at_level(logging.WARNING, logger="bigltr.data.balanced_stream"):
        batches = list(ld)
    keys = [k for _, _, ks in batches for k in ks]
    assert victim not in keys and len(keys) == len(samples) - hits and ld.epoch_skipped == hits >= 1
    assert len(batches) == len(ld) and batches[0][0].shape[0] == 16 - sum(ld.sample_keys[s] == victim
                                                                          for s in samples[:16])
    if workers == 0:
        assert any(f"sample {victim}: " in r.getMessage() and "skipping a bad sample" in r.getMessage()
                   for r in caplog.records)
    for f in _info(root)["splits"]["train"]["filenames"]:
        (root / f).unlink()
    with pytest.raises(DataError, match=r"none of the 16 images of batch 0 could be read, e\.g\. .*No such file"):
        list(ld)

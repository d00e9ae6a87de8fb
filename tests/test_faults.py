"""Faults a demanding user meets: crafted checkpoints, stop requests in short epochs, divergence, empty training,
a run directory used twice, changed configs on resume, unreadable checkpoints, a full disk, bad paths.

Each test fails on the trainer as it was before these guards (issue: "never a silent wrong result, never foreign
code"). Single-process runs go through `bigltr.train.main` in this process; runs that must overlap or be killed
are subprocesses."""
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Proc

from bigltr.engine.resume import resume_candidates

ROOT = Path(__file__).resolve().parent.parent
MARKER_CODE = "import pathlib; pathlib.Path({path!r}).write_text('pwned')"


class _Evil:
    """Unpickling this runs code: what a crafted checkpoint file would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (MARKER_CODE.format(path=str(self.marker)),))


def _args(shards, out, *extra):
    return ["recipe=tiny_test", f"data.root={shards}", "data.train_aug=none", f"out={out}", *extra]


def _main(*args):
    from bigltr.train import main

    return main(list(args))


# ------------------------------------------------------------------------------------------ foreign code
def test_resume_never_unpickles_foreign_code(tiny_shards, tmp_path, capsys):
    """A pickle that runs code, planted as DCP's .metadata of the newest checkpoint, is refused (never executed):
    resume falls back to the older intact checkpoint and says which one it skipped. With no intact checkpoint
    left it is an error naming the folder. DCP's non-tensor items and DeepSpeed's files go through the same
    safe loader."""
    from bigltr.checkpoint import CheckpointError, dcp_load, verify_torch_files

    run, marker = tmp_path / "run", tmp_path / "pwned"
    assert _main(*_args(tiny_shards, run, "stage=1", "stage1.epochs=2")) == 0
    newest, older = resume_candidates(run / "stage1")
    (newest / "dcp" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    (run / "results.json").unlink()  # so that resume=auto goes back to the stage-1 checkpoints
    capsys.readouterr()
    assert _main(*_args(tiny_shards, run, "stage=1", "stage1.epochs=2", "resume=auto")) == 0
    err = capsys.readouterr().err
    assert not marker.exists()
    assert f"skipping resume checkpoint {newest}" in err and "is not a DCP metadata class" in err, err
    assert f"resuming {older}" in err
    # older intact one gone too: a clear error naming the folder, exit 4, still nothing executed
    for d in resume_candidates(run / "stage1"):
        (d / "dcp" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    (run / "results.json").unlink()
    assert _main(*_args(tiny_shards, run, "stage=1", "stage1.epochs=2", "resume=auto")) == 4
    assert "no readable resume checkpoint in" in capsys.readouterr().err and not marker.exists()

    # DCP's non-tensor items: the default planner loads them with weights_only=False
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(2), "hyper": _Evil(marker)}, checkpoint_id=str(tmp_path / "items"), no_dist=True)
    with pytest.raises(CheckpointError):
        dcp_load({"w": torch.zeros(2), "hyper": None}, tmp_path / "items", no_dist=True)
    assert not marker.exists()
    ok = {"w": torch.zeros(2), "lr": None}
    dcp.save({"w": torch.ones(2), "lr": 0.5}, checkpoint_id=str(tmp_path / "plain"), no_dist=True)
    dcp_load(ok, tmp_path / "plain", no_dist=True)
    assert ok["lr"] == 0.5 and torch.equal(ok["w"], torch.ones(2))

    # DeepSpeed folders are verified before DeepSpeed (weights_only=False) sees them
    ds = tmp_path / "ds" / "state"
    ds.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(1)}}, ds / "mp_rank_00_model_states.pt")
    verify_torch_files(ds.parent)
    torch.save({"optimizer_state_dict": _Evil(marker)}, ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="refusing to load .*zero_pp_rank_0"):
        verify_torch_files(ds.parent)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ stop requests
def test_stop_request_is_honoured_when_epochs_are_shorter_than_the_check_interval(tiny_shards, tmp_path):
    """9 steps per epoch, checks every 10 steps: the stop must come at global step 10 or an epoch end, not never."""
    run = tmp_path / "run"
    p = Proc([sys.executable, "-m", "bigltr.train", *_args(tiny_shards, run, "stage=1", "stage1.epochs=6",
                                                         "preempt_check_every=10")])
    p.wait_for("stage1 epoch 1/6")
    p.p.send_signal(signal.SIGTERM)
    rc, log = p.finish()
    assert rc == 75, log
    meta = torch.load(resume_candidates(run / "stage1")[0] / "meta.pt", weights_only=True)
    assert meta["epoch"] <= 3, meta["epoch"]  # within at most 10 steps plus one epoch end of the signal


# ------------------------------------------------------------------------------------------ divergence, empty runs
def test_divergence_stops_with_an_error_and_keeps_a_finite_resume_point(tiny_shards, tmp_path, capsys):
    run = tmp_path / "nan"
    code = _main(*_args(tiny_shards, run, "stage=1", "stage1.lr=1e4", "ckpt_every_steps=1",
                        "preempt_check_every=1000"))
    err = capsys.readouterr().err
    assert code == 3, err
    assert "training diverged: stage 1: the " in err and "became non-finite (nan/inf)" in err and "epoch 1" in err
    assert not (run / "results.json").exists() and not (run / "stage1" / "best.pt").exists()
    # periodic checkpoints are written only after the loss was checked: every one holds finite weights
    for ckpt in resume_candidates(run / "stage1"):
        state = {}
        from bigltr.checkpoint import dcp_load

        meta = torch.load(ckpt / "meta.pt", weights_only=True)
        assert meta["batch"] >= 1
        md = __import__("bigltr.checkpoint", fromlist=["read_dcp_metadata"]).read_dcp_metadata(ckpt / "dcp")
        for key, item in md.state_dict_metadata.items():
            if key.startswith("model.") and hasattr(item, "size"):
                state[key] = torch.empty(item.size, dtype=item.properties.dtype)
        dcp_load(state, ckpt / "dcp", no_dist=True)
        assert state and all(torch.isfinite(v).all() for v in state.values())

    assert _main(*_args(tiny_shards, tmp_path / "big", "stage1.batch_size=100000")) == 2
    assert "stage1.batch_size=100000 gives 0 training steps per epoch" in capsys.readouterr().err
    for bad in ("stage1.weight_decay=inf", "stage2.lr=nan", "stage1.weight_decay=.inf"):
        assert _main(*_args(tiny_shards, tmp_path / "inf", bad)) == 2
        assert "expects a finite number" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ run directory
def test_one_run_per_directory_and_resume_keeps_its_config(tiny_shards, tmp_path, capsys):
    run = tmp_path / "shared"
    a = Proc([sys.executable, "-m", "bigltr.train", *_args(tiny_shards, run, "stage=1", "stage1.epochs=40")])
    a.wait_for("stage1 epoch 1/40")
    assert _main(*_args(tiny_shards, run, "seed=2")) == 2  # a second run into the same out=
    err = capsys.readouterr().err
    assert f"{run} is in use by another run (host" in err and f"pid {a.p.pid}" in err, err
    assert "seed: 0" in (run / "config.yaml").read_text()
    a.wait_for("stage1 epoch 2/40")  # epoch 1's checkpoint is written: there is something to resume
    os.kill(a.p.pid, signal.SIGKILL)  # a crash: the lock is left behind, stale
    a.p.wait()
    assert (run / ".bigltr.lock").exists()
    # resume with a different model: refused, naming the key; config.yaml keeps the model the checkpoints hold
    assert _main(*_args(tiny_shards, run, "stage=1", "stage1.epochs=40", "resume=auto",
                        "model.name=resnet34_cifar")) == 2
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and "model.name: 'resnet32_cifar' -> 'resnet34_cifar'" in err, err
    assert "resnet32_cifar" in (run / "config.yaml").read_text()
    # allowed changes (epochs, logging) are listed and the run continues
    assert _main(*_args(tiny_shards, run, "stage=1", "stage1.epochs=2", "resume=auto", "log_every=7")) == 0
    err = capsys.readouterr().err
    assert "changed since the run started: " in err and "stage1.epochs: 40 -> 2" in err and "log_every" in err
    assert not (run / ".bigltr.lock").exists()  # released on exit

    # bad paths and files: one clear line each
    (tmp_path / "afile").write_text("x")
    assert _main(*_args(tiny_shards, tmp_path / "afile")) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    (run / "results.json").write_text('{"stage1": {"val"')  # truncated
    assert _main(*_args(tiny_shards, run, "stage=2", "stage2.epochs=1")) == 2
    assert f"{run / 'results.json'} is not readable JSON" in capsys.readouterr().err
    (run / "results.json").unlink()
    assert _main(*_args(tiny_shards, run, "stage=2", "stage2.epochs=1")) == 0
    capsys.readouterr()
    assert _main(*_args(tiny_shards, tmp_path / "s2", "stage=2",
                        f"stage1_checkpoint={run / 'stage2' / 'best.pt'}")) == 2
    assert "is a stage-2 checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ full disk
def test_a_full_disk_says_so_and_leaves_no_debris(tiny_shards, tmp_path, capsys):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        code = _main(*_args(tiny_shards, mnt / "run", "stage=1", "stage1.epochs=3"))
        err = capsys.readouterr().err
        assert code == 4, err
        assert "checkpoint error: no space left writing " + str(mnt / "run") in err, err
        assert not list((mnt / "run").rglob(".tmp-*")) and not list((mnt / "run").rglob(".*.tmp-*"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


# ------------------------------------------------------------------------------------------ a rank's error path
def test_an_error_on_one_rank_reaches_the_launcher(tiny_shards, tmp_path):
    """Rank 1 meets a bad label in the validation shard while rank 0 waits in the evaluation's gather: rank 1's
    one-line message and exit code reach torchrun, nothing aborts (no SIGABRT from tearing gloo down under a
    pending collective), and the job ends well before the collective timeout."""
    import shutil
    import tarfile
    import time

    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data)
    shard = data / "val-000000.tar"  # one shard, 2 ranks: split by sample, sample 5 (odd) is rank 1's
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    i = [k for k, (m, _) in enumerate(members) if m.name.endswith(".cls")][5]
    members[i] = (members[i][0], b"99")
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, b in members:
            m.size = len(b)
            tf.addfile(m, __import__("io").BytesIO(b))
    info = json.loads((data / "_info.json").read_text())
    info["splits"]["val"]["sizes"] = [shard.stat().st_size]
    info["splits"]["val"].pop("checksums", None)
    (data / "_info.json").write_text(json.dumps(info))

    t0 = time.time()
    p = Proc([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "bigltr.train", *_args(data, tmp_path / "run", "stage=1", "stage1.epochs=1", "dist.world_size=2",
                                            "dist.timeout_s=300")])
    rc, log = p.finish(timeout=200)
    assert rc != 0 and time.time() - t0 < 150, log[-3000:]
    assert "bigltr: data error:" in log and "val-000000.tar: sample" in log and "outside [0, 10)" in log, log[-3000:]
    assert "terminate called" not in log and "SIGABRT" not in log, log[-3000:]


# ----------------------------------------------------------------------------------- bigltr-eval / -export inputs
def _model_checkpoint(path: Path, shards: Path, **extra) -> dict:
    """A stage-2 best.pt as the trainer writes it (the real model code, tiny_test's config), with `extra` fields."""
    from bigltr.checkpoint import save_checkpoint
    from bigltr.config import build_config, to_dict
    from bigltr.models import build_model

    torch.manual_seed(0)
    cfg = build_config(["recipe=tiny_test", f"data.root={shards}"])
    model = build_model(cfg.model.name, 10, in_chans=cfg.data.in_chans)
    state = {"stage": 2, "epoch": 1, "model": model.state_dict(), "val_all": 10.0, "config": to_dict(cfg), **extra}
    save_checkpoint(state, path)
    return state


def test_eval_and_export_refuse_non_finite_weights(tiny_shards, tmp_path):
    """A best.pt whose classifier holds a nan: bigltr-eval and bigltr-export exit 3 with one line naming the
    tensor (they reported 10.00 / "logits match within nan" and exited 0). The check is in the one reader both
    use, load_run_checkpoint, so an inf elsewhere is named too."""
    from bigltr.checkpoint import save_checkpoint

    best = tmp_path / "run" / "stage2" / "best.pt"
    state = _model_checkpoint(best, tiny_shards)
    state["model"]["classifier.weight"][3, 5] = float("nan")
    save_checkpoint(state, best)
    bin_ = Path(sys.executable).parent
    for argv in ([str(bin_ / "bigltr-eval"), str(best), f"data.root={tiny_shards}"],
                 [str(bin_ / "bigltr-export"), str(tmp_path / "run"), str(tmp_path / "hub")]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert r.returncode == 3, (argv, r.returncode, r.stderr[-2000:])
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert "tensor 'classifier.weight' (10, 64) holds non-finite values (1 nan, 0 inf of 640)" in r.stderr
        assert str(best) in r.stderr and r.stdout == ""
    assert not (tmp_path / "hub").exists()
    state["model"]["classifier.weight"][3, 5] = 0.0
    key = next(k for k in state["model"] if k.endswith("running_var"))
    state["model"][key][0] = float("inf")
    save_checkpoint(state, best)
    from bigltr.checkpoint import NonFiniteWeightsError, load_run_checkpoint

    with pytest.raises(NonFiniteWeightsError, match=f"tensor '{key}' .* 1 inf"):
        load_run_checkpoint(best)


def test_eval_refuses_shards_of_another_class_order(tiny_shards, tmp_path, capsys):
    """Checkpoints store the class names (and category ids) of their data; bigltr-eval on shards with the same
    class count in another order exits 2 naming the first differing class (it printed regrouped numbers and exited
    0). A checkpoint from before class names were stored is evaluated with a warning that it cannot be checked."""
    import shutil

    from bigltr.evaluate import main as evaluate

    info = json.loads((tiny_shards / "_info.json").read_text())
    other = tmp_path / "other_order"  # the same images, converted with the class list in another order
    shutil.copytree(tiny_shards, other)
    swapped = info["classes"][:]
    swapped[1], swapped[2] = swapped[2], swapped[1]
    (other / "_info.json").write_text(json.dumps({**info, "classes": swapped}))
    ckpt = tmp_path / "best.pt"
    _model_checkpoint(ckpt, tiny_shards, classes=info["classes"])
    assert evaluate([str(ckpt), f"data.root={other}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigltr-eval: class mismatch: class 1 is ") and err.count("\n") == 1, err
    assert f"{info['classes'][1]!r} in the checkpoint but {info['classes'][2]!r} in the data" in err, err
    assert evaluate([str(ckpt), f"data.root={tiny_shards}"]) == 0  # its own data: no warning
    assert capsys.readouterr().err == ""
    legacy = tmp_path / "legacy.pt"
    _model_checkpoint(legacy, tiny_shards)  # no "classes": saved before bigltr stored them
    assert evaluate([str(legacy), f"data.root={other}"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("bigltr-eval: warning: ") and "stores no class names" in err and err.count("\n") == 1
    # iNat-style category ids are compared too
    from bigltr.checkpoint import class_mismatch

    ck = {"classes": ["a", "b"], "category_ids": [7, 9]}
    assert class_mismatch(ck, {"classes": ["a", "b"], "category_ids": [7, 9]}) is None
    assert class_mismatch(ck, {"classes": ["a", "b"], "category_ids": [7, 8]}) == \
        "category id 1 is '9' in the checkpoint but '8' in the data"

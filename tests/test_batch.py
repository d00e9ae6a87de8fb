"""`batch_size` is the GLOBAL batch on any launch (bigltr.config.batch_plan): one process with gradient accumulation
trains the same update as one process with the whole batch; a global batch that does not split over the launched
processes is a start-up config error naming both numbers. (Two gloo ranks against one process: test_distributed.)"""
import json

import pytest
import torch

from bigltr.config import ConfigError, batch_plan, build_config


def test_batch_plan_splits_the_global_batch_or_names_both_numbers():
    cfg = build_config(["recipe=inat2018"])
    assert cfg.stage1.batch_size == 512  # the paper's global batch
    assert batch_plan(cfg.stage1, 8, "stage1").record() == {"global": 512, "processes": 8, "per_process": 64,
                                                            "accum_steps": 1}
    assert batch_plan(cfg.stage1, 1, "stage1").per_process == 512
    cfg = build_config(["recipe=inat2018", "stage1.micro_batch_size=16"])
    plan = batch_plan(cfg.stage1, 8, "stage1")
    assert (plan.per_process, plan.accum_steps) == (16, 4)
    assert plan.describe() == "global batch 512 = 8 process(es) x 16 per process x 4 accumulation step(s)"
    with pytest.raises(ConfigError, match=r"global batch 512 does not split over 3 processes"):
        batch_plan(cfg.stage1, 3, "stage1")
    with pytest.raises(ConfigError, match=r"stage1.micro_batch_size': 48 does not divide the 64 images"):
        batch_plan(build_config(["recipe=inat2018", "stage1.micro_batch_size=48"]).stage1, 8, "stage1")
    with pytest.raises(ConfigError, match="larger than stage2.batch_size"):
        build_config(["recipe=tiny_test", "stage2.micro_batch_size=17"])


def test_a_launch_the_global_batch_does_not_split_over_is_refused_at_start(monkeypatch, tmp_path, capsys):
    from bigltr.train import main

    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun / accelerate launch set it
    assert main(["recipe=tiny_test", f"out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "stage1.batch_size': the global batch 16 does not split over 3 processes" in err
    assert not (tmp_path / "run").exists()


def test_accumulated_micro_batches_train_the_same_update_as_the_whole_batch(tiny_shards, tmp_path):
    """One process: batch 32 in one pass vs 4 micro-batches of 8 (accumulated): same weights after a stage-1 epoch
    and a stage-2 epoch (GroupNorm model: nothing depends on how a batch is split); the trailing 16 images that do
    not fill a global batch are not trained in either run."""
    from bigltr.train import main

    common = ["recipe=tiny_test", f"data.root={tiny_shards}", "data.train_aug=none", "model.name=test_efficientnet_gn",
              "stage1.epochs=1", "stage2.epochs=1", "stage1.batch_size=32", "stage2.batch_size=32",
              "stage1.lr=0.05", "stage2.lr=0.5"]
    whole, micro = tmp_path / "whole", tmp_path / "micro"
    assert main(common + [f"out={whole}"]) == 0
    assert main(common + [f"out={micro}", "stage1.micro_batch_size=8", "stage2.micro_batch_size=8"]) == 0
    res = json.loads((micro / "results.json").read_text())
    assert res["stage1"]["batch"] == {"global": 32, "processes": 1, "per_process": 8, "accum_steps": 4}
    assert "# stage2: global batch 32 = 1 process(es) x 8 per process x 4 accumulation step(s)" in \
        (micro / "config.yaml").read_text()
    for stage, which in (("stage1", "best.pt"), ("stage2", "last.pt")):
        a = torch.load(whole / stage / which, weights_only=True)["model"]
        b = torch.load(micro / stage / which, weights_only=True)["model"]
        moved = torch.load(whole / "stage1" / "best.pt", weights_only=True)["model"] if stage == "stage2" else None
        for k in a:
            if a[k].is_floating_point():
                err = float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12))
                assert err <= 1e-4, f"{stage} {k}: relative difference {err:.2e}"  # float summation order only
        if moved is not None:
            assert not torch.allclose(a["classifier.weight"], moved["classifier.weight"])

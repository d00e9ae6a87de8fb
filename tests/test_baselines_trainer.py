"""Baselines through the trainer and the ablation (issue 22): the one-stage WB model check at start-up
(`bigltr.models.check_etf_fits`), and LWS as stage 2 (`stage2.classifier=lws`: only the scales train, the checkpoints
hold the folded nn.Linear)."""
import json

import pytest
import torch

from bigltr.config import ConfigError, build_config


def test_check_etf_fits_names_key_classes_model_and_what_to_do():
    from bigltr.models import check_etf_fits, feature_dim

    assert feature_dim("resnet32_cifar", 3) == 64 and feature_dim("resnet34_cifar", 3) == 512
    cfg = build_config(["recipe=tiny_test", "model.name=resnet32_cifar", "stage1.classifier=etf", "stage=1"])
    with pytest.raises(ConfigError) as e:
        check_etf_fits(cfg, 100)  # ResNet-32 on 100 classes: 64 < 99, the crash of the ablation's row 11
    msg = str(e.value)
    for part in ("stage1.classifier=etf", "100 classes", ">= 99", "model.name=resnet32_cifar", "64-dim",
                 "wider feature", "stage1.classifier=linear"):
        assert part in msg, (part, msg)
    check_etf_fits(cfg, 65)  # 64 >= 64: fits
    check_etf_fits(build_config(["recipe=tiny_test", "model.name=resnet32_cifar"]), 100)  # linear: no limit


def test_trainer_refuses_etf_that_does_not_fit_before_any_data(tiny_shards, tmp_path, monkeypatch, capsys):
    """The trainer stops at start-up with exit 2 and the message; no run folder, stage folder or checkpoint."""
    import bigltr.data.loader
    import bigltr.models.classifier
    from bigltr.train import main

    monkeypatch.setattr(bigltr.models.classifier, "feature_dim", lambda name, in_chans=3: 8)  # 10 classes need 9

    def no_loading(*a, **k):
        raise AssertionError("data loaded before the ETF check")

    monkeypatch.setattr(bigltr.data.loader.ShardLoader, "__init__", no_loading)
    out = tmp_path / "run"
    code = main(["recipe=tiny_test", f"data.root={tiny_shards}", f"out={out}", "stage=1", "stage1.classifier=etf"])
    assert code == 2
    err = capsys.readouterr().err
    assert "stage1.classifier=etf" in err and "10 classes" in err and "8-dim" in err and "resnet32_cifar" in err
    assert not (out / "stage1").exists() and not list(tmp_path.rglob("*.pt"))


def test_ablation_skips_one_stage_row_before_any_row_trains(tiny_shards, tmp_path, monkeypatch, capsys):
    """--baselines with a model too narrow for the ETF: the ablation says so before the first row trains (and goes on
    with the others: here the stub trainer stops it at row 1)."""
    import bigltr.models
    import bigltr.models.classifier
    import bigltr.train
    from bigltr import ablation

    narrow = lambda name, in_chans=3: 8  # noqa: E731
    monkeypatch.setattr(bigltr.models.classifier, "feature_dim", narrow)
    monkeypatch.setattr(bigltr.models, "feature_dim", narrow)
    argv = ["recipe=tiny_test", f"data.root={tiny_shards}", "stage1.epochs=1"]
    short = ablation.one_stage_problem(argv)
    assert short == "not applicable (resnet32_cifar has 8-dim features; a simplex ETF of 10 classes needs >= 9)"
    seen = []

    def stub_train(args):
        seen.append(capsys.readouterr().out)
        raise SystemExit("stub trainer: stop")

    monkeypatch.setattr(bigltr.train, "main", stub_train)
    with pytest.raises(SystemExit, match="stub trainer"):
        ablation.main(argv + [f"out={tmp_path / 'abl'}", "--baselines"])
    assert len(seen) == 1 and "one-stage WB row: not applicable" in seen[0] and "skipped" in seen[0]
    monkeypatch.undo()
    assert ablation.one_stage_problem(argv) is None  # the real ResNet-32 (64-dim) fits 10 classes


LWS_KEYS = ["stage2.classifier=lws", "stage2.loss=ce", "stage2.features=cached", "stage2.sampler=class_balanced",
            "stage2.maxnorm.when=off", "stage2.weight_decay=5e-4", "stage2.lr=0.5"]


def test_lws_config_is_validated():
    base = ["recipe=tiny_test", "stage2.classifier=lws", "stage2.maxnorm.when=off"]
    build_config(base)
    with pytest.raises(ConfigError, match=r"stage2.classifier'.*maxnorm.when=step.*set stage2.maxnorm.when=off"):
        build_config(base[:-1])
    with pytest.raises(ConfigError, match=r"stage2.classifier'.*classifier_init=keep"):
        build_config(base + ["stage2.classifier_init=reinit"])
    with pytest.raises(ConfigError, match=r"stage2.classifier'.*dist.backend=ddp"):
        build_config(base + ["dist.backend=fsdp2"])


def _scales(run, tag):
    from bigltr.engine.resume import resume_candidates

    cands = [p for p in resume_candidates(run / "stage2") if p.name.startswith(tag)]
    return torch.load(cands[0] / "rank" / "rank0.pt", weights_only=True)["stateful"]["lws"]["scales"]


@pytest.mark.parametrize("features", ["cached", "online"])
def test_lws_stage2_saves_the_folded_linear_and_resumes_exactly(tiny_shards, tmp_path, features):
    """stage2.classifier=lws through the trainer: only the scales train; best.pt / last.pt hold the ordinary keys,
    classifier rows = s_y x stage-1 rows (float64 check), the backbone untouched; stopped mid-epoch 2 and resumed
    (resume=auto), the run ends with the scales and weights of the straight run, bit for bit. online: class-balanced
    draws of augmented images (BalancedShardLoader), re-read after the resume to the same pixels."""
    import logging

    from bigltr.train import main

    common = ["recipe=tiny_test", f"data.root={tiny_shards}", "stage1.epochs=1", "data.train_aug=none",
              "stage1.batch_size=16", "stage2.batch_size=8", "stage2.epochs=2", "preempt_check_every=1",
              f"data.dali_index_dir={tmp_path / 'index'}"]
    one = tmp_path / "s1"
    assert main(common + [f"out={one}", "stage=1"]) == 0
    s1 = torch.load(one / "stage1" / "best.pt", weights_only=True)["model"]
    s2_args = common + LWS_KEYS + ["stage=2", f"stage1_checkpoint={one / 'stage1' / 'best.pt'}"]
    if features == "online":
        s2_args = [a for a in s2_args if a != "stage2.features=cached"] + ["stage2.features=online",
                                                                          "data.train_aug=cifar"]

    straight = tmp_path / "straight"
    assert main(s2_args + [f"out={straight}"]) == 0
    best = torch.load(straight / "stage2" / "best.pt", weights_only=True)
    last = torch.load(straight / "stage2" / "last.pt", weights_only=True)["model"]
    assert sorted(best["model"]) == sorted(s1) == sorted(last)  # the ordinary LTModel keys, nothing else
    for k, v in s1.items():
        if k.startswith("backbone."):
            assert torch.equal(best["model"][k], v), k  # frozen
    s = _scales(straight, f"e{best['epoch']:05d}-b")  # the scales of best.pt's epoch
    assert not torch.equal(s, torch.ones_like(s))  # they trained
    w64 = s.double()[:, None] * s1["classifier.weight"].double()
    b64 = s.double() * s1["classifier.bias"].double()
    torch.testing.assert_close(best["model"]["classifier.weight"].double(), w64, rtol=1e-7, atol=0)
    torch.testing.assert_close(best["model"]["classifier.bias"].double(), b64, rtol=1e-7, atol=0)
    res = json.loads((straight / "results.json").read_text())["stage2"]
    assert 0 <= res["test"]["all"] <= 100

    class StopAfter(logging.Handler):  # the real stop file, after epoch 1: stops at batch 1 of epoch 2
        def emit(self, record):
            if "stage2 epoch 1/" in record.getMessage():
                (stopped / "PREEMPT").touch()

    stopped = tmp_path / "stopped"
    handler = StopAfter()
    logging.getLogger("bigltr").addHandler(handler)
    try:
        assert main(s2_args + [f"out={stopped}"]) == 75
    finally:
        logging.getLogger("bigltr").removeHandler(handler)
    assert main(s2_args + [f"out={stopped}", "resume=auto"]) == 0
    assert torch.equal(_scales(stopped, "e00002-b00000000"), _scales(straight, "e00002-b00000000"))
    for name in ("best.pt", "last.pt"):
        a = torch.load(straight / "stage2" / name, weights_only=True)["model"]
        b = torch.load(stopped / "stage2" / name, weights_only=True)["model"]
        for k in ("classifier.weight", "classifier.bias"):
            assert torch.equal(a[k], b[k]), (name, k)

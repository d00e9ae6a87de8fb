"""Both stages end to end on tiny generated idx data, through the real converter, loader and entry point."""
import json

import pytest
import torch

def test_two_stages_end_to_end(tiny_shards, tmp_path):
    from bigltr.results import per_class_accuracy, per_class_count
    from bigltr.train import main

    out = tmp_path / "run"
    rc = main(["recipe=tiny_test", f"data.root={tiny_shards}", f"out={out}", "eval.posthoc=tau_norm",
               "eval.posthoc_tau=0.5", "stage2.maxnorm.radius=0.0"])  # t=0: radius = min norm, so it must bind
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    counts = res["class_counts"]
    assert counts == [int(40 * 10 ** (-c / 9)) for c in range(10)]
    for stage in ("stage1", "stage2"):
        for split in ("val", "test"):
            m = res[stage][split]
            assert set(["all", "many", "medium", "few", "per_class"]) <= set(m)
            acc, count = per_class_accuracy(m), per_class_count(m)  # bigltr.results: either stored form
            assert len(acc) == 10 and 0 <= m["all"] <= 100 and sum(count) == m["num_samples"]
            assert m["all"] == pytest.approx(sum(acc) / 10, abs=5e-3)  # per-class % stored to 2 decimals
        assert res[stage]["test"]["num_samples"] == 80 and res[stage]["val"]["num_samples"] == 60
        assert (out / stage / "best.pt").is_file() and (out / stage / "last.pt").is_file()
        rows = (out / stage / "summary.csv").read_text().strip().splitlines()
        assert len(rows) == 1 + 2  # header + one row per epoch
    assert "posthoc" in res["stage1"] and res["stage1"]["posthoc"]["tau"] == 0.5
    for f in ("config.yaml", "table.md", "weight_norms.png", "per_class_accuracy.png",
              "stage1_norm_evolution.png", "stage2_norm_evolution.png"):
        assert (out / f).stat().st_size > 0, f
    # table.md names each row from the run's config (tiny_test: fmnist_lt's WD 5e-3 / CB, WD 0.1, MaxNorm step)
    table = (out / "table.md").read_text()
    r = f"{res['stage2']['maxnorm_radius']:.3g}"
    assert "| stage 1 (CE + WD 5e-3) |" in table and "| stage 1 + tau_norm |" in table, table
    assert f"| stage 2 (CB + WD 0.1 + MaxNorm step, r={r}) |" in table, table

    # Every stage-2 class row lies in the ball; the radius is the relative one from the stage-1 rows.
    s1 = torch.load(out / "stage1" / "best.pt", weights_only=True)["model"]
    s2 = torch.load(out / "stage2" / "best.pt", weights_only=True)["model"]
    w1 = s1["classifier.weight"].norm(dim=1)
    radius = res["stage2"]["maxnorm_radius"]
    assert radius == pytest.approx(float(w1.min()), rel=1e-5)
    assert float(s2["classifier.weight"].norm(dim=1).max()) <= radius + 1e-5
    summary = (out / "stage2" / "summary.csv").read_text()
    assert "maxnorm_clipped_rows" in summary
    # The backbone is frozen, BatchNorm statistics included (bn_mode=eval).
    for k, v in s1.items():
        if not k.startswith("classifier."):
            assert torch.equal(v, s2[k]), k

    # stage=2 alone, official behaviours: per-epoch MaxNorm, BCE-on-softmax, BN in train mode.
    rc = main(["recipe=tiny_test", f"data.root={tiny_shards}", f"out={out}", "stage=2", "stage2.maxnorm.when=epoch",
               "stage2.loss=cb_official_bce", "stage2.bn_mode=train", "stage2.maxnorm.radius_mode=absolute",
               "stage2.maxnorm.radius=0.05", "stage2.weight_decay=0",
               "stage1.weight_decay=0"])  # not what trained the stage 1 reused here: its row keeps WD 5e-3
    assert rc == 0
    table = (out / "table.md").read_text()
    assert "| stage 1 (CE + WD 5e-3) |" in table, table  # the config in stage1/best.pt, not this command line
    assert "| stage 2 (CB-BCE (official) + MaxNorm epoch, r=0.05, WD 0) |" in table, table
    s2b = torch.load(out / "stage2" / "last.pt", weights_only=True)["model"]
    assert float(s2b["classifier.weight"].norm(dim=1).max()) <= 0.05 + 1e-5
    moved = [k for k in s1 if "running_mean" in k and not torch.equal(s1[k], s2b[k])]
    assert moved, "bn_mode=train must update BatchNorm running statistics"
    conv = [k for k in s1 if k.endswith("conv1.weight")]
    assert all(torch.equal(s1[k], s2b[k]) for k in conv)  # weights still frozen
    res2 = json.loads((out / "results.json").read_text())
    assert res2["stage1"] == res["stage1"] and res2["stage2"]["maxnorm_radius"] == 0.05


def test_table_row_names_follow_the_config():
    """summary_table names each stage from its config: what is on joined by " + ", what is off after a comma."""
    from bigltr.config import build_config
    from bigltr.engine.report import summary_table

    m = {"many": 90.0, "medium": 60.0, "few": 40.0, "all": 63.3, "per_class": []}
    results = {"stage1": {"test": m}, "stage2": {"test": m, "maxnorm_radius": 0.66234}}
    demo = build_config(["recipe=tiny_test"])
    t = summary_table(results, {"stage1": demo, "stage2": demo})
    assert "| stage 1 (CE + WD 5e-3) |" in t and "| stage 2 (CB + WD 0.1 + MaxNorm step, r=0.662) |" in t, t
    plain = build_config(["recipe=fmnist_lt", "stage1.weight_decay=0", "stage2.loss=ce", "stage2.weight_decay=0",
                          "stage2.maxnorm.when=off"])
    t = summary_table(results, {"stage1": plain, "stage2": plain})
    assert "| stage 1 (CE, WD 0) |" in t and "| stage 2 (CE, WD 0, MaxNorm off) |" in t, t
    other = build_config(["recipe=fmnist_lt", "stage1.weight_decay=2.5e-4", "stage1.wd_p=1.5",
                          "stage2.weight_decay=0", "stage2.maxnorm.tau=2", "stage2.maxnorm.projection=official"])
    t = summary_table(results, {"stage1": other, "stage2": other})
    assert "| stage 1 (CE + WD 2.5e-4 (p=1.5)) |" in t, t
    assert "| stage 2 (CB + MaxNorm step, r=0.662, tau=2 (official projection), WD 0) |" in t, t
    assert "| stage 1 | " in summary_table(results) and "| stage 2 | " in summary_table(results)  # no config


def test_stage2_without_stage1_says_what_to_do(tiny_shards, tmp_path, capsys):
    from bigltr.train import main

    rc = main(["recipe=tiny_test", f"data.root={tiny_shards}", f"out={tmp_path / 'none'}", "stage=2"])
    assert rc == 2
    assert "run stage=1" in capsys.readouterr().err


def test_feature_cache_matches_online_stage2(tiny_shards, tmp_path):
    """Full-batch stage 2 (order-independent) on cached fp32 centre features == online stage 2, same seed."""
    from bigltr.data.info import read_info
    from bigltr.train import main

    n = read_info(tiny_shards)["splits"]["train"]["num_samples"]
    common = ["recipe=tiny_test", f"data.root={tiny_shards}", "data.train_aug=none", "stage1.epochs=1"]
    assert main(common + [f"out={tmp_path / 's1'}", "stage=1"]) == 0
    ckpt = str(tmp_path / "s1" / "stage1" / "best.pt")
    s2 = common + ["stage=2", f"stage1_checkpoint={ckpt}", f"stage2.batch_size={n}", "stage2.epochs=3",
                   "stage2.lr=0.5", "stage2.maxnorm.radius=0.2"]
    assert main(s2 + [f"out={tmp_path / 'online'}"]) == 0
    assert main(s2 + [f"out={tmp_path / 'cached'}", "stage2.features=cached", "stage2.cache.views=center",
                      "stage2.cache.dtype=fp32"]) == 0
    w_on = torch.load(tmp_path / "online" / "stage2" / "last.pt", weights_only=True)["model"]
    w_ca = torch.load(tmp_path / "cached" / "stage2" / "last.pt", weights_only=True)["model"]
    w_s1 = torch.load(ckpt, weights_only=True)["model"]
    assert not torch.allclose(w_on["classifier.weight"], w_s1["classifier.weight"])  # stage 2 did move it
    for k in ("classifier.weight", "classifier.bias"):
        torch.testing.assert_close(w_ca[k], w_on[k], rtol=1e-5, atol=1e-6)
    res = json.loads((tmp_path / "cached" / "results.json").read_text())["stage2"]
    assert res["features"] == "cached" and res["wall_time_s"]["feature_cache_build"] > 0

    # Disk cache in bf16 with augmented views runs and stays in the ball; bn_mode=train is refused with a reason.
    assert main(common + ["stage=2", f"stage1_checkpoint={ckpt}", f"out={tmp_path / 'disk'}",
                          "stage2.features=cached", "stage2.cache.views=augment", "stage2.cache.num_aug=2",
                          "stage2.cache.location=disk", "data.train_aug=cifar"]) == 0
    cache_root = tmp_path / "disk" / "stage2" / "feature_cache"
    (cache_dir,) = cache_root.glob("train-*")  # one folder per split and key (val-*, test-* too)
    assert (cache_dir / "features.bin").stat().st_size > 0 and (cache_dir / "meta.json").is_file()
    first = json.loads((tmp_path / "disk" / "results.json").read_text())["stage2"]
    # a second run with the same checkpoint/data/views reuses the disk cache (no backbone pass) -> same model
    before = (cache_dir / "features.bin").stat().st_mtime_ns
    assert main(common + ["stage=2", f"stage1_checkpoint={ckpt}", f"out={tmp_path / 'disk'}",
                          "stage2.features=cached", "stage2.cache.views=augment", "stage2.cache.num_aug=2",
                          "stage2.cache.location=disk", "data.train_aug=cifar"]) == 0
    second = json.loads((tmp_path / "disk" / "results.json").read_text())["stage2"]
    assert (cache_dir / "features.bin").stat().st_mtime_ns == before and len(list(cache_root.iterdir())) == 3
    assert second["weight_norms"] == first["weight_norms"]
    from bigltr.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="bn_mode=eval"):
        build_config(common + ["stage2.features=cached", "stage2.bn_mode=train"])


def test_fused_sgd_maxnorm_stage2_equals_unfused(tiny_shards, tmp_path):
    """stage2.maxnorm.fused=true (SGDMaxNorm: one op per step) trains the same classifier as SGD + MaxNorm."""
    from bigltr.objective.fused_sgd import SGDMaxNorm
    from bigltr.train import main

    common = ["recipe=tiny_test", f"data.root={tiny_shards}", "data.train_aug=none", "stage1.epochs=1"]
    assert main(common + [f"out={tmp_path / 's1'}", "stage=1"]) == 0
    s2 = common + ["stage=2", f"stage1_checkpoint={tmp_path / 's1' / 'stage1' / 'best.pt'}", "stage2.epochs=2",
                   "stage2.maxnorm.radius=0.3"]
    assert main(s2 + [f"out={tmp_path / 'plain'}"]) == 0
    assert main(s2 + [f"out={tmp_path / 'fused'}", "stage2.maxnorm.fused=true"]) == 0
    a = torch.load(tmp_path / "plain" / "stage2" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "fused" / "stage2" / "last.pt", weights_only=True)["model"]
    for k in ("classifier.weight", "classifier.bias"):
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    rows = (tmp_path / "fused" / "stage2" / "summary.csv").read_text().splitlines()
    header, epochs = rows[0].split(","), [r.split(",") for r in rows[1:]]
    assert all(e[header.index("maxnorm_clipped_rows")] == "-1" for e in epochs)
    assert max(int(e[header.index("maxnorm_rows_at_radius")]) for e in epochs) > 0  # t=0.3 binds on some rows

    # the optimizer alone: momentum + weight decay + projection == torch SGD then renorm, over several steps
    torch.manual_seed(0)
    w0, b0 = torch.randn(7, 5), torch.randn(7)
    w1, b1 = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    w2, b2 = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    fused = SGDMaxNorm([{"params": [w1], "radius": 1.5}, {"params": [b1]}], lr=0.1, momentum=0.9, weight_decay=0.1)
    ref = torch.optim.SGD([w2, b2], lr=0.1, momentum=0.9, weight_decay=0.1, foreach=False)
    for _ in range(4):
        g, gb = torch.randn(7, 5), torch.randn(7)
        w1.grad, b1.grad, w2.grad, b2.grad = g.clone(), gb.clone(), g.clone(), gb.clone()
        fused.step()
        ref.step()
        with torch.no_grad():
            w2.renorm_(2, 0, 1.5)
        torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b1, b2, rtol=1e-6, atol=1e-6)

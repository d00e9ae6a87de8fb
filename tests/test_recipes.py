"""Every recipe's configuration path runs: each recipe with tiny overrides (data, epochs, image size, and a small
backbone where the recipe's own would take minutes on CPU) trains both stages on generated shards. What stays the
recipe's own: loss, MaxNorm timing/radius, BatchNorm mode, feature cache, precision, TTA, weight-decay scope."""
import json

import pytest
import torch

from bigltr.config import RECIPE_DIR, build_config

RECIPES = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_on_tiny_data(recipe, tiny_shards, tmp_path):
    from bigltr.train import main

    cfg = build_config([f"recipe={recipe}"])
    small = [] if cfg.model.name.endswith("_cifar") else ["model.name=test_efficientnet_gn"]
    out = tmp_path / recipe
    argv = [f"recipe={recipe}", f"data.root={tiny_shards}", f"out={out}", "data.img_size=32", "data.num_workers=0",
            "stage1.epochs=1", "stage2.epochs=1", "stage1.batch_size=16", "stage2.batch_size=16",
            "stage1.warmup_epochs=0", "data.many_thr=20", "data.few_thr=8", *small]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["stage2"]["test"]["num_samples"] == 80
    saved = (out / "config.yaml").read_text()
    assert f"loss: {cfg.stage2.loss}" in saved and f"features: {cfg.stage2.features}" in saved
    w = torch.load(out / "stage2" / "last.pt", weights_only=True)["model"]["classifier.weight"]
    if cfg.stage2.maxnorm.when != "off":
        assert float(w.norm(dim=1).max()) <= res["stage2"]["maxnorm_radius"] + 1e-5

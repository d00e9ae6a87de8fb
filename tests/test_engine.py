"""Training-loop pieces against direct computations: accumulation, schedule, weight-decay scope."""
import math

import pytest
import torch
import torch.nn as nn

from bigltr.distributed import Trainable
from bigltr.engine.loop import train_epoch
from bigltr.engine.optim import cosine_schedule, param_groups


def _run(batches, accum):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = cosine_schedule(opt, total_steps=math.ceil(len(batches) / accum))
    stats = train_epoch(trainer=Trainable(model, opt), loader=batches, loss_fn=nn.CrossEntropyLoss(), scheduler=sched,
                        device=torch.device("cpu"), amp="none", accum_steps=accum)
    return model, stats


def test_gradient_accumulation_equals_the_big_batch():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    big = [(x[:16], y[:16], None), (x[16:], y[16:], None)]
    small = [(x[i:i + 8], y[i:i + 8], None) for i in range(0, 32, 8)]
    m_big, s_big = _run(big, 1)
    m_small, s_small = _run(small, 2)
    assert s_big["steps"] == s_small["steps"] == 2
    torch.testing.assert_close(m_small.weight, m_big.weight, rtol=1e-5, atol=1e-6)
    assert abs(s_big["train_loss"] - s_small["train_loss"]) < 1e-5
    # a trailing partial group is read but not trained (every step sees the same global batch; engine/loop.py)
    _, s_odd = _run(small[:3], 2)
    assert s_odd["steps"] == 1 and s_odd["batches"] == 3 and s_odd["samples"] == 16


def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_schedule(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.5 and lrs[1] == 1.0
    assert all(abs(lrs[2 + k] - 0.5 * (1 + math.cos(math.pi * k / 8))) < 1e-12 for k in range(8))


def test_weight_decay_scope():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    all_groups = param_groups(model, 5e-3, "all")
    assert len(all_groups) == 1 and len(all_groups[0]["params"]) == 6
    groups = param_groups(model, 5e-3, "no_norm_bias")
    decay, no_decay = groups
    assert decay["weight_decay"] == 5e-3 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4} and len(no_decay["params"]) == 4  # bn w/b, conv/linear bias


def test_final_reload_reuses_the_selected_epochs_val(tiny_shards, tmp_path, monkeypatch):
    """best.pt's weights were validated at their epoch: the final reload evaluates test only and reports that
    epoch's val metrics, which equal a fresh val pass of best.pt computed here. log.plots=false writes no PNG."""
    import bigltr.engine.context as context
    import bigltr.engine.evaluation as evaluation
    from bigltr.engine.evaluation import Evaluator
    from bigltr.config import build_config
    from bigltr.distributed import Dist
    from bigltr.models import build_model
    from bigltr.results import read_epochs, read_results
    from bigltr.train import main

    calls = []
    real = evaluation.evaluate

    def spy(**kw):
        calls.append(kw["desc"])
        return real(**kw)

    monkeypatch.setattr(evaluation, "evaluate", spy)
    out = tmp_path / "run"
    args = ["recipe=tiny_test", f"data.root={tiny_shards}", f"out={out}", "stage=1", "stage1.epochs=4",
            "data.train_aug=none"]
    assert main(args + ["log.plots=false"]) == 0
    assert calls == ["val"] * 4 + ["eval test"]  # one val pass per epoch, none at the final reload
    res = read_results(out)["stage1"]
    best = torch.load(out / "stage1" / "best.pt", weights_only=True)
    assert res["val_reused"] is True and best["epoch"] == res["best_epoch"]
    assert res["val"] == best["val"]  # exactly the selected epoch's numbers
    assert 20 < res["val"]["all"] < 100  # not a degenerate head: the comparisons below mean something
    row = read_epochs(out / "stage1" / "summary.csv")[res["best_epoch"] - 1]
    assert float(row["val_all"]) == pytest.approx(res["val"]["all"], rel=1e-5)  # summary.csv: 6 digits
    assert not list(out.glob("*.png")) and (out / "table.md").is_file()
    assert "Many (n=" in (out / "table.md").read_text()

    # reference: a fresh val pass over best.pt's weights (the pass the reload no longer makes)
    monkeypatch.setattr(evaluation, "evaluate", real)
    cfg = build_config(args)
    ctx = context.RunContext.create(cfg, Dist("ddp", device=torch.device("cpu")))
    model = build_model(cfg.model.name, ctx.num_classes, in_chans=cfg.data.in_chans)
    model.load_state_dict(best["model"])
    ev = Evaluator(ctx)
    fresh = ev.final(model, 16, cfg.stage1.amp)
    assert fresh["val"] == res["val"] and fresh["test"] == res["test"]
    assert ev.reusable_val(best, cfg.stage1.amp) == best["val"]
    # reused only when the final pass would measure the same thing
    assert ev.reusable_val({**best, "val_key": {**best["val_key"], "world_size": 2}}, cfg.stage1.amp) is None
    assert ev.reusable_val(best, "bf16") is None and ev.reusable_val({"model": {}}, cfg.stage1.amp) is None
    for extra in ("eval.tta_flip=true", "eval.posthoc=tau_norm"):
        other = Evaluator(context.RunContext.create(build_config(args + [extra]), ctx.dist))
        assert other.reusable_val(best, cfg.stage1.amp) is None, extra

"""Lp weight decay (bigltr.objective.lp_decay.LpSGD, engine.optim.build_sgd, SGDMaxNorm's wd_p) against a float64
hand computation; p = 2 must be torch SGD bit for bit."""
import math

import pytest
import torch

from bigltr.config import ConfigError, build_config
from bigltr.engine.optim import build_sgd
from bigltr.objective.fused_sgd import SGDMaxNorm
from bigltr.objective.lp_decay import LpSGD, lp_decay_grad

HYPER = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False)


def manual_sgd(w0, grads, *, lr, momentum, weight_decay, p, dampening=0.0, nesterov=False):
    """Independent float64 loop: d = g + wd * sign(w) |w|^(p-1) (coupled, before momentum), then torch SGD's
    momentum rule (buffer = d on the first step)."""
    w = [float(x) for x in w0.flatten()]
    buf = None
    for g in grads:
        d = []
        for wi, gi in zip(w, g.flatten().tolist()):
            sign = (wi > 0) - (wi < 0)
            d.append(gi + weight_decay * sign * abs(wi) ** (p - 1) if weight_decay else gi)
        if momentum:
            buf = d if buf is None else [momentum * b + (1 - dampening) * di for b, di in zip(buf, d)]
            d = [di + momentum * b for di, b in zip(d, buf)] if nesterov else buf
        w = [wi - lr * di for wi, di in zip(w, d)]
    return torch.tensor(w, dtype=torch.float64).view_as(w0)


def _run(opt_cls_or_fn, w0, grads, **kw):
    p = torch.nn.Parameter(w0.clone())
    opt = opt_cls_or_fn([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("nesterov", [False, True])
def test_lp_sgd_matches_float64_hand_computation(p, nesterov):
    gen = torch.Generator().manual_seed(int(p * 10) + nesterov)
    w0 = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    w0[0, :2] = 0.0  # p = 1 at w = 0: sign(0) = 0, no decay
    grads = [torch.randn(7, 5, generator=gen, dtype=torch.float64) for _ in range(5)]
    hyper = dict(HYPER, nesterov=nesterov)
    got, _ = _run(LpSGD, w0, grads, weight_decay=0.05, wd_p=p, **hyper)
    want = manual_sgd(w0, grads, weight_decay=0.05, p=p, **hyper)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_lp_sgd_p1_keeps_zero_weights_and_grads_untouched():
    w = torch.nn.Parameter(torch.tensor([0.0, 2.0, -3.0], dtype=torch.float64))
    opt = LpSGD([w], lr=1.0, weight_decay=0.5, wd_p=1.0)
    g = torch.zeros(3, dtype=torch.float64)
    w.grad = g
    opt.step()
    assert w.detach().tolist() == [0.0, 1.5, -2.5]  # sign(0) = 0; +-0.5 elsewhere
    assert w.grad is g and g.abs().sum() == 0  # the caller's gradient is restored, unmodified
    assert opt.param_groups[0]["weight_decay"] == 0.5  # and the group's decay too
    assert torch.equal(lp_decay_grad(torch.tensor([-2.0, 0.0, 3.0]), 3.0), torch.tensor([-4.0, 0.0, 9.0]))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_p2_is_bitwise_torch_sgd(momentum):
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(33, 17, generator=gen)
    grads = [torch.randn(33, 17, generator=gen) for _ in range(4)]
    ref, _ = _run(torch.optim.SGD, w0, grads, lr=0.1, momentum=momentum, weight_decay=5e-3)
    lp, _ = _run(LpSGD, w0, grads, lr=0.1, momentum=momentum, weight_decay=5e-3, wd_p=2.0)
    assert torch.equal(lp, ref)
    # build_sgd keeps plain torch SGD for p = 2 (today's optimizer), and LpSGD otherwise
    groups = [{"params": [torch.nn.Parameter(w0.clone())], "weight_decay": 5e-3}]
    assert type(build_sgd(groups, 0.1, momentum)) is torch.optim.SGD
    built, _ = _run(lambda params, **kw: build_sgd([{"params": params, "weight_decay": 5e-3}], 0.1, momentum,
                                                   wd_p=2.0), w0, grads)
    assert torch.equal(built, ref)
    assert isinstance(build_sgd([{"params": [torch.nn.Parameter(w0.clone())], "weight_decay": 5e-3}], 0.1,
                                momentum, wd_p=1.5), LpSGD)


def test_build_sgd_groups_and_float32():
    """Per-group decay (no_norm_bias gives a group with weight_decay 0); fp32 params within float32 rounding of
    the float64 hand computation."""
    gen = torch.Generator().manual_seed(5)
    w0, b0 = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    gw = [torch.randn(6, 4, generator=gen) for _ in range(3)]
    gb = [torch.randn(6, generator=gen) for _ in range(3)]
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = build_sgd([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], 0.05, 0.9,
                    wd_p=3.0)
    for x, y in zip(gw, gb):
        w.grad, b.grad = x.clone(), y.clone()
        opt.step()
    torch.testing.assert_close(w.detach().double(), manual_sgd(w0.double(), [x.double() for x in gw], lr=0.05,
                                                                momentum=0.9, weight_decay=0.1, p=3.0),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.detach().double(), manual_sgd(b0.double(), [y.double() for y in gb], lr=0.05,
                                                                momentum=0.9, weight_decay=0.0, p=3.0),
                               rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(6)
    w0 = torch.randn(5, 3, generator=gen)
    grads = [torch.randn(5, 3, generator=gen) for _ in range(4)]
    whole, _ = _run(LpSGD, w0, grads, weight_decay=0.1, wd_p=1.5, **HYPER)
    half, opt = _run(LpSGD, w0, grads[:2], weight_decay=0.1, wd_p=1.5, **HYPER)
    p = torch.nn.Parameter(half.clone())
    opt2 = LpSGD([p], weight_decay=0.1, wd_p=1.5, **HYPER)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["wd_p"] == 1.5
    for g in grads[2:]:
        p.grad = g.clone()
        opt2.step()
    assert torch.equal(p.detach(), whole)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0])
def test_fused_sgd_maxnorm_takes_wd_p(p):
    """SGDMaxNorm (stage2.maxnorm.fused) with wd_p: the same as LpSGD followed by the projection (weight), and as
    LpSGD alone for the unconstrained bias."""
    from bigltr.ops import maxnorm_

    gen = torch.Generator().manual_seed(int(10 * p))
    w0, b0 = torch.randn(9, 6, generator=gen), torch.randn(9, generator=gen)
    radius = float(w0.norm(dim=1).median())
    fw, fb = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    fused = SGDMaxNorm([{"params": [fw], "radius": radius}, {"params": [fb]}], lr=0.1, momentum=0.9,
                       weight_decay=0.05, wd_p=p)
    rw, rb = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    ref = LpSGD([rw, rb], lr=0.1, momentum=0.9, weight_decay=0.05, wd_p=p)
    for _ in range(3):
        gw, gb = torch.randn(9, 6, generator=gen), torch.randn(9, generator=gen)
        fw.grad, fb.grad, rw.grad, rb.grad = gw.clone(), gb.clone(), gw.clone(), gb.clone()
        fused.step()
        ref.step()
        maxnorm_(rw.data, radius, backend="torch")
    torch.testing.assert_close(fw.detach(), rw.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fb.detach(), rb.detach(), rtol=1e-5, atol=1e-6)


def test_dtensor_params(tmp_path):
    """FSDP2 keeps parameters as DTensors (Shard(0)): the decay uses pointwise ops only, so the sharded step equals
    the plain one. One-process gloo group, so it runs anywhere."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(7)
        w0 = torch.randn(8, 4, generator=gen)
        grads = [torch.randn(8, 4, generator=gen) for _ in range(3)]
        plain, _ = _run(LpSGD, w0, grads, weight_decay=0.1, wd_p=1.5, **HYPER)
        p = torch.nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(0)]))
        opt = LpSGD([p], weight_decay=0.1, wd_p=1.5, **HYPER)
        for g in grads:
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            opt.step()
        torch.testing.assert_close(p.detach().full_tensor(), plain, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_config_wd_p():
    cfg = build_config(["stage1.wd_p=1", "stage2.wd_p=1.5"])
    assert (cfg.stage1.wd_p, cfg.stage2.wd_p) == (1.0, 1.5)
    assert build_config([]).stage1.wd_p == 2.0 and build_config([]).stage2.wd_p == 2.0
    for bad in ("0.5", ".inf", ".nan"):
        with pytest.raises(ConfigError, match="stage1.wd_p"):
            build_config([f"stage1.wd_p={bad}"])
    with pytest.raises(ValueError, match="wd_p"):
        LpSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, wd_p=math.inf)
    with pytest.raises(ValueError, match="maximize"):
        LpSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, maximize=True)


@pytest.mark.parametrize("fused", [False, True])
def test_end_to_end_lp_decay_and_exact_projection(tiny_shards, tmp_path, fused):
    """Both stages with Lp decay (stage1.wd_p=1.5, stage2.wd_p=3) and MaxNorm at tau = 1.5 (exact projection; the
    absolute radius 0.1 binds: 0.1^(1/1.5) = 0.215 is far below the stage-1 row norms): every stage-2 row ends
    inside the ball ||w||^tau <= radius, on its sphere, and the config records the keys. Fused: SGDMaxNorm takes
    wd_p too."""
    import json

    from bigltr.train import main

    out = tmp_path / "run"
    rc = main(["recipe=tiny_test", f"data.root={tiny_shards}", f"out={out}", "stage1.epochs=1", "stage2.epochs=1",
               "stage1.wd_p=1.5", "stage2.wd_p=3", "stage2.maxnorm.tau=1.5",
               "stage2.maxnorm.radius_mode=absolute", "stage2.maxnorm.radius=0.1",
               f"stage2.maxnorm.fused={str(fused).lower()}"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    radius = res["stage2"]["maxnorm_radius"]
    w = torch.load(out / "stage2" / "last.pt", weights_only=True)["model"]["classifier.weight"]
    norms = w.norm(dim=1)
    assert float(norms.max()) ** 1.5 <= radius * (1 + 1e-5)
    assert float(norms.max()) == pytest.approx(radius ** (1 / 1.5), rel=1e-5)  # on the sphere: it binds
    saved = (out / "config.yaml").read_text()
    assert "wd_p: 1.5" in saved and "wd_p: 3" in saved and "projection: exact" in saved


def test_loading_a_plain_sgd_state_dict():
    """A resume state saved by torch SGD (wd_p = 2 runs) or by SGDMaxNorm before wd_p / projection existed has
    groups without those keys: loading fills in the defaults."""
    p = torch.nn.Parameter(torch.ones(2, 3))
    sd = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1).state_dict()
    opt = LpSGD([p], lr=0.1, momentum=0.9, weight_decay=0.1, wd_p=1.5)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["wd_p"] == 1.5
    fused = SGDMaxNorm([{"params": [p], "radius": 1.0}], lr=0.1)
    old = fused.state_dict()
    for g in old["param_groups"]:
        del g["wd_p"], g["projection"]
    fused.load_state_dict(old)
    assert (fused.param_groups[0]["wd_p"], fused.param_groups[0]["projection"]) == (2.0, "exact")
    p.grad = torch.ones(2, 3)
    fused.step()

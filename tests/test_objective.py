"""Losses, MaxNorm and post-hoc normalisation against independent re-computations."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from bigltr.objective.losses import CBOfficialBCE, build_loss, class_balanced_weights
from bigltr.objective.maxnorm import MaxNorm, resolve_radius
from bigltr.objective.posthoc import posthoc_classifier


def test_cb_weights_match_the_formula():
    counts = [5000, 2997, 1796, 50, 1]
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    expect = [r / sum(raw) * len(counts) for r in raw]
    got = class_balanced_weights(counts, beta)
    assert np.allclose(got.numpy(), expect, rtol=1e-6)
    assert math.isclose(float(got.sum()), len(counts), rel_tol=1e-6)
    assert got[-1] > got[0]  # rare classes weigh more
    with pytest.raises(ValueError, match="empty classes: \\[1\\]"):
        class_balanced_weights([3, 0], beta)


def test_cb_ce_is_weighted_softmax_ce():
    torch.manual_seed(0)
    counts = [100, 10, 3]
    logits, target = torch.randn(8, 3), torch.randint(0, 3, (8,))
    w = class_balanced_weights(counts, 0.99)
    loss = build_loss("cb_ce", counts, 0.99)(logits, target)
    # independent: log-softmax by hand
    logp = logits.double() - logits.double().exp().sum(1, keepdim=True).log()
    expect = sum(-w[t].item() * logp[i, t].item() for i, t in enumerate(target.tolist())) / 8
    assert math.isclose(loss.item(), expect, rel_tol=1e-5)


def test_official_bce_matches_a_loop_recomputation():
    torch.manual_seed(1)
    counts = [500, 40, 7, 2]
    logits, target = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 3])
    w = class_balanced_weights(counts, 0.9999).double()
    loss = build_loss("cb_official_bce", counts, 0.9999)(logits, target)
    assert isinstance(build_loss("cb_official_bce", counts), CBOfficialBCE)
    p = torch.softmax(logits.double(), 1)
    total = 0.0
    for i in range(5):
        for c in range(4):
            y = 1.0 if c == target[i] else 0.0
            total += -w[target[i]] * (y * math.log(p[i, c]) + (1 - y) * math.log(1 - p[i, c]))
    assert math.isclose(loss.item(), float(total) / 20, rel_tol=1e-5)


def test_maxnorm_projects_rows_above_radius_and_leaves_others():
    torch.manual_seed(2)
    w = torch.randn(50, 17) * torch.linspace(0.1, 3, 50).unsqueeze(1)
    before = w.clone()
    norms = before.norm(dim=1)
    t = 0.3
    radius = resolve_radius(before, "relative", t)
    assert math.isclose(radius, float(norms.min() + t * (norms.max() - norms.min())), rel_tol=1e-6)
    mn = MaxNorm(radius, when="step")
    mn.after_epoch(w)  # when=step: the epoch hook does nothing
    assert torch.equal(w, before)
    mn.after_step(w)
    after = w.norm(dim=1)
    over = norms > radius
    assert over.sum() > 0 and (~over).sum() > 0
    assert torch.allclose(after[over], torch.full_like(after[over], radius), rtol=1e-5)
    assert torch.equal(w[~over], before[~over])  # untouched, bit for bit
    # directions are kept
    cos = nn.functional.cosine_similarity(w[over], before[over], dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)
    s = mn.stats(w)
    assert s.clipped_rows == int(over.sum()) and s.applications == 1
    assert s.norm_max <= radius * (1 + 1e-5)
    assert resolve_radius(before, "absolute", 1.25) == 1.25


def test_maxnorm_epoch_mode_and_tau():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    mn = MaxNorm(2.0, tau=2.0, when="epoch")
    mn.after_step(w)
    assert w[0, 0] == 3.0
    mn.after_epoch(w)
    # exact (default): ||w||^2 = 25 > 2 -> onto the ball ||w|| <= sqrt(2): w * sqrt(2) / 5
    assert torch.allclose(w[0], torch.tensor([3.0, 4.0]) * 2 ** 0.5 / 5)
    assert torch.equal(w[1], torch.tensor([0.3, 0.4]))
    s = mn.stats(w)
    assert (s.clipped_rows, s.rows_at_radius) == (1, 1)  # row 0 sits on ||w|| = 2**(1/2) now

    w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    mn = MaxNorm(2.0, tau=2.0, when="epoch", projection="official")
    mn.after_epoch(w)
    # official code: n = ||w||^tau = 25 > 2 -> w * 2 / n^tau = w * 2 / 625 (norm 0.016: not on the sphere)
    assert torch.allclose(w[0], torch.tensor([3.0, 4.0]) * 2 / 625)
    s = mn.stats(w)
    assert (s.clipped_rows, s.rows_at_radius) == (1, 0)
    with pytest.raises(ValueError, match="projection"):
        MaxNorm(1.0, projection="paper")


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.5, 2.0])
def test_maxnorm_rows_at_radius_follow_the_rule(tau):
    """rows_at_radius counts the rows within 1e-5 relative of the rule's threshold: ||w|| = r^(1/tau) (exact),
    ||w||^tau = r (official); at tau = 1 both are ||w|| = r."""
    r = 1.7
    edge = r ** (1 / tau)
    w = torch.tensor([[edge, 0.0], [0.0, edge * (1 - 1e-6)], [edge * 0.9, 0.0], [0.0, 0.0]])
    for projection in ("exact", "official"):
        s = MaxNorm(r, tau=tau, projection=projection).stats(w)
        assert s.rows_at_radius == 2, (projection, tau)
    if tau > 1:  # r > 1: the threshold is r^(1/tau) < r, so a row just below r^(1/tau) is not at the radius
        below = torch.tensor([[edge * (1 - 1e-4), 0.0]])
        assert MaxNorm(r, tau=tau).stats(below).rows_at_radius == 0
        assert MaxNorm(r, tau=1.0).stats(below).rows_at_radius == 0


def test_posthoc_tau_norm():
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 0.5, 0, 0], [1.0, 1.0, 1.0, 1.0]]))
    l2 = posthoc_classifier(lin, "l2")
    assert torch.allclose(l2.weight.norm(dim=1), torch.ones(3))
    assert torch.equal(l2.bias, torch.zeros(3))
    half = posthoc_classifier(lin, "tau_norm", 0.5)
    assert torch.allclose(half.weight[0], torch.tensor([2.0 / 2 ** 0.5, 0, 0, 0]))
    assert torch.equal(lin.weight[0], torch.tensor([2.0, 0, 0, 0]))  # original untouched


def test_flip_tta_averages_logits_of_image_and_mirror():
    """eval.tta_flip (official code's reported numbers): prediction = argmax of the mean of both views' logits."""
    from bigltr.engine.evaluation import evaluate

    torch.manual_seed(3)
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    clf = nn.Linear(5, 3)
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 3, (40,))
    batches = [(x[i:i + 8], y[i:i + 8], [str(j) for j in range(i, i + 8)]) for i in range(0, 40, 8)]
    with torch.no_grad():
        logits = (clf(backbone(x)) + clf(backbone(torch.flip(x, dims=[3])))) / 2
        plain = clf(backbone(x))
    want = torch.bincount(y[logits.argmax(1) == y], minlength=3)
    got, total = evaluate(backbone=backbone, classifiers={"m": clf}, loader=batches, num_classes=3,
                          device=torch.device("cpu"), tta_flip=True)["m"]
    assert torch.equal(got, want) and torch.equal(total, torch.bincount(y, minlength=3))
    no_tta, _ = evaluate(backbone=backbone, classifiers={"m": clf}, loader=batches, num_classes=3,
                         device=torch.device("cpu"))["m"]
    assert torch.equal(no_tta, torch.bincount(y[plain.argmax(1) == y], minlength=3))
    assert not torch.equal(logits.argmax(1), plain.argmax(1))  # the flip changed some predictions

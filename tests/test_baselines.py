"""Standard long-tailed baselines (logit adjustment, balanced softmax, multiplicative LA, one-stage weight balancing
with a fixed simplex ETF, class-balanced sampling, LWS) against float64 re-computations written independently."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from bigltr.data.balanced import ClassBalancedSampler
from bigltr.objective.etf import (ETFClassifier, OneStageWBLoss, class_mean_cosines, etf_gram,
                                  feature_norm_penalty, simplex_etf)
from bigltr.objective.losses import BalancedSoftmaxCE, LogitAdjustedCE, build_loss
from bigltr.objective.lws import LWSClassifier
from bigltr.objective.posthoc import posthoc_classifier

COUNTS = [500, 120, 37, 9, 2]


def _ce64(logits: np.ndarray, target: np.ndarray) -> float:
    """Mean softmax cross-entropy by explicit loops, float64."""
    total = 0.0
    for row, y in zip(logits, target):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += lse - row[y]
    return total / len(target)


def _batch(seed=0, n=16, c=len(COUNTS)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


# ------------------------------------------------------------------------------ logit adjustment / balanced softmax
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_logit_adjusted_ce_matches_hand_computation(tau):
    logits, target = _batch(1)
    pi = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    adjusted = logits.double().numpy() + tau * np.log(pi)[None, :]
    expect = _ce64(adjusted, target.numpy())
    got = LogitAdjustedCE(COUNTS, tau)(logits, target)
    assert got.dtype == torch.float32
    assert math.isclose(float(got), expect, rel_tol=1e-5)
    assert math.isclose(float(build_loss("la_ce", COUNTS, la_tau=tau)(logits, target)), expect, rel_tol=1e-5)
    if tau == 0.0:  # no adjustment: plain CE
        assert math.isclose(float(got), float(nn.functional.cross_entropy(logits, target)), rel_tol=1e-6)


def test_balanced_softmax_is_ce_on_logits_plus_log_counts_and_equals_la_tau_1():
    logits, target = _batch(2, n=32)
    expect = _ce64(logits.double().numpy() + np.log(np.array(COUNTS, dtype=np.float64))[None, :], target.numpy())
    bs = BalancedSoftmaxCE(COUNTS)(logits, target)
    assert math.isclose(float(bs), expect, rel_tol=1e-5)
    assert math.isclose(float(build_loss("balanced_softmax", COUNTS)(logits, target)), expect, rel_tol=1e-5)
    assert math.isclose(float(bs), float(LogitAdjustedCE(COUNTS, 1.0)(logits, target)), rel_tol=1e-6)


def test_la_loss_rejects_empty_classes_and_unknown_names():
    with pytest.raises(ValueError, match=r"empty classes: \[1\]"):
        LogitAdjustedCE([4, 0, 2], 1.0)
    with pytest.raises(ValueError, match="balanced_softmax"):
        build_loss("focal", COUNTS)
    m = LogitAdjustedCE(COUNTS, 1.0)
    assert "offset" in m.state_dict() and not list(m.parameters())  # a buffer, never trained


# ------------------------------------------------------------------------------------------------- post-hoc rules
def _linear(seed=0, d=6, c=len(COUNTS), bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(d, c, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin


def _logits64(w, b, x):
    """[N, C] by explicit loops, float64."""
    out = np.zeros((x.shape[0], w.shape[0]))
    for i in range(x.shape[0]):
        for y in range(w.shape[0]):
            dot = sum(float(w[y, k]) * float(x[i, k]) for k in range(w.shape[1]))
            out[i, y] = dot + (0.0 if b is None else float(b[y]))
    return out


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("bias", [True, False])
def test_posthoc_la_subtracts_tau_log_prior_from_the_bias(tau, bias):
    lin = _linear(3, bias=bias)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    x = torch.randn(7, 6, dtype=torch.float64)
    w = lin.weight.detach().double().numpy()
    b = None if not bias else lin.bias.detach().double().numpy()
    pi = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    expect = _logits64(w, b, x.numpy()) - tau * np.log(pi)[None, :]
    la = posthoc_classifier(lin, "la", tau, class_counts=COUNTS)
    assert isinstance(la, nn.Linear) and la.bias is not None
    assert torch.equal(la.weight, lin.weight)  # same weight
    got = la.double()(x).detach().numpy()
    assert np.allclose(got, expect, rtol=1e-6, atol=1e-6)
    assert (got.argmax(1) == expect.argmax(1)).all()
    for k, v in lin.state_dict().items():  # input untouched
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("tau", [0.65, 1.6])
def test_posthoc_mla_scales_rows_and_bias_by_prior_power(tau):
    lin = _linear(4)
    x = torch.randn(9, 6, dtype=torch.float64)
    w, b = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
    pi = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    expect = _logits64(w, b, x.numpy()) * pi[None, :] ** (-tau)
    mla = posthoc_classifier(lin, "mla", tau, class_counts=COUNTS)
    assert isinstance(mla, nn.Linear)
    assert np.allclose(mla.double()(x).detach().numpy(), expect, rtol=1e-5, atol=1e-6)
    for y in range(len(COUNTS)):
        assert np.allclose(mla.weight[y].detach().double().numpy(), w[y] * pi[y] ** (-tau), rtol=1e-6)
    # no bias: rows only
    nob = posthoc_classifier(_linear(4, bias=False), "mla", tau, class_counts=COUNTS)
    assert nob.bias is None


def test_posthoc_needs_matching_class_counts_and_keeps_old_methods():
    lin = _linear(5)
    for m in ("la", "mla"):
        with pytest.raises(ValueError, match="class counts"):
            posthoc_classifier(lin, m, 1.0)
        with pytest.raises(ValueError, match="4 class counts for a classifier of 5 classes"):
            posthoc_classifier(lin, m, 1.0, class_counts=COUNTS[:4])
    with pytest.raises(ValueError, match="mla"):
        posthoc_classifier(lin, "bogus")
    l2 = posthoc_classifier(lin, "l2")
    assert torch.allclose(l2.weight.norm(dim=1), torch.ones(5)) and torch.equal(l2.bias, torch.zeros(5))


# -------------------------------------------------------------------------------------------- simplex ETF
@pytest.mark.parametrize("c,d", [(2, 1), (4, 3), (5, 5), (6, 16), (10, 64)])
def test_simplex_etf_gram_equals_analytic(c, d):
    m = simplex_etf(c, d, seed=3, dtype=torch.float64)
    assert m.shape == (c, d)
    gram = m @ m.T
    analytic = np.full((c, c), -1.0 / (c - 1))
    np.fill_diagonal(analytic, 1.0)
    assert np.allclose(gram.numpy(), analytic, atol=1e-12)
    assert torch.allclose(etf_gram(c), torch.from_numpy(analytic))
    assert np.allclose(m.sum(0).numpy(), 0.0, atol=1e-12)  # vectors of a simplex sum to zero


def test_simplex_etf_is_deterministic_and_checks_dimensions():
    a, b = simplex_etf(5, 8, seed=7), simplex_etf(5, 8, seed=7)
    assert torch.equal(a, b)
    assert not torch.allclose(a, simplex_etf(5, 8, seed=8))
    with pytest.raises(ValueError, match=r"10 classes needs feature dimension >= 9.*got feature dimension 8"):
        simplex_etf(10, 8)
    with pytest.raises(ValueError, match="at least 2 classes"):
        simplex_etf(1, 8)
    with pytest.raises(ValueError, match=r"needs feature dimension >= 9"):
        ETFClassifier(8, 10)


def test_etf_classifier_is_fixed_has_a_trainable_bias_and_folds_to_linear():
    head = ETFClassifier(6, 4, seed=1)
    names = [n for n, _ in head.named_parameters()]
    assert names == ["bias"]  # the ETF is a buffer
    assert "weight" in dict(head.named_buffers())
    assert torch.equal(head.weight, simplex_etf(4, 6, seed=1))
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = torch.randn(5, 6)
    expect = _logits64(head.weight.double().numpy(), head.bias.detach().double().numpy(), x.double().numpy())
    assert np.allclose(head(x).detach().numpy(), expect, atol=1e-5)
    lin = head.as_linear()
    assert isinstance(lin, nn.Linear) and torch.allclose(lin(x), head(x))
    mla = posthoc_classifier(lin, "mla", 0.65, class_counts=COUNTS[:4])
    assert mla.weight.shape == (4, 6)
    nob = ETFClassifier(6, 4, bias=False)
    assert list(nob.parameters()) == [] and nob.as_linear().bias is None
    # state dict round trip (a checkpoint), and the same keys as an nn.Linear: an ETF checkpoint loads into the
    # Linear classifier of a stage-2 / eval model
    other = ETFClassifier(6, 4, seed=99)
    other.load_state_dict(head.state_dict())
    assert torch.equal(other(x), head(x))
    plain = nn.Linear(6, 4)
    plain.load_state_dict(head.state_dict())
    assert torch.allclose(plain(x), head(x))


# --------------------------------------------------------------------------------------- feature regulariser
def test_feature_norm_penalty_matches_hand_formula():
    f = torch.tensor([[1.0, 2.0, -2.0], [0.0, 3.0, 4.0]])  # squared norms 9 and 25
    assert math.isclose(float(feature_norm_penalty(f, 0.01)), 0.01 * (9 + 25) / 2 / 2, rel_tol=1e-7)
    assert float(feature_norm_penalty(f, 0.0)) == 0.0
    g = torch.randn(6, 5, dtype=torch.float64)
    hand = 0.3 * sum(sum(v * v for v in row) for row in g.tolist()) / 6 / 2
    assert math.isclose(float(feature_norm_penalty(g, 0.3)), hand, rel_tol=1e-12)
    logits, target = _batch(6, n=6, c=4)
    loss = OneStageWBLoss(0.3)(logits, target, g.float())
    assert math.isclose(float(loss), _ce64(logits.double().numpy(), target.numpy()) + hand, rel_tol=1e-5)
    with pytest.raises(ValueError):
        OneStageWBLoss(-1.0)


def _off_diag(m: torch.Tensor) -> torch.Tensor:
    c = m.shape[0]
    return m[~torch.eye(c, dtype=torch.bool)]


def test_one_stage_wb_reaches_etf_geometry_on_a_tiny_run():
    """Tiny MLP + fixed ETF head, CE + WD + feature regulariser on long-tailed Gaussian clusters (150 SGD steps):
    the class means of the features move toward the simplex (pairwise cosine -1/(C-1)).

    Measured on the globally centred class means (the neural-collapse convention). The uncentred means move too,
    but less: the trainable ETF bias learns the class prior (head classes get the larger bias, as in the run
    below), and the features of rare classes then drift by a common offset."""
    torch.manual_seed(0)
    c, d_in, d_feat = 5, 12, 8
    counts = [160, 80, 40, 20, 10]
    centers = torch.randn(c, d_in) * 1.5
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    x = centers[y] + torch.randn(len(y), d_in)
    backbone = nn.Sequential(nn.Linear(d_in, 32), nn.ReLU(), nn.Linear(32, d_feat))
    head = ETFClassifier(d_feat, c, seed=0)
    target_cos = -1.0 / (c - 1)

    def gap(center):
        with torch.no_grad():
            cos = class_mean_cosines(backbone(x), y, c, center=center)
        return float((_off_diag(cos) - target_cos).abs().mean())

    start, start_raw = gap(True), gap(False)
    params = [{"params": backbone.parameters(), "weight_decay": 5e-3}, {"params": [head.bias], "weight_decay": 0.0}]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    loss_fn = OneStageWBLoss(0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(y), (64,), generator=g)
        feats = backbone(x[idx])
        loss = loss_fn(head(feats), y[idx], feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end, end_raw = gap(True), gap(False)
    assert end < 0.35 * start and end < 0.12, (start, end)  # measured: 0.289 -> 0.060
    assert end_raw < 0.5 * start_raw, (start_raw, end_raw)  # measured: 0.695 -> 0.144
    with torch.no_grad():  # the ETF did not move, the features classify the data, the bias follows the prior
        assert torch.equal(head.weight, simplex_etf(c, d_feat, seed=0))
        assert (head(backbone(x)).argmax(1) == y).float().mean() > 0.9
        assert head.bias[0] > head.bias[-1]


# -------------------------------------------------------------------------------------- class-balanced sampler
LABELS = torch.tensor([0] * 40 + [1] * 13 + [2] * 5 + [3] * 1 + [4] * 8 + [5] * 2)  # 69 samples, 6 classes


@pytest.mark.parametrize("instances", ["replacement", "cycle"])
@pytest.mark.parametrize("num_samples", [None, 60, 61, 7])
def test_sampler_draws_each_class_floor_or_ceil_times_exactly(instances, num_samples):
    s = ClassBalancedSampler(LABELS, seed=3, num_samples=num_samples, instances=instances)
    t = len(LABELS) if num_samples is None else num_samples
    for epoch in range(3):
        idx = s.global_indices(epoch)
        assert len(idx) == t
        drawn = LABELS[idx]
        per_class = torch.bincount(drawn, minlength=6)
        q, r = divmod(t, 6)
        assert sorted(per_class.tolist()) == [q] * (6 - r) + [q + 1] * r
        for k in range(t // 6):  # each aligned cycle of C draws is a permutation of the classes
            assert sorted(drawn[6 * k:6 * k + 6].tolist()) == list(range(6))


def test_sampler_cycle_mode_gives_distinct_instances_and_replacement_mode_is_uniform():
    s = ClassBalancedSampler(LABELS, seed=0, num_samples=6 * 5, instances="cycle")
    idx = s.global_indices(0)
    class0 = idx[LABELS[idx] == 0]
    assert len(class0) == 5 and len(set(class0.tolist())) == 5  # 5 draws of a 40-sample class: no repeat
    class2 = idx[LABELS[idx] == 2]
    assert sorted(class2.tolist()) == list(range(53, 58))  # 5 draws of a 5-sample class: each sample once
    # with replacement: instance frequencies within class 1 (13 samples) are uniform (chi-square, 12 dof)
    s = ClassBalancedSampler(LABELS, seed=0, num_samples=6 * 1300)
    idx = s.global_indices(0)
    c1 = idx[LABELS[idx] == 1] - 40
    freq = torch.bincount(c1, minlength=13).double()
    chi2 = float(((freq - 100.0) ** 2 / 100.0).sum())
    assert chi2 < 40.0, chi2  # p ~ 1e-4 for 12 dof


def test_sampler_is_deterministic_and_resumes_exactly():
    a = ClassBalancedSampler(LABELS, seed=11)
    b = ClassBalancedSampler(LABELS, seed=11)
    assert torch.equal(a.indices(2), b.indices(2))
    assert not torch.equal(a.indices(2), a.indices(3))
    assert not torch.equal(a.indices(2), ClassBalancedSampler(LABELS, seed=12).indices(2))
    a.set_epoch(4)
    full = list(a)
    assert len(full) == len(a) == len(LABELS) and full == a.indices(4).tolist()
    batch, k = 8, 3
    b.set_epoch(4, start=k * batch)  # resume after k batches
    assert list(b) == full[k * batch:] and len(b) == len(full) - k * batch
    # skipping batches of a DataLoader gives the same
    loader = torch.utils.data.DataLoader(torch.arange(len(LABELS)), batch_size=batch, sampler=a)
    batches = [t.tolist() for t in loader]
    assert sum(batches[k:], []) == full[k * batch:]


@pytest.mark.parametrize("n", [69, 70, 5])
def test_sampler_ranks_are_disjoint_equal_and_tile_the_global_sequence(n):
    world = 2
    ranks = [ClassBalancedSampler(LABELS, seed=5, num_samples=n, rank=r, world_size=world) for r in range(world)]
    per = [r.indices(1) for r in ranks]
    assert len(per[0]) == len(per[1]) == math.ceil(n / world)
    glob = ranks[0].global_indices(1)
    assert torch.equal(ranks[1].global_indices(1), glob)  # every rank sees the same global sequence
    assert len(glob) == math.ceil(n / world) * world
    woven = torch.stack(per, dim=1).reshape(-1)  # positions r, r+W, ... interleaved back
    assert torch.equal(woven, glob)
    single = ClassBalancedSampler(LABELS, seed=5, num_samples=len(glob))
    assert torch.equal(single.indices(1), glob)  # world size changes only the split, not the sequence


def test_sampler_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"empty classes: \[6\]"):
        ClassBalancedSampler(LABELS, num_classes=7)
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedSampler(LABELS, rank=2, world_size=2)
    with pytest.raises(ValueError, match="instances"):
        ClassBalancedSampler(LABELS, instances="x")
    s = ClassBalancedSampler(torch.tensor([3, 3, 7]))  # absent ids are simply not drawn
    assert s.num_classes == 2 and set(s.indices(0).tolist()) <= {0, 1, 2}


# ------------------------------------------------------------------------------------------------------- LWS
def test_lws_scales_the_whole_logit_including_bias():
    lin = _linear(8)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    lws = LWSClassifier(lin)
    x = torch.randn(5, 6)
    assert torch.allclose(lws(x), lin(x))  # s = 1 at init
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0, -1.0]))
    w, b = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
    s = lws.scales.detach().double().numpy()
    expect = _logits64(w, b, x.double().numpy()) * s[None, :]
    assert np.allclose(lws(x).detach().numpy(), expect, atol=1e-5)
    assert np.allclose(lws.folded()(x).detach().numpy(), expect, atol=1e-5)
    assert [n for n, p in lws.named_parameters() if p.requires_grad] == ["scales"]
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(TypeError):
        LWSClassifier(ETFClassifier(6, 5))


def test_lws_training_moves_only_the_scales_with_balanced_sampling():
    torch.manual_seed(0)
    lws = LWSClassifier(_linear(9))
    w0 = lws.base_weight.clone()
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 8 + [3] * 3 + [4] * 2)
    feats = torch.randn(len(labels), 6)
    sampler = ClassBalancedSampler(labels, seed=0)
    opt = torch.optim.SGD([p for p in lws.parameters() if p.requires_grad], lr=0.1)
    idx = sampler.indices(0)
    loss = nn.functional.cross_entropy(lws(feats[idx]), labels[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.equal(lws.base_weight, w0) and lws.base_weight.grad is None
    assert not torch.equal(lws.scales.detach(), torch.ones(5))

"""Training-loop pieces against direct computations: accumulation, schedule, weight-decay scope."""
import math

import torch
import torch.nn as nn

from bigltr.distributed import Trainable
from bigltr.engine.common import cosine_schedule, param_groups, train_epoch


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
    # a trailing partial group still steps
    _, s_odd = _run(small[:3], 2)
    assert s_odd["steps"] == 2


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

"""Group metrics and the two CIFAR ResNets registered with timm."""
import timm
import torch

from bigltr.engine.evaluation import evaluate
from bigltr.metrics import class_groups, summarize
from bigltr.models import build_model


def _counts(preds: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class (correct, total) of given predictions, counted by the engine's `evaluate` (what every run uses):
    the "images" are one-hot predictions, backbone and classifier pass them through, so argmax = preds. Two
    batches: the counts accumulate across batches."""
    x = torch.nn.functional.one_hot(preds, num_classes).float()
    loader = [(x[:5], labels[:5], None), (x[5:], labels[5:], None)]
    out = evaluate(backbone=torch.nn.Identity(), classifiers={"m": torch.nn.Identity()}, loader=loader,
                   num_classes=num_classes, device=torch.device("cpu"))
    return out["m"]


def test_groups_and_balanced_accuracy():
    counts = [500, 150, 100, 50, 20, 19, 5]
    g = class_groups(counts, 100, 20)
    assert g == {"many": [0, 1], "medium": [2, 3, 4], "few": [5, 6]}
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 6])
    preds = torch.tensor([0, 0, 0, 1, 1, 0, 2, 0, 4, 5, 6, 0])
    correct, total = _counts(preds, labels, 7)
    assert total.tolist() == [4, 2, 1, 1, 1, 1, 2] and correct.tolist() == [3, 1, 1, 0, 1, 1, 1]
    m = summarize(correct, total, counts, 100, 20)
    per = [75.0, 50.0, 100.0, 0.0, 100.0, 100.0, 50.0]
    assert m["per_class"] == per
    assert abs(m["all"] - sum(per) / 7) < 1e-3  # balanced: mean over classes, not over samples
    assert m["many"] == 62.5 and abs(m["medium"] - 200 / 3) < 1e-3 and m["few"] == 75.0
    # an empty group is absent (None), not 0%
    m2 = summarize(correct, total, counts, 1000, 1)
    assert m2["many"] is None and m2["few"] is None


def test_cifar_resnets():
    m = timm.create_model("resnet32_cifar", num_classes=0, in_chans=3)
    n = sum(p.numel() for p in m.parameters())
    assert 0.45e6 < n < 0.48e6 and m.num_features == 64
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    r34 = timm.create_model("resnet34_cifar", num_classes=0, in_chans=1)
    assert r34.conv1.kernel_size == (3, 3) and r34.conv1.stride == (1, 1)
    assert isinstance(r34.maxpool, torch.nn.Identity)
    assert r34.forward_features(torch.randn(1, 1, 32, 32)).shape == (1, 512, 4, 4)  # 32 -> 4: no stem downsampling
    full = build_model("resnet32_cifar", 10, in_chans=1)
    assert isinstance(full.classifier, torch.nn.Linear) and full.classifier.weight.shape == (10, 64)
    assert full(torch.randn(2, 1, 28, 28)).shape == (2, 10)

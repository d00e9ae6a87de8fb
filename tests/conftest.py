"""Test-wide setup.

TRITON_INTERPRET must be set before triton is first imported (torchvision, timm and torch.compile import it),
so it is set here, at the top of conftest, before anything else is imported.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# One thread: the tests' models are tiny, and on a loaded 2-core machine two OpenMP threads stall for
# milliseconds in every barrier (measured: 6 vs 166 img/s for a tiny stage 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Tiny long-tailed shards (10 classes, 40 ... 4 train images, 6 val and 8 test per class) made by the real
    idx converter from generated, learnable images."""
    import make_shards

    from bigltr.data.synthetic import make_fake_idx

    base = tmp_path_factory.mktemp("tiny")
    make_fake_idx(base / "idx")
    out = base / "shards"
    make_shards.main(["idx", "--src", str(base / "idx"), "--out", str(out), "--imbalance", "10", "--n-max", "40",
                      "--val-per-class", "6", "--maxcount", "64", "--seed", "0", "--no-progress"])
    return out

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


def free_port() -> int:
    """A TCP port free on localhost now (for launchers that need one: accelerate's main process port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_shards(base: Path, *, n_max: int = 40, maxcount: int = 64) -> Path:
    """Long-tailed shards (10 classes, IF 10 from n_max, 6 val and 8 test per class) made by the real idx
    converter from generated, learnable images."""
    import make_shards

    from bigltr.data.synthetic import make_fake_idx

    make_fake_idx(base / "idx")
    out = base / "shards"
    make_shards.main(["idx", "--src", str(base / "idx"), "--out", str(out), "--imbalance", "10", "--n-max",
                      str(n_max), "--val-per-class", "6", "--maxcount", str(maxcount), "--seed", "0", "--no-progress"])
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """40 ... 4 train images per class (159), 3 train shards of at most 64."""
    return build_tiny_shards(tmp_path_factory.mktemp("tiny"))

"""Test-wide setup.

TRITON_INTERPRET must be set before triton is first imported (torchvision, timm and torch.compile import it),
so it is set here, at the top of conftest, before anything else is imported.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# One thread: the tests' models are tiny, and on a loaded 2-core machine two OpenMP threads stall for
# milliseconds in every barrier (measured: 6 vs 166 img/s for a tiny stage 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
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
    from bigltr.data.sources.cli import main as make_shards_main
    from bigltr.data.synthetic import make_fake_idx

    make_fake_idx(base / "idx")
    out = base / "shards"
    make_shards_main(["idx", "--src", str(base / "idx"), "--out", str(out), "--imbalance", "10", "--n-max",
                      str(n_max), "--val-per-class", "6", "--maxcount", str(maxcount), "--seed", "0", "--no-progress"])
    return out


def stand_in_bin(directory: Path, scripts: dict[str, str]) -> Path:
    """Executables named after real tools (srun, sbatch, python, ...) with the given script texts, in `directory`
    (created), to put first on PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    return directory


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """40 ... 4 train images per class (159), 3 train shards of at most 64."""
    return build_tiny_shards(tmp_path_factory.mktemp("tiny"))


class Proc:
    """A trainer subprocess (its own session, so a signal reaches only it) whose output is watched for a line."""

    def __init__(self, cmd, env_extra=None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
        env.pop("TRITON_INTERPRET", None)
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        self.lines, self.seen = [], threading.Event()
        self.wanted = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)
            if self.wanted and self.wanted in line:
                self.seen.set()

    def wait_for(self, text, timeout=240):
        self.seen.clear()  # an earlier wait_for set it
        self.wanted = text
        if any(text in ln for ln in self.lines):
            return
        assert self.seen.wait(timeout), f"never saw {text!r}:\n{''.join(self.lines[-40:])}"

    def finish(self, timeout=240):
        rc = self.p.wait(timeout)
        time.sleep(0.2)
        return rc, "".join(self.lines)

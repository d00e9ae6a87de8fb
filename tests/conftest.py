"""Test-wide setup.

TRITON_INTERPRET must be set before triton is first imported (torchvision, timm and torch.compile import it),
so it is set here, at the top of conftest, before anything else is imported.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

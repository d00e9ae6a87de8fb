#!/usr/bin/env python
"""Alias of `bigltr-tune` (bigltr/tune.py): Optuna tuning of the weight decays and the MaxNorm radius. See
docs/tuning.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout that is not pip-installed

from bigltr.tune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

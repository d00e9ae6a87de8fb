#!/usr/bin/env python
"""Alias of `bigltr-tune` (the package bigltr/tune/): Optuna tuning of the weight decays and the MaxNorm radius. See
docs/tuning.md. Needs the package installed: ``pip install -e .`` in the repository root."""
import sys

from bigltr.tune import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""``python tools/ablation.py recipe=NAME out=DIR ...``: the same command as the console script ``bigltr-ablation``
(bigltr/ablation.py). Needs the package installed: ``pip install -e .`` (or ``make venv``) in the repository root."""
from bigltr.ablation import main

if __name__ == "__main__":
    main()

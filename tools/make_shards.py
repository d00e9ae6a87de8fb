#!/usr/bin/env python
"""``python tools/make_shards.py FORMAT ...``: the same command as the console script ``bigltr-make-shards``.

The converters live in the package (``bigltr/data/sources/cli.py``, readers in ``bigltr/data/sources/``);
this file keeps ``python tools/make_shards.py``, ``make data`` and ``import make_shards`` working.
See docs/data.md.
"""
try:
    from bigltr.data.sources.cli import main
except ModuleNotFoundError as e:  # run with a Python that has no `pip install -e .` of this checkout
    if e.name != "bigltr":
        raise
    raise SystemExit("make_shards.py: the bigltr package is not installed: run `pip install -e .` (or `make venv`) "
                     "in the repository root") from None

if __name__ == "__main__":
    main()

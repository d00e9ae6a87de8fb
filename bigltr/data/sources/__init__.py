"""Readers of the converters' source formats, one module per format.

Each module's ``load(...)`` reads its format (checking it, with messages that name the file and line or entry),
applies the split rules of :mod:`bigltr.data.longtail` and returns a :class:`SourceData` for
:func:`bigltr.data.convert.convert`, the one conversion path. The command line is
:mod:`bigltr.data.sources.cli` (``bigltr-make-shards`` / ``python tools/make_shards.py``); ``load``'s keyword
arguments are named like its subcommand's options.

  idx          MNIST / Fashion-MNIST idx files             (:mod:`.idx`)
  imagefolder  ROOT/{train,val,test}/<class>/<image> trees  (:mod:`.imagefolder`)
  list         OLTR text lists "relative/path label"        (:mod:`.oltr_list`)
  inat         iNaturalist COCO-style JSON                  (:mod:`.inat`)
  cifar        CIFAR-10 / CIFAR-100 python pickles          (:mod:`.cifar`)
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

from ..convert import Item

__all__ = ["SourceData", "require_dir", "array_items"]


class SourceData(NamedTuple):
    """What a source gives :func:`bigltr.data.convert.convert`."""

    classes: list[str]
    splits: dict  # split -> [Item, ...] in write order
    source: dict  # provenance for _info.json "source" (the CLI appends the output options)
    extra: Optional[dict] = None  # extra top-level _info.json keys (iNat: category_ids)
    expected_counts: Optional[list[int]] = None  # the long-tail profile the written train split must match
    # idx: _info.json in idx's own layout ("source" with image_format and maxcount; no encode options, skipped
    # counts or official training counts: convert(record_encode=False)), byte-identical across conversions
    idx_info_layout: bool = False
    holdout: Optional[object] = None  # a bigltr.data.holdout.Holdout: val drawn out of train after the decode check


def require_dir(path: str, flag: str = "--src") -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path} is not a folder")
    return path


def array_items(images, labels, order, prefix: str, origin: str) -> list[Item]:
    """Items ``<prefix>_<index:05d>`` of in-memory images (idx, CIFAR), in ``order``; ``origin[index]`` names each."""
    return [Item(f"{prefix}_{int(i):05d}", images[int(i)], int(labels[int(i)]), f"{origin}[{int(i)}]") for i in order]

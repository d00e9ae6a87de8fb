"""Data: the shard format (``_info.json`` + WebDataset tars), long-tail splits, writers and the streaming reader.

The converters: source readers in ``bigltr.data.sources`` (command line ``bigltr-make-shards`` =
``tools/make_shards.py``), the split rules in ``bigltr.data.longtail`` (``holdout``, ``pairs``), one conversion path
``bigltr.data.convert.convert``. ``ShardLoader`` / ``build_transform`` import torch; they are loaded lazily so
that converters start without paying for ``import torch``.
"""
from .errors import DataError, DataMissingError
from .holdout import holdout_per_class
from .info import INFO_NAME, check_trainable, read_info, validate_info, write_info
from .longtail import holdout_and_longtail, longtail_counts, train_shuffle
from .writer import encode_image, prepare_output_dir, shard_name, write_dataset, write_split

__all__ = [
    "INFO_NAME", "read_info", "validate_info", "write_info", "check_trainable", "DataError", "DataMissingError",
    "longtail_counts", "holdout_and_longtail", "holdout_per_class", "train_shuffle",
    "write_split", "write_dataset", "prepare_output_dir", "encode_image", "shard_name",
    "ShardLoader", "build_transform",
]

_LAZY = {"ShardLoader": "loader", "build_transform": "transforms"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The ``.cls`` label of a shard sample: one parser for both readers (``ShardLoader`` and ``DaliShardLoader``)."""
from __future__ import annotations

from .errors import DataError
from .info import INFO_NAME


def parse_label(data: bytes | str, where: str, num_classes: int) -> int:
    """The ``.cls`` payload (ASCII digits: the raw bytes, or the text the DALI index keeps) as an int in
    [0, num_classes), else DataError naming ``where`` (shard and sample key)."""
    try:
        label = int(data)
    except (TypeError, ValueError):
        shown = data[:20] if isinstance(data, str) else bytes(data)[:20]
        raise DataError(f"{where}: label {shown!r} in .cls is not an integer") from None
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} outside [0, {num_classes}) (num_classes in {INFO_NAME})")
    return label

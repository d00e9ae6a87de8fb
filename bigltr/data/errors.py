"""Exceptions for problems in the data itself (shards, ``_info.json``), as opposed to bugs or bad config.

An entry point can catch :class:`DataError` once and print its message as one line: every message names the
file (shard, ``_info.json``), and where it applies the sample key, and says what to do.
"""
from __future__ import annotations

__all__ = ["DataError", "DataMissingError"]


class DataError(ValueError):
    """A dataset problem: malformed or inconsistent ``_info.json``, a truncated/modified shard, a bad label."""


class DataMissingError(DataError, FileNotFoundError):
    """A dataset folder, ``_info.json`` or listed shard does not exist (also a FileNotFoundError)."""

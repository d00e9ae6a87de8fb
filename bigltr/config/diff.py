"""Comparing configs: a nested config as flat dotted keys, and the keys whose values differ between two configs
(resume=auto's check against config.yaml, the ablation's reuse of a run, the trackers' flat config)."""
from __future__ import annotations

from typing import Any


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config mapping as {"section.key": value} (what resume checks, trackers and the ablation compare)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def key_in(key: str, keys: tuple[str, ...]) -> bool:
    """Whether dotted config key `key` is one of `keys`: equal to one, or under one that ends with "." ("eval."
    holds every eval.* key)."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)


def same_value(old: Any, new: Any) -> bool:
    """Equal, or both numbers (the old one not a bool) of equal value: 5 and 5.0 are the same setting."""
    return old == new or (isinstance(old, (int, float)) and isinstance(new, (int, float))
                          and not isinstance(old, bool) and float(old) == float(new))


def config_diff(saved: dict, new: dict, ignore: tuple[str, ...] = (), defaults: dict | None = None,
                same=None) -> list[tuple[str, Any, Any]]:
    """The keys whose value in config `new` differs from config `saved` (nested or flattened mappings), as
    (dotted key, saved value, new value), in `new`'s key order. A key `saved` lacks counts as its value in
    `defaults` (None without them: a config written by an older bigltr); a key only `saved` has is not compared
    (one this version no longer has); keys in `ignore` (`key_in`) are skipped. `same(key, old, new)` decides
    equality (default: `same_value`)."""
    s, dflt = flatten(saved), flatten(defaults or {})
    diffs = []
    for key, value in flatten(new).items():
        if key_in(key, ignore):
            continue
        old = s.get(key, dflt.get(key))
        if not (same(key, old, value) if same else same_value(old, value)):
            diffs.append((key, old, value))
    return diffs

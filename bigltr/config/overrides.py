"""The `key=value` grammar every bigltr command reads, and the setting of keys on a Config: each value is checked
against the key's annotation in the schema (and converted where that is lossless); an unknown key names the
closest valid one."""
from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Any, Literal

import yaml

from bigltr.config.errors import ConfigError, brief
from bigltr.config.recipe import BoundedSafeLoader, YAMLTooLarge
from bigltr.config.schema import SCHEMA, Config, field_entry, valid_keys

EXAMPLE = "stage1.epochs=10"


# ----------------------------------------------------------------------------------------------- key=value
def split_override(arg: str) -> tuple[str, str]:
    """`key=value` -> (key, raw value text). The key loses surrounding spaces and leading dashes (`--seed=1` is
    `seed=1`); the value is everything after the first `=`, unparsed. Not of that form: ConfigError."""
    if "=" not in arg or arg.startswith("="):
        raise ConfigError(f"argument '{arg}' is not of the form key=value (e.g. {EXAMPLE})")
    key, raw = arg.split("=", 1)
    return key.strip().lstrip("-"), raw


def parse_value(raw: str, key: str = "") -> Any:
    """A value as a YAML scalar (`5e-3` stays text: the config's float check converts it; `stage=1` is an int,
    `true` a bool, `[0.5, 0.5]` a list); an empty value is the empty string, unparseable YAML the raw text. Read
    with BoundedSafeLoader: aliases that expand beyond YAML_MAX_NODES values, or nesting too deep to parse, are a
    ConfigError naming `key`."""
    if raw == "":
        return ""
    try:
        return yaml.load(raw, Loader=BoundedSafeLoader)
    except YAMLTooLarge as e:
        raise ConfigError(f"config key '{key}' (command line): {e}") from None
    except RecursionError:
        raise ConfigError(f"config key '{key}' (command line): value nested too deeply") from None
    except yaml.YAMLError:
        return raw


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """[`key=value`, ...] -> {key: typed value}; a later key wins."""
    out = {}
    for arg in argv:
        key, raw = split_override(arg)
        out[key] = parse_value(raw, key)
    return out


# ----------------------------------------------------------------------------------------------- setting keys
def unknown_key(key: str, where: str) -> ConfigError:
    key = brief(key)[1:-1] if len(str(key)) > 200 else key  # a YAML key can be any text: a line's worth of it
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid_keys())}"
    return ConfigError(f"unknown config key '{key}' ({where}){hint}")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted where the conversion is lossless."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):  # `int | list[int]`: the first alternative that fits
        for alt in typing.get_args(tp):
            try:
                return coerce(key, value, alt)
            except ConfigError:
                pass
        names = [a.__name__ if isinstance(a, type) else str(a) for a in typing.get_args(tp)]
        raise ConfigError(f"config key '{key}' expects {' or '.join(names)}, got {brief(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and "off" in choices:
            value = "off" if value is False else value  # YAML 1.1 reads a bare `off` as false
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) in choices:
            value = str(value)  # `stage=1` arrives as the int 1
        if value not in choices:
            raise ConfigError(f"config key '{key}': {brief(value)} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true/false, got {brief(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an integer, got {brief(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `5e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {brief(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' expects a finite number, got {brief(value)}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (bool, list, dict)):
            raise ConfigError(f"config key '{key}' expects a string, got {brief(value)}")
        return str(value)
    raise TypeError(f"unsupported annotation {tp} for {key}")  # a bug in the schema, not in user input


def set_key(cfg: Config, key: str, value: Any, where: str) -> None:
    """Set dotted `key` of `cfg` to `value`, checked against its annotation (ConfigError naming `where`)."""
    entry = SCHEMA.get(key)
    if entry is None or entry.is_section:
        raise unknown_key(key, where)
    *sections, name = key.split(".")
    target = cfg
    for part in sections:
        target = getattr(target, part)
    setattr(target, name, coerce(key, value, entry.type))


def apply_mapping(cfg: Config, mapping: Any, where: str, prefix: str = "") -> None:
    """Set every key of a nested mapping (a recipe, a saved config) on `cfg`; `prefix` is the section it holds."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping ({where})")
    for name, value in mapping.items():
        entry = field_entry(prefix, name)
        if entry is None:
            raise unknown_key(f"{prefix}{name}", where)
        if entry.is_section:
            apply_mapping(cfg, value, where, f"{entry.key}.")
        else:
            set_key(cfg, entry.key, value, where)

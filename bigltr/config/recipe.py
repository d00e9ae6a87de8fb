"""Recipes (YAML files in recipes/, or any path) and the bounded YAML loader every YAML read of bigltr goes through.

A recipe is a YAML mapping whose keys mirror the schema's dataclasses. A recipe may start from another one with
`base: NAME` (resolved in recipes/ or as a path); its keys then override the base's.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from bigltr.config.errors import ConfigError, brief

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
RECIPE_DIR = REPO_ROOT / "recipes"


# YAML that bigltr reads (recipes, key=value overrides, a saved config.yaml read back) goes through
# BoundedSafeLoader. PyYAML shares an aliased node instead of copying it, so nine levels of `&aN [*aM, *aM, ...]`
# (a few hundred bytes) load at once but stand for 10**9 values as soon as anything walks or prints them: 18 s,
# 2 GB and a 522 MB error line before this bound. A resolved bigltr config has a few hundred nodes.
YAML_MAX_NODES = 10_000


class YAMLTooLarge(yaml.YAMLError):
    """A YAML document that, with every alias expanded, has more than YAML_MAX_NODES nodes or refers to itself."""


def _check_expanded_size(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}  # id(node) -> size with aliases expanded (a shared node is counted once per use)
    open_: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            raise YAMLTooLarge(f"an alias at line {node.start_mark.line + 1} refers to a node that contains it")
        open_.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        n = 1
        for child in children:
            n += size(child)
            if n > YAML_MAX_NODES:
                raise YAMLTooLarge(f"aliases expand it to more than {YAML_MAX_NODES} values (the node at line "
                                   f"{node.start_mark.line + 1}); write the values out instead of nesting aliases")
        open_.discard(id(node))
        sizes[id(node)] = n
        return n

    size(root)


class BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document whose aliases expand beyond YAML_MAX_NODES (YAMLTooLarge, a YAMLError)
    before anything is constructed from it."""

    def construct_document(self, node):
        _check_expanded_size(node)
        return super().construct_document(node)


def load_yaml(text: str, where: str) -> Any:
    """`text` parsed like yaml.safe_load, with aliases bounded (BoundedSafeLoader). Invalid, alias-expanding or too
    deeply nested YAML: ConfigError in one line that starts with `where`."""
    try:
        return yaml.load(text, Loader=BoundedSafeLoader)
    except YAMLTooLarge as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {brief(' '.join(str(e).split()), 300)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None


def recipe_path(name: str) -> Path:
    """A recipe is a name in recipes/ (with or without .yaml) or a path to a YAML file."""
    candidates = [Path(name), RECIPE_DIR / name, RECIPE_DIR / f"{name}.yaml"]
    for p in candidates:
        if p.is_file():
            return p
    available = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(name, available, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"recipe '{name}' not found (looked in {RECIPE_DIR}); available: {', '.join(available)}{hint}")


def load_recipe(name: str, _seen: tuple = ()) -> dict:
    """The recipe's mapping, merged over its `base` chain (the recipe's own keys win)."""
    path = recipe_path(name)
    if path.resolve() in _seen:
        raise ConfigError(f"recipe '{name}': circular 'base' chain {[str(p) for p in _seen]}")
    data = load_yaml(path.read_text(), f"recipe {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: top level must be a mapping")
    base = data.pop("base", None)
    if base:
        merged = load_recipe(base, _seen + (path.resolve(),))
        _deep_update(merged, data)
        data = merged
    return data


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v

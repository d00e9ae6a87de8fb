"""A validated Config from `recipe=NAME key=value ...` or from a saved mapping, and a Config written back out."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from bigltr.atomic import write_text_atomic
from bigltr.config.overrides import apply_mapping, parse_overrides, set_key
from bigltr.config.recipe import load_recipe, recipe_path
from bigltr.config.schema import Config
from bigltr.config.validation import validate
from bigltr.rundir import default_out


def config_from_dict(data: dict, overrides: dict[str, Any] | None = None, *, where: str) -> Config:
    """A validated Config from a nested mapping (a saved config.yaml, a checkpoint's `config`) and then dotted
    overrides ({"data.root": ...}, as parse_overrides returns them). Keys are checked as in build_config."""
    cfg = Config()
    apply_mapping(cfg, data, where)
    for key, value in (overrides or {}).items():
        set_key(cfg, key, value, "command line")
    validate(cfg)
    return cfg


def build_config(argv: list[str]) -> Config:
    """Config from `recipe=NAME key=value ...` (recipe optional: defaults are the fmnist_lt demo values)."""
    overrides = parse_overrides(argv)
    cfg = Config()
    recipe = overrides.pop("recipe", None)
    if recipe not in (None, ""):  # `recipe=` (the default, as --help shows it): no recipe
        recipe = str(recipe)
        apply_mapping(cfg, load_recipe(recipe), f"recipe {recipe_path(recipe)}")
        cfg.recipe = recipe
    for key, value in overrides.items():
        set_key(cfg, key, value, "command line")
    validate(cfg)
    if not cfg.out:
        cfg.out = default_out(cfg.recipe)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike, header: list[str] = ()) -> None:
    """Write the resolved config atomically (tmp file then rename); `header` lines go first as YAML comments
    (what the launch resolved, e.g. each stage's BatchPlan)."""
    head = "".join(f"# {line}\n" for line in header)
    write_text_atomic(path, head + yaml.safe_dump(to_dict(cfg), sort_keys=False))

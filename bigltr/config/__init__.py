"""Typed run configuration: YAML recipes + `key.sub=value` overrides, validated before any heavy work.

A recipe is a YAML mapping whose keys mirror the schema's dataclasses; command-line overrides `a.b=value` are
parsed as YAML scalars (so `stage1.weight_decay=5e-3` is a float and `stage=1` an int). Every key is checked: an
unknown key or a value of the wrong type raises ConfigError naming the key and, for unknown keys, the closest valid
one. The resolved config is written to `<out>/config.yaml` by the trainer. No module of this package imports torch
or another bigltr package than bigltr.atomic and bigltr.rundir.

Modules, each importing only those before it: errors (ConfigError), schema (the dataclasses and their one walk,
SCHEMA), plan (BatchPlan: a global batch on N processes), recipe (recipes, the bounded YAML loader), overrides (the
`key=value` grammar, checking and setting keys), validation (cross-key checks), build (build_config,
config_from_dict, save_config), diff (flatten, config_diff). Everything public is importable from bigltr.config.

Why hand-written and not Hydra/OmegaConf: what bigltr needs is a typed schema checked before torch is imported,
an error that names the bad key and the closest valid one, and a help listing generated from the schema.
Dataclasses + difflib do that with no extra dependency and no config framework between a user's `key=value` and
the trainer.
"""
from bigltr.config.errors import ConfigError
from bigltr.config.schema import (AUGS, BATCH_HELP, MICRO_HELP, SCHEMA, TRACKERS, Config, DataConfig, DistConfig,
                                  EvalConfig, FeatureCacheConfig, LogConfig, MaxNormConfig, ModelConfig, SchemaKey,
                                  Stage1Config, Stage2Config, TrainAug, field_entry, opt, section, valid_keys)
from bigltr.config.plan import BatchPlan, batch_plan
from bigltr.config.recipe import (RECIPE_DIR, REPO_ROOT, YAML_MAX_NODES, BoundedSafeLoader, YAMLTooLarge,
                                  load_recipe, load_yaml, recipe_path)
from bigltr.config.overrides import (EXAMPLE, apply_mapping, coerce, parse_overrides, parse_value, set_key,
                                     split_override, unknown_key)
from bigltr.config.validation import cache_amp, image_hw, validate
from bigltr.config.build import build_config, config_from_dict, save_config, to_dict
from bigltr.config.diff import config_diff, flatten, key_in, same_value

__all__ = [
    "ConfigError",
    "AUGS", "BATCH_HELP", "MICRO_HELP", "SCHEMA", "TRACKERS", "Config", "DataConfig", "DistConfig", "EvalConfig",
    "FeatureCacheConfig", "LogConfig", "MaxNormConfig", "ModelConfig", "SchemaKey", "Stage1Config", "Stage2Config",
    "TrainAug", "field_entry", "opt", "section", "valid_keys",
    "BatchPlan", "batch_plan",
    "RECIPE_DIR", "REPO_ROOT", "YAML_MAX_NODES", "BoundedSafeLoader", "YAMLTooLarge", "load_recipe", "load_yaml",
    "recipe_path",
    "EXAMPLE", "apply_mapping", "coerce", "parse_overrides", "parse_value", "set_key", "split_override",
    "unknown_key",
    "cache_amp", "image_hw", "validate",
    "build_config", "config_from_dict", "save_config", "to_dict",
    "config_diff", "flatten", "key_in", "same_value",
]

"""Help generated from the config, for bigltr's entry points.

Every command that takes config keys (bigltr-train, bigltr-tune, bigltr-eval, bigltr-ablation) reads its `key=value`
arguments with `split_override` / `parse_overrides` of bigltr.config, so `--key=value`, spaces around the key and an
empty value mean the same everywhere. `config_help()` lists every key of `bigltr.config.Config` with its type,
default and description, read from the config's one walk of its schema (`bigltr.config.SCHEMA`, the fields'
`metadata["help"]`): adding a field adds it to --help.

Only `bigltr.config` (which does not import this module) and PyYAML are imported: `--help` and config errors answer
before torch is loaded.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

from bigltr.config import SCHEMA


# ----------------------------------------------------------------------------------------------- help
@dataclasses.dataclass
class KeyDoc:
    key: str  # dotted, as on the command line
    type: str  # int, float, bool, str, list[float], or the choices a|b|c
    default: str  # as it would be typed on the command line
    help: str


def format_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(c) for c in typing.get_args(tp))
    if origin is list:
        return f"list[{format_type(typing.get_args(tp)[0])}]"
    if origin in (types.UnionType, typing.Union):
        return "|".join(format_type(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def format_value(value: Any) -> str:
    """A value as it would be typed after `key=` (and as the parser reads it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return repr(value)


def section_docs() -> list[tuple[str, str]]:
    """(dotted section, description) of every nested config section, in declaration order."""
    return [(key, entry.help) for key, entry in SCHEMA.items() if entry.is_section]


def key_docs() -> list[KeyDoc]:
    """Every config key (the same list as `bigltr.config.valid_keys()`) with its type, default and description."""
    return [KeyDoc(key, format_type(entry.type), format_value(entry.default), " ".join(entry.help.split()))
            for key, entry in SCHEMA.items() if not entry.is_section]


def config_help() -> str:
    """The key reference printed by `bigltr-train --help`: per section, `key: TYPE = DEFAULT` and a description."""
    sections = dict(section_docs())
    lines = ["Config keys: set any of them as key=value on the command line or as nested YAML in a recipe.",
             "Each key is shown as `key: TYPE = DEFAULT` (a|b|c: one of these values), its description below it.",
             "Defaults are the dataclass defaults of bigltr/config/schema.py; a recipe (recipe=NAME) changes many "
             "of them."]
    current = None
    for d in key_docs():
        section = d.key.rpartition(".")[0]
        if section != current:
            current = section
            lines.append("")
            lines.append(f"[{section}] {sections.get(section, '')}".rstrip() if section else "[top level]")
        lines.append(f"  {d.key}: {d.type} = {d.default}")
        lines.append(f"      {d.help}")
    return "\n".join(lines)


TRAIN_USAGE = """\
usage: python -m bigltr.train [recipe=NAME] [key=value ...]
       bigltr-train [recipe=NAME] [key=value ...]
       accelerate launch [ACCELERATE OPTIONS] bigltr/train.py [recipe=NAME] [key=value ...]
       torchrun --nproc_per_node N -m bigltr.train [recipe=NAME] [key=value ...]

Trains a long-tailed classifier with weight balancing: stage 1 (features: cross-entropy + tuned weight decay), then
stage 2 (classifier: class-balanced loss + weight decay + MaxNorm), and writes <out>/results.json, table.md, plots
and stage{1,2}/best.pt.

recipe=NAME is a file in recipes/ (fmnist_lt, cifar100_lt, imagenet_lt, inat2018, ...) or a path to a YAML file;
key=value sets one key (dotted for nested keys: stage2.maxnorm.radius=0.2). Values are YAML scalars (5e-3, true,
[0.5, 0.5]). An unknown key or a wrong type stops before any work, naming the closest valid key.

Exit codes: 0 done; 2 bad input (config, data, run directory in use); 3 the loss or weights became non-finite;
4 a checkpoint could not be written or read; 75 stopped on request (resume with resume=auto); 1 anything else.

After training: bigltr-eval CHECKPOINT data.root=DIR [split=test] (evaluate a checkpoint on any split);
bigltr-export RUN_DIR OUT (the model in timm's model.safetensors + config.json layout).
"""


def train_help() -> str:
    return TRAIN_USAGE + "\n" + config_help()

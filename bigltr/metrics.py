"""Balanced accuracy and the Many / Medium / Few class groups, from per-class correct/total counts.

Many: > many_thr training images; Few: < few_thr; Medium: the rest (paper: 100 / 20). A group with no class is
reported as None (absent), never as 0%. The counts that define the groups are the OFFICIAL training counts
(:func:`group_counts`): a validation hold-out or a skipped file changes what is trained on, not which group a
class belongs to.
"""
from __future__ import annotations

from typing import Sequence

import torch


def group_counts(info: dict) -> list[int]:
    """Per-class training counts that define the Many / Medium / Few groups of a dataset's ``_info.json``: its
    ``official_train_counts`` (the source's official training set, before any validation hold-out and any
    undecodable file) when present, else ``class_counts`` (older folders, idx: there the train shards ARE the
    official long-tailed training set)."""
    counts = info.get("official_train_counts")
    return list(counts if counts is not None else info["class_counts"])


def group_index(class_counts: Sequence[int], many_thr: int, few_thr: int) -> dict[str, torch.Tensor]:
    """{"many", "medium", "few": boolean mask over classes} (vectorised: cheap at 100,000 classes)."""
    n = torch.as_tensor(list(class_counts), dtype=torch.long)
    many, few = n > many_thr, n < few_thr
    return {"many": many, "medium": ~many & ~few, "few": few}


def class_groups(class_counts: Sequence[int], many_thr: int, few_thr: int) -> dict[str, list[int]]:
    return {k: m.nonzero().flatten().tolist() for k, m in group_index(class_counts, many_thr, few_thr).items()}


def summarize(correct: torch.Tensor, total: torch.Tensor, class_counts: Sequence[int], many_thr: int,
              few_thr: int) -> dict:
    """{"all", "many", "medium", "few": % (balanced: mean of per-class accuracy), "per_class": [%...]}.

    Classes without evaluation samples are left out of every mean (and their per_class entry is None).
    """
    correct, total = correct.double().cpu(), total.double().cpu()
    has = total > 0
    acc = torch.where(has, 100.0 * correct / total.clamp_min(1), torch.zeros_like(total))

    def mean_of(mask):
        sel = acc[mask & has]
        return round(float(sel.mean()), 4) if sel.numel() else None

    out = {"all": mean_of(torch.ones_like(has))}
    for name, mask in group_index(class_counts, many_thr, few_thr).items():
        out[name] = mean_of(mask)
    out["per_class"] = [round(a, 4) if h else None for a, h in zip(acc.tolist(), has.tolist())]
    out["num_samples"] = int(total.sum())
    return out


def format_table(rows: dict[str, dict], title: str = "") -> str:
    """Markdown table of Many/Medium/Few/All for {row name: metrics}."""
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [title] if title else []
    lines += ["| | Many | Medium | Few | All |", "|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {f(m['many'])} | {f(m['medium'])} | {f(m['few'])} | {f(m['all'])} |")
    return "\n".join(lines)

"""Balanced accuracy and the Many / Medium / Few class groups, from per-class correct/total counts.

Many: > many_thr training images; Few: < few_thr; Medium: the rest (paper: 100 / 20). A group with no class is
reported as None (absent), never as 0%.
"""
from __future__ import annotations

from typing import Sequence

import torch


def class_groups(class_counts: Sequence[int], many_thr: int, few_thr: int) -> dict[str, list[int]]:
    groups = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(class_counts):
        groups["many" if n > many_thr else "few" if n < few_thr else "medium"].append(c)
    return groups


def summarize(correct: torch.Tensor, total: torch.Tensor, class_counts: Sequence[int], many_thr: int,
              few_thr: int) -> dict:
    """{"all", "many", "medium", "few": % (balanced: mean of per-class accuracy), "per_class": [%...]}.

    Classes without evaluation samples are left out of every mean (and their per_class entry is None).
    """
    correct, total = correct.double().cpu(), total.double().cpu()
    has = total > 0
    acc = torch.where(has, 100.0 * correct / total.clamp_min(1), torch.zeros_like(total))

    def mean_of(classes):
        idx = [c for c in classes if has[c]]
        return round(float(acc[idx].mean()), 4) if idx else None

    out = {"all": mean_of(range(len(class_counts)))}
    for name, members in class_groups(class_counts, many_thr, few_thr).items():
        out[name] = mean_of(members)
    out["per_class"] = [round(float(a), 4) if h else None for a, h in zip(acc, has)]
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

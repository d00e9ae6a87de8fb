"""PNG plots of a run: per-class classifier weight norms (the paper's key picture) and per-class accuracy.

Classes are ordered by training count (most frequent first), as in the paper's figures.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def _order(class_counts):
    return sorted(range(len(class_counts)), key=lambda c: -class_counts[c])


def plot_weight_norms(norms_by_stage: dict[str, list[float]], class_counts: list[int], path, radius=None) -> None:
    order = _order(class_counts)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, norms in norms_by_stage.items():
        ax.plot(range(len(order)), [norms[c] for c in order], marker="o" if len(order) <= 50 else None,
                ms=3, label=name)
    if radius is not None:
        ax.axhline(radius, ls="--", c="grey", lw=1, label=f"MaxNorm radius {radius:.3f}")
    ax.set_xlabel("class (sorted by training images, most first)")
    ax.set_ylabel("classifier weight norm ||w_c||")
    ax2 = ax.twinx()
    ax2.bar(range(len(order)), [class_counts[c] for c in order], color="grey", alpha=0.15)
    ax2.set_ylabel("training images")
    ax.legend(loc="upper right")
    ax.set_title("Per-class classifier weight norms")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_norm_evolution(per_epoch: list[list[float]], class_counts: list[int], path, title: str) -> None:
    """Row norm of each class (colour: frequency rank) across epochs."""
    order = _order(class_counts)
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    for rank, c in enumerate(order):
        ax.plot(range(1, len(per_epoch) + 1), [e[c] for e in per_epoch], color=cmap(rank / max(1, len(order) - 1)),
                lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("||w_c|| (yellow: rarest classes)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_class_accuracy(acc_by_stage: dict[str, list], class_counts: list[int], path) -> None:
    order = _order(class_counts)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(acc_by_stage))
    for i, (name, acc) in enumerate(acc_by_stage.items()):
        ax.bar([x + i * width for x in range(len(order))], [acc[c] or 0.0 for c in order], width=width, label=name)
    ax.set_xlabel("class (sorted by training images, most first)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    ax.set_title("Per-class test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

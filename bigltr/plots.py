"""PNG plots of a run (per-class classifier weight norms: the paper's key picture; per-class accuracy; row norms
per epoch) and of tools/ablation.py (the ablation rows).

Classes are ordered by training count (most frequent first), as in the paper's figures. Legends sit outside the
axes, so they never cover data.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

MANY_CLASSES = 50  # above this, no per-class markers, bars or class-name ticks


def _order(class_counts):
    return sorted(range(len(class_counts)), key=lambda c: -class_counts[c])


def _legend_above(ax, ncol: int) -> None:
    """Legend in one row above the axes (under the title), outside the data area."""
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=ncol, frameon=False, fontsize=9,
              borderaxespad=0.0)


def _class_ticks(ax, order, class_names) -> None:
    """Integer class-rank ticks; class names (rotated) when there are few classes and names are known."""
    if class_names and len(order) <= 30:
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([class_names[c] for c in order], rotation=40, ha="right", fontsize=8)
        ax.set_xlabel("class (sorted by training images, most first)")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("class rank (sorted by training images, most first)")


def plot_weight_norms(norms_by_stage: dict[str, list[float]], class_counts: list[int], path, radius=None,
                      class_names: list[str] | None = None) -> None:
    order = _order(class_counts)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax2 = ax.twinx()  # training images per class, behind the norms
    ax2.bar(range(len(order)), [class_counts[c] for c in order], color="grey", alpha=0.15, width=0.9,
            label="training images (right axis)")
    ax2.set_ylabel("training images")
    ax.set_zorder(ax2.get_zorder() + 1)  # the norm lines above the count bars
    ax.patch.set_visible(False)
    for name, norms in norms_by_stage.items():
        ax.plot(range(len(order)), [norms[c] for c in order], marker="o" if len(order) <= MANY_CLASSES else None,
                ms=3, label=name)
    if radius is not None:
        ax.axhline(radius, ls="--", c="grey", lw=1, label=f"MaxNorm radius {radius:.3f}")
    ax.set_ylabel("classifier weight norm ||w_c||")
    _class_ticks(ax, order, class_names)
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=4, frameon=False,
              fontsize=8, borderaxespad=0.0)
    fig.suptitle("Per-class classifier weight norms", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_norm_evolution(per_epoch: list[list[float]], class_counts: list[int], path, title: str) -> None:
    """Row norm of each class (colour: frequency rank) across epochs."""
    order = _order(class_counts)
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    n = len(order)
    epochs = range(1, len(per_epoch) + 1)
    for rank, c in enumerate(order):
        ax.plot(epochs, [e[c] for e in per_epoch], color=cmap(rank / max(1, n - 1)), lw=1,
                marker="o" if len(per_epoch) == 1 or (len(per_epoch) <= 20 and n <= MANY_CLASSES) else None,
                ms=2.5 if n <= MANY_CLASSES else 1.5)  # one epoch: a line of one point shows only as a marker
    if len(per_epoch) <= 12:
        ax.set_xticks(list(epochs))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(per_epoch) == 1:
        ax.set_xlim(0.5, 1.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("classifier row norm ||w_c||")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max(1, n - 1)))
    cb = fig.colorbar(sm, ax=ax, pad=0.02)
    cb.set_label("class rank by training images (0 = most)")
    cb.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_class_accuracy(acc_by_stage: dict[str, list], class_counts: list[int], path,
                            class_names: list[str] | None = None) -> None:
    order = _order(class_counts)
    n = len(order)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    nan = float("nan")  # a class without test samples: no bar, not a 0% one
    if n <= MANY_CLASSES:
        k = max(1, len(acc_by_stage))
        width = 0.8 / k
        for i, (name, acc) in enumerate(acc_by_stage.items()):
            bars = ax.bar([x + (i - (k - 1) / 2) * width for x in range(n)],
                          [nan if acc[c] is None else acc[c] for c in order], width=width, label=name)
            if n * k <= 40:  # the values, so that 0% is seen (and told apart from a class without test samples)
                ax.bar_label(bars, labels=["n/a" if acc[c] is None else f"{acc[c]:.0f}" for c in order],
                             fontsize=7, padding=1, rotation=90 if k > 1 else 0)
        ax.set_xlim(-0.6, n - 0.4)
    else:  # thousands of classes: one line per stage, a moving average over ranks (bars would be a smear)
        w = max(1, n // 100)
        for name, acc in acc_by_stage.items():
            vals = [acc[c] for c in order]
            sm = []
            for i in range(n):
                win = [v for v in vals[max(0, i - w // 2): i + w // 2 + 1] if v is not None]
                sm.append(sum(win) / len(win) if win else nan)
            ax.plot(range(n), sm, lw=1.2, label=name)
        ax.text(0.99, 0.02, f"moving average over {w} classes" if w > 1 else "", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=8, color="grey")
    ax.set_ylim(0, 112)  # room for the value labels over 100% bars
    ax.set_ylabel("test accuracy (%)")
    _class_ticks(ax, order, class_names)
    _legend_above(ax, ncol=len(acc_by_stage))
    fig.suptitle("Per-class test accuracy", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ablation(rows: list[tuple[str, dict]], path, title: str,
                  groups: tuple[str, ...] = ("many", "medium", "few", "all")) -> None:
    """tools/ablation.py's rows as a dot plot: one panel per class group (Many, Medium, Few, All), the rows on the
    shared vertical axis in table order, each panel's horizontal axis zoomed to its own values (the differences
    that matter are a few points) and every value written next to its dot; the best row of a panel is filled.
    `rows`: [(name, {group: % or None})] (the test metrics)."""
    names = [n for n, _ in rows]
    fig, axes = plt.subplots(1, len(groups), sharey=True, figsize=(3.1 + 2.2 * len(groups), 1.5 + 0.42 * len(rows)))
    ys = list(range(len(rows)))
    for ax, g in zip(axes, groups):
        vals = [m.get(g) for _, m in rows]
        have = [(y, v) for y, v in zip(ys, vals) if v is not None]
        ax.set_title(g.capitalize(), fontsize=10, fontweight="bold" if g == "all" else "normal")
        ax.grid(axis="y", color="0.9", lw=0.8)
        ax.grid(axis="x", color="0.93", lw=0.6)
        ax.set_axisbelow(True)
        ax.tick_params(axis="x", labelsize=8)
        if not have:
            ax.text(0.5, 0.5, "no class in\nthis group", transform=ax.transAxes, ha="center", va="center",
                    fontsize=9, color="grey")
            ax.set_xticks([])
            continue
        lo, hi = min(v for _, v in have), max(v for _, v in have)
        span = max(hi - lo, 2.0)  # at least 2 points wide: equal values do not blow up the scale
        ax.set_xlim(lo - 0.15 * span, hi + 0.45 * span)  # room on the right for the value labels
        ax.xaxis.set_major_locator(MaxNLocator(4))
        best = max(v for _, v in have)
        for y, v in have:
            top = math.isclose(v, best)
            ax.plot([v], [y], "o", ms=6, color="C0", mfc="C0" if top else "white", mew=1.4)
            ax.annotate(f"{v:.1f}", (v, y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8,
                        fontweight="bold" if top else "normal")
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(names, fontsize=9)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)  # first row on top, as in the table
    fig.suptitle(title, fontsize=11)
    fig.text(0.99, 0.01, "test, balanced top-1 %; each panel has its own scale; filled: best row of the panel",
             ha="right", va="bottom", fontsize=8, color="grey")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)

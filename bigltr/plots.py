"""PNG plots of a run (per-class classifier weight norms: the paper's key picture; per-class accuracy; row norms
per epoch) and of tools/ablation.py (the ablation rows).

Classes are ordered by training count (most frequent first), as in the paper's figures, and the Many / Medium / Few
groups (> many_thr, the rest, < few_thr training images) are marked on that axis. The plots read the same at 10,
8,142 and 100,000 classes:

- up to MANY_CLASSES classes: one marker (bar) per class, class names when known and few;
- above: every class as one faint point (the cloud, rasterised), with a curve over it that summarises classes of
  similar rank: the median and the 10-90% band of bins of neighbouring ranks (bins never straddle a group
  boundary), or the bin mean for accuracy; the training counts on a log axis on the right;
- the per-epoch row norms: one line per class up to FEW_LINES classes, else per group the median and the 10-90%
  band across epochs.

Cost is O(C) with small constants (numpy; about a few hundred bins and a few hundred count steps reach matplotlib,
plus one point per class in the cloud). Legends sit outside the axes, so they never cover data.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.patheffects as pe  # noqa: E402
import matplotlib.transforms as mtransforms  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

MANY_CLASSES = 50  # above this, no per-class markers, bars or class-name ticks: a cloud and a summary curve
FEW_LINES = 20  # norm evolution: one line per class up to this many classes, else group bands
TARGET_BINS = 120  # summary-curve bins over all classes (each group gets its share, at least one)
MIN_BIN = 5  # classes per bin at least
GROUPS = ("many", "medium", "few")
GROUP_COLORS = {"many": "#6a3d9a", "medium": "#b15928", "few": "#1b9e77"}  # not the stages' C0 / C1
DPI = 110
OUTLINE = [pe.Stroke(linewidth=3.4, foreground="white"), pe.Normal()]  # a summary curve stands out of its cloud


def _order(class_counts) -> np.ndarray:
    """Class indices sorted by training count, most first (stable: equal counts keep class order)."""
    return np.argsort(-np.asarray(class_counts, dtype=np.int64), kind="stable")


def group_spans(sorted_counts: np.ndarray, many_thr: int, few_thr: int) -> list[tuple[str, int, int]]:
    """[(group, first rank, end rank)] of Many / Medium / Few in count-sorted order (bigltr.metrics' rule: Many
    > many_thr, Few < few_thr, Medium the rest); an empty group has first == end."""
    c = np.asarray(sorted_counts)
    n_many = int(np.count_nonzero(c > many_thr))
    n_few = int(np.count_nonzero(c < few_thr))
    n = len(c)
    return [("many", 0, n_many), ("medium", n_many, n - n_few), ("few", n - n_few, n)]


def _bin_edges(spans, n: int) -> list[tuple[int, int]]:
    """Bins of neighbouring ranks, within each group: about TARGET_BINS in all, at least MIN_BIN classes each."""
    bins = []
    for _, lo, hi in spans:
        size = hi - lo
        if size == 0:
            continue
        k = max(1, min(round(TARGET_BINS * size / n), size // MIN_BIN))
        e = np.linspace(lo, hi, k + 1).round().astype(int)
        bins += [(int(a), int(b)) for a, b in zip(e[:-1], e[1:]) if b > a]
    return bins


def binned(values_sorted: np.ndarray, bins, stat: str = "median"):
    """(x: bin centres, centre: median or mean, lo: 10%, hi: 90%) of `values_sorted` (NaN: no value) per bin,
    NaN rows between groups so a line breaks at a group boundary."""
    xs, mid, lo, hi = [], [], [], []
    for a, b in bins:
        v = values_sorted[a:b]
        v = v[~np.isnan(v)]
        xs.append((a + b - 1) / 2)
        if v.size == 0:
            mid.append(np.nan), lo.append(np.nan), hi.append(np.nan)
        else:
            q10, q50, q90 = np.quantile(v, (0.1, 0.5, 0.9))
            mid.append(float(v.mean()) if stat == "mean" else q50)
            lo.append(q10), hi.append(q90)
    return np.array(xs), np.array(mid), np.array(lo), np.array(hi)


def _break_at_groups(x, ys, spans):
    """Insert a NaN point at every inner group boundary, so lines and bands do not join two groups."""
    cuts = sorted({lo - 0.5 for _, lo, hi in spans if hi > lo > 0})  # starts of the non-empty groups after the first
    if not cuts:
        return x, ys
    idx = np.searchsorted(x, cuts)
    x = np.insert(x, idx, cuts)
    return x, [np.insert(y, idx, np.nan) for y in ys]


def _cloud_alpha(n: int) -> float:
    return float(min(0.5, max(0.015, 9.0 / math.sqrt(n))))


def _mark_groups(ax, spans, color_by_group: bool = False) -> None:
    """Dotted lines at the group boundaries, each group's name and size along the top of the axes; an empty group
    is named in the x label ("no Few class")."""
    trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    present = [(g, lo, hi) for g, lo, hi in spans if hi > lo]
    for i, (g, lo, hi) in enumerate(present):
        if i > 0:
            ax.axvline(lo - 0.5, color="0.45", ls=":", lw=1, zorder=1)
        ax.text((lo + hi - 1) / 2, 0.985, f"{g.capitalize()}\nn={hi - lo:,}", transform=trans, ha="center",
                va="top", fontsize=7.5, color=GROUP_COLORS[g] if color_by_group else "0.25", fontweight="bold",
                zorder=5, bbox=dict(facecolor="white", edgecolor="none", alpha=0.7, pad=0.8))
    absent = [g.capitalize() for g, lo, hi in spans if hi == lo]
    if absent:
        ax.set_xlabel(ax.get_xlabel() + f"; no {' or '.join(absent)} class")


def _thousands(ax, n: int) -> None:
    if n >= 10000:
        ax.xaxis.set_major_formatter(lambda v, _pos: f"{v / 1000:g}k" if v else "0")


def _counts_axis(ax, sorted_counts: np.ndarray):
    """Training images per class on a log axis on the right, behind the data: bars for a few classes, else the
    (monotone) count curve as filled steps, one step per distinct count."""
    n = len(sorted_counts)
    ax2 = ax.twinx()
    ax2.set_yscale("log")
    c = np.maximum(sorted_counts.astype(float), 0.8)  # a class with 0 images still shows, at the floor
    floor = 0.5 * float(c.min())
    if n <= MANY_CLASSES:
        ax2.bar(np.arange(n), c - floor, bottom=floor, color="grey", alpha=0.18, width=0.9,
                label="training images (right, log)")
    else:
        change = np.flatnonzero(np.diff(c)) + 1
        starts = np.r_[0, change]
        edges = np.r_[starts, n] - 0.5
        ax2.stairs(c[starts], edges, baseline=floor, fill=True, color="grey", alpha=0.1, lw=0)
        ax2.stairs(c[starts], edges, baseline=None, color="0.55", lw=1, label="training images (right, log)")
    ax2.set_ylim(floor, float(c.max()) * 1.6)
    ax2.set_ylabel("training images (log scale)")
    ax.set_zorder(ax2.get_zorder() + 1)  # the data above the counts
    ax.patch.set_visible(False)
    return ax2


def _class_axis(ax, order, class_names, n: int) -> None:
    """Class names (rotated) for a few named classes; else integer class ranks."""
    if class_names and n <= 30:
        ax.set_xticks(range(n))
        ax.set_xticklabels([class_names[c] for c in order], rotation=40, ha="right", fontsize=8)
        ax.set_xlabel("class (sorted by training images, most first)")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("class rank (sorted by training images, most first)")
    ax.set_xlim(-0.6, n - 0.4)
    _thousands(ax, n)


def _legend_above(ax, handles=None, labels=None, ncol: int = 4) -> None:
    """Legend in one row above the axes (under the title), outside the data area."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=ncol, frameon=False, fontsize=8,
              borderaxespad=0.0, markerscale=1.5)


def _nan_array(values) -> np.ndarray:
    """A list with None (no value) as a float array with NaN."""
    if isinstance(values, np.ndarray):
        return values.astype(float)
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def plot_weight_norms(norms_by_stage: dict[str, list[float]], class_counts: list[int], path, radius=None,
                      class_names: list[str] | None = None, many_thr: int = 100, few_thr: int = 20) -> None:
    """Per-class classifier row norms of each stage against the class's training count rank."""
    order = _order(class_counts)
    n = len(order)
    sc = np.asarray(class_counts)[order]
    spans = group_spans(sc, many_thr, few_thr)
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    ax2 = _counts_axis(ax, sc)
    x = np.arange(n)
    bins = _bin_edges(spans, n)
    for i, (name, norms) in enumerate(norms_by_stage.items()):
        y = _nan_array(norms)[order]
        color = f"C{i}"
        if n <= MANY_CLASSES:
            ax.plot(x, y, marker="o", ms=3, color=color, label=name)
            continue
        ax.plot(x, y, ls="none", marker=".", ms=2.5, mew=0, color=color, alpha=_cloud_alpha(n), rasterized=True)
        bx, mid, lo, hi = binned(y, bins)
        bx, (mid, lo, hi) = _break_at_groups(bx, (mid, lo, hi), spans)
        ax.fill_between(bx, lo, hi, color=color, alpha=0.2, lw=0)
        ax.plot(bx, mid, color=color, lw=1.8, label=f"{name}: median (band 10-90%)", path_effects=OUTLINE)
    if radius is not None:
        ax.axhline(radius, ls="--", c="0.3", lw=1, label=f"MaxNorm radius {radius:.3f}")
    ax.set_ylabel("classifier weight norm ||w_c||")
    lo_y, hi_y = ax.get_ylim()
    ax.set_ylim(lo_y, hi_y + 0.18 * (hi_y - lo_y))  # headroom for the group labels
    _class_axis(ax, order, class_names, n)
    _mark_groups(ax, spans)
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    _legend_above(ax, handles + h2, labels + l2, ncol=3)
    if n > MANY_CLASSES:
        ax.text(0.005, 0.015, f"{n:,} classes; dots: one per class", transform=ax.transAxes, fontsize=7.5,
                color="0.4", va="bottom")
    fig.suptitle("Per-class classifier weight norms", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_norm_evolution(per_epoch, class_counts: list[int], path, title: str, radius=None, many_thr: int = 100,
                        few_thr: int = 20) -> None:
    """Classifier row norms across epochs (`per_epoch`: [epochs][classes]): one line per class (colour: count rank)
    up to FEW_LINES classes; else the median and the 10-90% band of each group per epoch."""
    a = np.asarray(per_epoch, dtype=float)
    if a.ndim == 1:
        a = a[None, :]
    order = _order(class_counts)
    n, n_ep = len(order), a.shape[0]
    epochs = np.arange(1, n_ep + 1)
    marker = "o" if n_ep <= 20 else None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    if n <= FEW_LINES:
        cmap = plt.get_cmap("viridis")
        for rank, c in enumerate(order):
            ax.plot(epochs, a[:, c], color=cmap(rank / max(1, n - 1)), lw=1, marker=marker, ms=2.5)
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max(1, n - 1)))
        cb = fig.colorbar(sm, ax=ax, pad=0.02)
        cb.set_label("class rank by training images (0 = most)")
        cb.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        sc = np.asarray(class_counts)[order]
        for g, lo, hi in group_spans(sc, many_thr, few_thr):
            if hi == lo:
                continue
            q10, q50, q90 = np.quantile(a[:, order[lo:hi]], (0.1, 0.5, 0.9), axis=1)
            color = GROUP_COLORS[g]
            ax.fill_between(epochs, q10, q90, color=color, alpha=0.2, lw=0, step=None)
            ax.plot(epochs, q50, color=color, lw=1.8, marker=marker, ms=3,
                    label=f"{g.capitalize()} (n={hi - lo:,}): median, band 10-90%")
        if radius is not None:
            ax.axhline(radius, ls="--", c="0.3", lw=1, label=f"MaxNorm radius {radius:.3f}")
        _legend_above(ax, ncol=2)
    if n_ep <= 12:
        ax.set_xticks(list(epochs))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if n_ep == 1:
        ax.set_xlim(0.5, 1.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("classifier row norm ||w_c||")
    if n <= FEW_LINES:
        ax.set_title(title, fontsize=11)
    else:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_per_class_accuracy(acc_by_stage: dict[str, list], class_counts: list[int], path,
                            class_names: list[str] | None = None, many_thr: int = 100, few_thr: int = 20) -> None:
    """Per-class test accuracy (None: a class without test samples) against the class's training count rank: bars
    for a few classes; else the cloud, the mean of each bin of neighbouring ranks, and each group's mean (the
    table's Many / Medium / Few value) as a dashed segment over the group."""
    order = _order(class_counts)
    n = len(order)
    sc = np.asarray(class_counts)[order]
    spans = group_spans(sc, many_thr, few_thr)
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    nan = float("nan")
    if n <= MANY_CLASSES:
        k = max(1, len(acc_by_stage))
        width = 0.8 / k
        for i, (name, acc) in enumerate(acc_by_stage.items()):
            bars = ax.bar([x + (i - (k - 1) / 2) * width for x in range(n)],
                          [nan if acc[c] is None else acc[c] for c in order], width=width, label=name)
            if n * k <= 40:  # the values, so that 0% is seen (and told apart from a class without test samples)
                ax.bar_label(bars, labels=["n/a" if acc[c] is None else f"{acc[c]:.0f}" for c in order],
                             fontsize=7, padding=1, rotation=90 if k > 1 else 0)
    else:
        bins = _bin_edges(spans, n)
        x = np.arange(n)
        for i, (name, acc) in enumerate(acc_by_stage.items()):
            y = _nan_array(acc)[order]
            color = f"C{i}"
            ax.plot(x, y, ls="none", marker=".", ms=2.5, mew=0, color=color, alpha=_cloud_alpha(n), rasterized=True)
            bx, mean, _, _ = binned(y, bins, stat="mean")
            bx, (mean,) = _break_at_groups(bx, (mean,), spans)
            ax.plot(bx, mean, color=color, lw=1.8, label=f"{name}: bin mean", path_effects=OUTLINE)
            for g, lo, hi in spans:
                v = y[lo:hi]
                if hi > lo and np.any(~np.isnan(v)):
                    ax.hlines(float(np.nanmean(v)), lo - 0.5, hi - 0.5, colors=color, linestyles="--", lw=1.2,
                              label=f"{name}: group mean" if g == next(s[0] for s in spans if s[2] > s[1]) else None)
        ax.text(0.005, 0.015, f"{n:,} classes; dots: one per class", transform=ax.transAxes, fontsize=7.5,
                color="0.4", va="bottom")
    ax.set_ylim(-2, 125)  # room for the value labels over 100% bars and for the group labels
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("test accuracy (%)")
    _class_axis(ax, order, class_names, n)
    _mark_groups(ax, spans)
    _legend_above(ax, ncol=4 if n > MANY_CLASSES else len(acc_by_stage))
    fig.suptitle("Per-class test accuracy", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
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

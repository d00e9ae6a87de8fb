"""bigltr.plots at 10 and 100,000 classes: the PNGs are written, the summary curves are the statistics computed
another way (plain Python over count-sorted classes), and 100k classes finish (no timing assertion)."""
import statistics

import numpy as np
import pytest

from bigltr import plots


def _synthetic(C, seed=0):
    rng = np.random.default_rng(seed)
    counts = np.maximum(1, (1000 * np.geomspace(1, 1 / 500, C))).astype(int)[rng.permutation(C)]
    norms = 0.3 * counts ** 0.3 * rng.lognormal(0, 0.1, C)
    acc = np.clip(30 * np.log10(counts) + rng.normal(0, 10, C), 0, 100)
    return counts, norms, acc


def test_group_spans_and_bins_follow_the_metrics_groups():
    from bigltr.metrics import class_groups

    counts, _, _ = _synthetic(1000)
    order = plots._order(counts)
    assert list(counts[order]) == sorted(counts, reverse=True)
    spans = plots.group_spans(counts[order], 100, 20)
    ref = class_groups(counts.tolist(), 100, 20)
    for g, lo, hi in spans:  # each span holds exactly that group's classes
        assert sorted(order[lo:hi].tolist()) == ref[g]
    bins = plots._bin_edges(spans, len(counts))
    assert bins[0][0] == 0 and bins[-1][1] == 1000 and all(a[1] == b[0] for a, b in zip(bins, bins[1:]))
    inner = {lo for _, lo, hi in spans if hi > lo}
    assert inner <= {a for a, _ in bins}  # no bin straddles a group boundary
    assert all(b - a >= plots.MIN_BIN for a, b in bins) and 50 <= len(bins) <= 2 * plots.TARGET_BINS


def test_binned_median_band_and_mean_against_python():
    vals = np.array([5.0, 1.0, np.nan, 3.0, 2.0, 8.0, 7.0, np.nan, np.nan, np.nan, 4.0])
    bins = [(0, 5), (5, 7), (7, 10), (10, 11)]
    x, mid, lo, hi = plots.binned(vals, bins)
    assert x.tolist() == [2.0, 5.5, 8.0, 10.0]
    assert mid[0] == statistics.median([5, 1, 3, 2]) == 2.5 and mid[1] == 7.5 and np.isnan(mid[2]) and mid[3] == 4
    # 10% / 90%: linear interpolation between order statistics (numpy's default) of 1, 2, 3, 5
    assert lo[0] == pytest.approx(1 + 0.3 * (2 - 1)) and hi[0] == pytest.approx(3 + 0.7 * (5 - 3))
    _, mean, _, _ = plots.binned(vals, bins, stat="mean")
    assert mean[0] == pytest.approx(11 / 4) and mean[1] == 7.5
    # a line breaks (NaN) at an inner group boundary, and only there
    bx, (m,) = plots._break_at_groups(np.array([1.0, 3.0, 6.0]), (np.array([1.0, 2.0, 3.0]),),
                                      [("many", 0, 5), ("medium", 5, 5), ("few", 5, 8)])
    assert bx.tolist() == [1.0, 3.0, 4.5, 6.0] and np.isnan(m[2]) and m[[0, 1, 3]].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("C", [10, 100_000])
def test_plots_are_written_at_10_and_100k_classes(tmp_path, C):
    counts, norms, acc = _synthetic(C)
    acc_list = [None if i % 97 == 3 else float(a) for i, a in enumerate(acc)]  # classes without test samples
    names = [f"c{i}" for i in range(C)] if C <= 30 else None
    epochs = norms[None, :] * np.linspace(0.2, 1.0, 4)[:, None]
    plots.plot_weight_norms({"stage 1": norms.tolist(), "stage 2": np.minimum(norms, 0.5).tolist()}, counts.tolist(),
                            tmp_path / "w.png", radius=0.5, class_names=names)
    plots.plot_per_class_accuracy({"stage 1": acc_list}, counts.tolist(), tmp_path / "a.png", class_names=names)
    plots.plot_norm_evolution(epochs.tolist() if C <= 30 else epochs, counts.tolist(), tmp_path / "e.png", "t",
                              radius=0.5)
    for f in ("w.png", "a.png", "e.png"):
        data = (tmp_path / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 600_000, (f, len(data))


def test_an_empty_group_is_named_in_the_axis_label(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_xlabel("class rank")
    plots._mark_groups(ax, plots.group_spans(np.array([500, 300, 50]), 100, 20))
    assert ax.get_xlabel() == "class rank; no Few class"
    assert sorted(t.get_text() for t in ax.texts) == ["Many\nn=2", "Medium\nn=1"]
    plt.close(fig)

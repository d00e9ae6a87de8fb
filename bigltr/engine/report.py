"""What a finished run shows: the summary table (table.md, printed) and the plots, from results.json and the config
that trained each stage."""
from __future__ import annotations

import logging
from pathlib import Path

from bigltr import plots
from bigltr.checkpoint import load_run_checkpoint
from bigltr.config import Config, to_dict
from bigltr.results import GROUPS, group_sizes, per_class_accuracy, read_weight_norms
from bigltr.rundir import STAGES, RunDir

log = logging.getLogger("bigltr")


def write_report(results: dict, out: Path, cfg: Config, ran: set[str]) -> str:
    """table.md (returned, for printing) and, with log.plots, the PNGs of a run whose stages are in `results`;
    `ran`: the stages this process trained (their config is `cfg`; the others' is read from their best.pt)."""
    if cfg.log.plots:  # off in tuning trials (bigltr-tune passes log.plots=false): nobody looks at them there
        write_plots(results, out)
    table = summary_table(results, stage_configs(cfg, out, results, ran))
    RunDir(out).table.write_text(table + "\n")
    return table


def stage_configs(cfg: Config, out: Path, results: dict, ran: set[str]) -> dict[str, dict]:
    """The config each stage in `results` was trained with: this run's for the stages it ran; for a stage it reused
    (stage=2 after an earlier stage=1 run, resume=auto after a finished stage) the config its best.pt embeds, which
    may differ from this run's (say stage1.weight_decay=0 then). A stage whose best.pt is unreadable is left out."""
    configs = {}
    for s in STAGES:
        if s not in results:
            continue
        if s in ran:
            configs[s] = to_dict(cfg)
            continue
        best = RunDir(out).best(s)
        try:  # mmap: only the config is read, not the weights
            configs[s] = load_run_checkpoint(best, strict=False, mmap=True)["config"]
        except Exception as e:  # noqa: BLE001 - a label is not worth failing a finished run for
            log.warning(f"{best}: no config readable ({type(e).__name__}: {e}); table.md names the "
                        f"row without its settings")
    return configs


LOSS_NAMES = {"ce": "CE", "cb_ce": "CB", "cb_official_bce": "CB-BCE (official)"}


def _num(v: float) -> str:
    """Short and exact: 0, 0.1, 0.05, 5e-3, 2.5e-4, 1e-5."""
    v = float(v)
    if v == 0 or 0.01 <= abs(v) < 1e4:
        return f"{v:g}"
    mant, exp = f"{v:.6e}".split("e")
    return f"{float(mant):g}e{int(exp)}"


def _wd(stage_cfg: dict) -> str:
    p = stage_cfg.get("wd_p", 2.0)
    return f"WD {_num(stage_cfg['weight_decay'])}" + (f" (p={_num(p)})" if p != 2 else "")


def stage_label(stage: str, config: dict | Config | None, radius: float | None = None) -> str:
    """Row name of one stage from the config that trained it, e.g. "stage 1 (CE + WD 5e-3)", "stage 1 (CE, WD 0)",
    "stage 2 (CB + WD 0.1 + MaxNorm step, r=0.662)", "stage 2 (CE, WD 0, MaxNorm off)": what is on joined by " + ",
    what is off after a comma. `radius`: stage 2's resolved MaxNorm radius (results' maxnorm_radius)."""
    name = f"stage {stage[-1]}"
    if config is None:
        return name
    if isinstance(config, Config):
        config = to_dict(config)
    sc = config[stage]
    on = ["CE" if stage == "stage1" else LOSS_NAMES.get(sc["loss"], sc["loss"])]
    off = []
    (on if sc["weight_decay"] > 0 else off).append(_wd(sc))
    if stage == "stage2":
        mn = sc["maxnorm"]
        if mn["when"] == "off":
            off.append("MaxNorm off")
        else:
            r = radius if radius is not None else mn["radius"] if mn["radius_mode"] == "absolute" else None
            m = f"MaxNorm {mn['when']}" + ("" if r is None else f", r={r:.3g}")
            if mn.get("tau", 1.0) != 1:
                m += f", tau={_num(mn['tau'])}" + (" (official projection)" if mn.get("projection") == "official"
                                                   else "")
            on.append(m)
    return f"{name} ({', '.join([' + '.join(on)] + off)})"


def summary_table(results: dict, configs: dict[str, dict | Config] | None = None) -> str:
    """Many / Medium / Few / All on test, each column headed with its number of classes ("Many (n=842)"); each row
    named from the config that trained its stage (`configs`: {"stage1": ..., "stage2": ...}, see `stage_configs`; a
    stage without one is named "stage N"). A group without classes is reported as absent, a group whose classes
    have no test sample as n/a."""
    configs = configs or {}
    rows = {}
    if "stage1" in results:
        rows[stage_label("stage1", configs.get("stage1"))] = results["stage1"]["test"]
        if "posthoc" in results["stage1"]:
            rows[f"stage 1 + {results['stage1']['posthoc']['method']}"] = results["stage1"]["posthoc"]["test"]
    if "stage2" in results:
        rows[stage_label("stage2", configs.get("stage2"), results["stage2"].get("maxnorm_radius"))] = \
            results["stage2"]["test"]
    title = "Test top-1 (%), balanced test set"
    partial = [r for r in rows.values() if r.get("expected_samples")]
    if partial:  # data.eval_partial: a truncated test split was evaluated as far as it could be read
        title += f", {partial[0]['samples']} of {partial[0]['expected_samples']} test samples (partial)"
    return format_table(rows, title, _sizes(results, configs))


def _sizes(results: dict, configs: dict) -> dict | None:
    """Classes per group: results' "groups", else (a results.json written before) counted from its class counts
    with the thresholds of a stage's config; None when neither is known."""
    if isinstance(results.get("groups"), dict):
        return results["groups"]
    counts = results.get("group_counts") or results.get("class_counts")
    for c in configs.values():
        data = (to_dict(c) if isinstance(c, Config) else c or {}).get("data", {})
        if counts is not None and "many_thr" in data and "few_thr" in data:
            return group_sizes(counts, data["many_thr"], data["few_thr"])
    return None


def format_table(rows: dict[str, dict], title: str = "", sizes: dict | None = None) -> str:
    """Markdown table of Many / Medium / Few / All for {row name: metrics}; `sizes` ({"many": n, ...}, see
    bigltr.results.group_sizes) heads each column with its number of classes; a group of 0 classes reads "absent"
    in every row, a value of None (no test sample in the group) "n/a"."""
    cols = list(GROUPS) + ["all"]
    n = dict(sizes or {})
    if sizes is not None:
        n["all"] = sum(int(sizes[g]) for g in GROUPS)

    def head(g):
        return g.capitalize() + (f" (n={int(n[g]):,})" if g in n else "")

    def cell(g, v):
        if g in n and int(n[g]) == 0:
            return "absent"
        return "n/a" if v is None else f"{v:.2f}"

    lines = [title] if title else []
    lines += ["| | " + " | ".join(head(g) for g in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(g, m.get(g)) for g in cols) + " |")
    return "\n".join(lines)


def write_plots(results: dict, out: Path) -> None:
    """weight_norms.png, per_class_accuracy.png and stage{1,2}_norm_evolution.png (bigltr.plots; O(classes))."""
    # classes ordered and grouped by the counts that define the groups (the official training counts when the
    # run trains on fewer, after a validation hold-out)
    counts, names = results.get("group_counts") or results["class_counts"], results.get("classes")
    groups = results.get("groups") or {}
    thr = {"many_thr": groups.get("many_thr", 100), "few_thr": groups.get("few_thr", 20)}
    run_dir = RunDir(out)
    norms = {f"stage {s[-1]}": results[s]["weight_norms"] for s in STAGES if s in results}
    radius = results.get("stage2", {}).get("maxnorm_radius")
    plots.plot_weight_norms(norms, counts, run_dir.plot("weight_norms"), radius=radius, class_names=names, **thr)
    accs = {f"stage {s[-1]}": per_class_accuracy(results[s]["test"]) for s in STAGES if s in results}
    plots.plot_per_class_accuracy(accs, counts, run_dir.plot("per_class_accuracy"), class_names=names, **thr)
    for s in STAGES:
        wn = read_weight_norms(run_dir.stage(s).path) if s in results else None
        if wn is not None:
            plots.plot_norm_evolution(wn["per_epoch"], counts, run_dir.plot(f"{s}_norm_evolution"),
                                      f"{s}: classifier row norms per epoch", radius=wn.get("radius"), **thr)

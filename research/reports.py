"""The reports of the experiments: the statistics over seeds, the markdown tables, the closing note, the few-clicks
verdict and the figures, all from <results>/experiments.csv. research/experiments.py runs the experiments and calls
write_report when they are done; to rebuild a report from its csv alone:

    python -m research.experiments --preset demo --report            # results/experiments.md and its figures
    python -m research.experiments --preset atlanta --report         # results/atlanta/experiments.md

Every cell is mean +/- sample std over seeds, and a comparison of two configurations is paired by seed (same seed =
same clicks and init). The experiments, presets and run keys are declared in research/experiments.py; this module
only reads them.
"""

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from research.experiments import (BASE_STATS, BASELINE, BUDGETS, CLICKS_PER_ROUND, EXPERIMENTS, LOW_BUDGETS, PRESETS,
                                  REFERENCES, ROUNDS, SETTING_OPTIONS, Reference, class_names, first_per_key,
                                  is_synthetic, own_folder)

# --------------------------------------------------------------------------- aggregation

def aggregate(values):
    """(mean, sample std (ddof 1), n) over the finite values; std is NaN for n < 2, mean NaN for n = 0."""
    v = np.array([float(x) for x in values if x is not None and math.isfinite(float(x))])
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def rows_for(rows, ckey):
    """The rows of one configuration, each run (key) once."""
    return first_per_key([r for r in rows if r["config_key"] == ckey])


def summarize(rows, ckey, fields=None):
    """{field: (mean, std, n)} over one configuration's runs; by default BASE_STATS and every iou_<class>."""
    sel = rows_for(rows, ckey)
    if fields is None:
        fields = list(BASE_STATS) + sorted({k for r in sel for k in r if k.startswith("iou_")})
    return {f: aggregate([r.get(f) for r in sel]) for f in fields}


def n_seeds(n):
    """'1 seed', '3 seeds'."""
    return f"{n} seed{'s' * (n != 1)}"


def fmt(stat, percent=True, digits=1):
    mean, std, n = stat
    if n == 0:
        return "not run"
    k = 100 if percent else 1
    s = f"{k * mean:.{digits}f}"
    return s if n < 2 else f"{s} ± {k * std:.{digits}f}"


def paired_difference(rows, ckey_a, ckey_b, field="miou"):
    """(mean, std, n) of a - b over the seeds both configurations have (same seed = same annotation)."""
    a = {r["seed"]: r[field] for r in rows_for(rows, ckey_a)}
    b = {r["seed"]: r[field] for r in rows_for(rows, ckey_b)}
    return aggregate([a[s] - b[s] for s in sorted(set(a) & set(b))])


def closing_numbers(rows, keys):
    """The three numbers of the closing note, from the baseline, no-weights, budget and dense runs."""
    key = keys.config_key
    base, dense = summarize(rows, key(BASELINE))["miou"], summarize(rows, key(replace(BASELINE, points=None)))["miou"]
    out = {"baseline": base, "dense": dense, "ratio": base[0] / dense[0] if base[2] and dense[2] else float("nan"),
           "weights_effect": paired_difference(rows, key(BASELINE), key(replace(BASELINE, class_weights="none"))),
           "weights_effect_oa": paired_difference(rows, key(BASELINE), key(replace(BASELINE, class_weights="none")),
                                                  "oa"),
           "sqrt_effect": paired_difference(rows, key(replace(BASELINE, class_weighting="sqrt")),
                                            key(replace(BASELINE, class_weights="none"))),
           "sqrt": summarize(rows, key(replace(BASELINE, class_weighting="sqrt")))["miou"],
           "smallest_within_5": None}
    if dense[2]:
        for n in BUDGETS:
            m = summarize(rows, key(replace(BASELINE, points=n)))["miou"]
            if m[2] and m[0] >= 0.95 * dense[0]:
                out["smallest_within_5"] = (n, m)
                break
    return out


# the goals: the best few-click CNN's share of the dense mIoU per starting budget, and its lead over the forest
FEW_CLICK_GOALS = ((10, 0.90), (100, 0.97), ("1/object", 0.90))
FOREST_MARGIN = 0.05


def few_clicks_verdict(rows, keys):
    """The few-clicks goals measured (experiments 8 and 9): per budget the best row's mIoU as a share of the
    dense ceiling against its goal (runs that add clicks in rounds end with more clicks: not counted there);
    every method against partial CE at 10 points, paired by seed (same seed = same clicks and init), and
    whether it wins by more than two standard deviations (the mean paired difference > 2 x their std, at least
    2 seeds); model-chosen against random clicks at equal budget. Rows not run are left out."""
    key = keys.config_key
    dense = summarize(rows, key(replace(BASELINE, points=None)))["miou"]
    few = [(label, run) for e in EXPERIMENTS if e.number in (8, 9) for label, run in e.rows
           if run.points is not None and not isinstance(run, Reference)]  # the CNN rows
    lines = []
    if dense[2]:
        for budget, goal in FEW_CLICK_GOALS:
            done = [(summarize(rows, key(run))["miou"], label) for label, run in few
                    if run.points == budget and not run.rounds]  # click rounds end with more clicks
            done = [(m, label) for m, label in done if m[2]]
            if done:
                m, label = max(done, key=lambda d: d[0][0])
                ratio = m[0] / dense[0]
                lines.append(f"- {budget}: best is '{label}', {fmt(m)} % ({n_seeds(m[2])}) = "
                             f"**{ratio:.2f}** of dense ({fmt(dense)} %); goal >= {goal:.2f}: "
                             f"{'met' if ratio >= goal else 'NOT met'}.")
    base = replace(BASELINE, points=10)
    ce = summarize(rows, key(base))["miou"]
    for label, run in few:
        if run.points != 10 or run == base:
            continue
        m = summarize(rows, key(run))["miou"]
        if not (m[2] and ce[2]):
            continue
        d = paired_difference(rows, key(run), key(base))
        wins = d[2] >= 2 and d[0] > 2 * d[1]
        lines.append(f"- '{label}' vs partial CE at 10 points: {100 * d[0]:+.1f}"
                     f"{'' if d[2] < 2 else f' ± {100 * d[1]:.1f}'} mIoU points (paired, {n_seeds(d[2])}): "
                     f"{'wins by more than 2 std' if wins else 'does NOT win by more than 2 std'}.")
    for budget, _ in FEW_CLICK_GOALS:  # the goal: the best CNN row >= the forest + FOREST_MARGIN
        forest = Reference(replace(BASELINE, points=budget), "forest-multiscale")
        f = summarize(rows, key(forest))["miou"]
        done = [(summarize(rows, key(run))["miou"], label, run) for label, run in few
                if run.points == budget and not run.rounds]
        done = [d for d in done if d[0][2]]
        if f[2] and done:
            m, label, run = max(done, key=lambda d: d[0][0])
            d = paired_difference(rows, key(run), key(forest))
            lines.append(f"- {budget}: best CNN '{label}' minus the random forest on multiscale features (same "
                         f"clicks): {100 * d[0]:+.1f}{'' if d[2] < 2 else f' ± {100 * d[1]:.1f}'} mIoU points "
                         f"(paired, {n_seeds(d[2])}; forest {fmt(f)} %); goal >= +{100 * FOREST_MARGIN:.0f}: "
                         + ("met." if d[0] >= FOREST_MARGIN else
                            f"NOT met, short by {100 * (FOREST_MARGIN - d[0]):.1f}."))
    for start in (10, "1/object"):
        chosen, rand = (replace(BASELINE, points=start, rounds=ROUNDS, clicks_per_round=CLICKS_PER_ROUND,
                                click_strategy=c) for c in ("uncertain", "random"))
        d = paired_difference(rows, key(chosen), key(rand))
        if d[2]:
            lines.append(f"- {start} then {ROUNDS} x {CLICKS_PER_ROUND} clicks: model-chosen minus random "
                         f"{100 * d[0]:+.1f}{'' if d[2] < 2 else f' ± {100 * d[1]:.1f}'} mIoU points (paired, "
                         f"{n_seeds(d[2])}).")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report

def experiment_table(rows, exp, keys):
    lines = ["| run | points / image | labelled pixels % | OA % | mIoU % | mean F1 % | seeds | s / run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, run in exp.rows:
        s = summarize(rows, keys.config_key(run))
        pts = "dense" if run.points is None else (run.points if isinstance(run.points, str) else f"{run.points:,}")
        lines.append(f"| {label} | {pts} | {fmt(s['labelled_fraction'], digits=2)} | {fmt(s['oa'])} | "
                     f"{fmt(s['miou'])} | {fmt(s['mf1'])} | {s['miou'][2]} | {fmt(s['seconds'], False, 0)} |")
    return "\n".join(lines)


def per_class_table(rows, exp, keys):
    names = class_names(keys.settings)
    lines = ["| run | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, run in exp.rows:
        s = summarize(rows, keys.config_key(run), [f"iou_{c}" for c in names])
        lines.append(f"| {label} | " + " | ".join(fmt(s[f"iou_{c}"]) for c in names) + " |")
    return "\n".join(lines)


def closing_note(rows, keys):
    c = closing_numbers(rows, keys)
    lines = []
    if c["baseline"][2] and c["dense"][2]:
        lines.append(f"- 20,000 fixed points reach **{100 * c['ratio']:.1f} %** of the dense ceiling's mIoU "
                     f"({fmt(c['baseline'])} vs {fmt(c['dense'])} %).")
    else:
        lines.append("- 20,000 points vs the dense ceiling: not run yet.")
    w, wo = c["weights_effect"], c["weights_effect_oa"]
    if w[2]:
        lines.append(f"- Class weights from the points, inverse frequency (the published scheme), change mIoU by "
                     f"**{100 * w[0]:+.1f}{'' if w[2] < 2 else f' ± {100 * w[1]:.1f}'} points** and OA by "
                     f"{100 * wo[0]:+.1f}{'' if wo[2] < 2 else f' ± {100 * wo[1]:.1f}'} points (weights minus no "
                     f"weights, paired by seed, mean ± std over {n_seeds(w[2])}).")
    else:
        lines.append("- Effect of class weights: not run yet.")
    q = c["sqrt_effect"]
    if q[2]:
        beats = c["dense"][2] and c["sqrt"][0] > c["dense"][0]
        lines.append(f"- Square-root inverse frequency (train.py's default, experiment 7) changes mIoU by "
                     f"**{100 * q[0]:+.1f}{'' if q[2] < 2 else f' ± {100 * q[1]:.1f}'} points** against no weights "
                     f"({fmt(c['sqrt'])} %{', above the dense ceiling' if beats else ''}; paired by seed, "
                     f"{n_seeds(q[2])}).")
    if c["smallest_within_5"]:
        n, m = c["smallest_within_5"]
        lines.append(f"- The smallest budget within 5 % of the ceiling (mean mIoU >= 0.95 x dense) is "
                     f"**{n:,} points per image** ({fmt(m)} %).")
    elif c["dense"][2]:
        lines.append("- No budget of the sweep that has run comes within 5 % of the ceiling.")
    return "\n".join(lines)


def report_command(preset, settings, folder):
    """The experiments.py command that rewrites this report: the preset, the options that changed its settings,
    and --results where the folder is not the one those settings choose by themselves."""
    own = dict(PRESETS[preset])
    words = ["python -m research.experiments", f"--preset {preset}"]
    for name in SETTING_OPTIONS:
        value, base = settings.get(name), own.get(name)
        if name == "data" and value and base:
            value, base = os.path.normpath(value), os.path.normpath(base)
        if value != base:
            words.append(f"--{name.replace('_', '-')} {value}")
    if own["pretrained"] and not settings.get("pretrained"):
        words.append("--no-pretrained")
    if list(settings.get("exclude", [])) != list(own["exclude"]):
        words.append(f"--exclude {','.join(settings['exclude'])}")
    folder = Path(folder)
    if folder != own_folder(preset) and not folder.name.startswith("adhoc-"):
        words.append(f"--results {folder}")
    return " ".join(words + ["--report"])


def write_report(rows, keys, preset, path, figures_dir):
    """results/experiments.md: the settings, one table per experiment, the closing note; plus the figures."""
    path, settings = Path(path), keys.settings
    ckeys = {keys.config_key(run) for e in EXPERIMENTS for _, run in e.rows}
    ours = first_per_key([r for r in rows if r["config_key"] in ckeys])
    synthetic = is_synthetic(preset, settings)
    devices = sorted({r["device"] for r in ours})
    total = sum(r["seconds"] for r in ours)
    head = [f"# Experiments: preset `{preset}`", ""]
    if synthetic:
        head += ["**SYNTHETIC demo data** (procedural Potsdam-like scenes from `tools/demo_data.py`). These numbers say "
                 "nothing about ISPRS Potsdam; they show that the pipeline runs and how the comparisons come out "
                 "on this toy problem.", ""]
    else:
        head += [f"**REAL data** (`{settings.get('images') or settings['data']}`). Never mix these numbers with the "
                 "synthetic demo's.", ""]
    head += [f"Written by `{report_command(preset, settings, path.parent)}` from `{Path(path).parent}/"
             f"experiments.csv` ({len(ours)} runs of these settings on this data, {total / 3600:.2f} h of training on "
             f"{', '.join(devices) or 'no device yet'}).", "",
             "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()) + ".", "",
             "Every cell is mean ± sample std over seeds (seed = model init, shuffling and annotation draw). "
             "Metrics are the validation metrics of the **last** epoch on the dense val labels (all pixels of "
             "the val patches at processing resolution, undefined pixels left out"
             + (f", classes {settings['exclude']} left out of the means" if settings["exclude"] else
                f", all {len(class_names(settings))} classes in the means") + "). Points per image count at the native "
             "resolution; 'labelled pixels' is the share of training pixels that carry a label at processing "
             "resolution (several points can fall into one processing pixel). Baseline: 20,000 uniform points, "
             "class weights from points, focal gamma 2, skip decoder, points fixed; each experiment changes one "
             "thing from it.", ""]
    body = []
    for exp in EXPERIMENTS:
        body += [f"## {exp.number}. {exp.title}", "", experiment_table(rows, exp, keys), ""]
        body += [exp.note, ""] if exp.note else []
        if exp.number in (1, 7, 10):
            body += ["Per-class IoU %:", "", per_class_table(rows, exp, keys), ""]
    figs = write_figures(rows, keys, preset, figures_dir)
    if figs:
        rel = lambda p: os.path.relpath(p, path.parent)
        body += ["## Figures", ""] + [f"![{p.stem}]({rel(p)})" for p in figs] + [""]
    body += ["## Closing note", "", closing_note(rows, keys), ""]
    verdict = few_clicks_verdict(rows, keys)
    body += ["## Few clicks against the goals (experiments 8 and 9)", "", verdict, ""] if verdict else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head + body))
    return path


# --------------------------------------------------------------------------- figures

def low_budget_method(run):
    """The series a low-budget run belongs to in low_budget.png (what it adds to the partial CE, or the
    reference method)."""
    if isinstance(run, Reference):
        return REFERENCES[run.method]
    if run.rounds:
        how = "model-chosen" if run.click_strategy == "uncertain" else "random"
        return f"+ {run.rounds} x {run.clicks_per_round} {how} clicks"
    if run.forest_teacher:
        return "+ forest teacher"
    if run.self_training:
        return "+ self-training, per-class share" if run.pseudo_share else "+ self-training"
    if run.region_growing:
        return "+ region growing"
    return {(0, 0): "partial CE", (1, 0): "+ affinity", (0, 1): "+ consistency", (1, 1): "+ both"}[
        (int(bool(run.affinity_weight)), int(bool(run.consistency_weight)))]


def _finish_miou_figure(fig, ax, title, path, legend, title_size=None):
    """The common end of the mIoU-vs-budget figures: labels, grid, legend, saved to `path` (returned), closed."""
    import matplotlib.pyplot as plt
    ax.set_ylabel("val mIoU % (last epoch)")
    ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3, which="both")
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_figures(rows, keys, preset, folder):
    """point_budget.png (mIoU vs points per image, log x, dense ceiling as a line), class_weights_iou.png
    (per-class IoU of the published pair) and low_budget.png (experiments 8 and 9: mIoU vs the labelled share of
    the training pixels, log x, dense ceiling as a line). Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tag = " (SYNTHETIC demo data)" if is_synthetic(preset, keys.settings) else f" (REAL data, preset {preset})"
    key = keys.config_key
    written = []

    stats = {n: summarize(rows, key(replace(BASELINE, points=n))) for n in BUDGETS}
    xs = [n for n in BUDGETS if stats[n]["miou"][2]]
    if xs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ys = [100 * stats[n]["miou"][0] for n in xs]
        es = [100 * np.nan_to_num(stats[n]["miou"][1]) for n in xs]
        ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=4, label="uniform points")
        for n, y in zip(xs, ys):
            ax.annotate(f"{100 * stats[n]['labelled_fraction'][0]:.2g} %", (n, y), textcoords="offset points",
                        xytext=(6, -13), ha="left", fontsize=8, color="grey")
        bal = {n: summarize(rows, key(replace(BASELINE, points=n, strategy="balanced")))["miou"] for n in LOW_BUDGETS}
        bx = [n for n in LOW_BUDGETS if bal[n][2]]
        if bx:
            ax.errorbar(bx, [100 * bal[n][0] for n in bx], yerr=[100 * np.nan_to_num(bal[n][1]) for n in bx],
                        fmt="s", capsize=4, label="class-balanced points")
        dense = summarize(rows, key(replace(BASELINE, points=None)))["miou"]
        if dense[2]:
            m, s = 100 * dense[0], 100 * np.nan_to_num(dense[1])
            ax.axhline(m, color="k", lw=1.5, label=f"dense labels (ceiling) {m:.1f} %")
            ax.axhspan(m - s, m + s, color="k", alpha=0.1)
            ax.axhline(0.95 * m, color="k", lw=1, ls="--", label="95 % of the ceiling")
        ax.set_xscale("log")
        ax.margins(y=0.1)
        ax.set_xlabel("points per image (native 300x300; grey: labelled share of pixels at processing size)")
        written.append(_finish_miou_figure(fig, ax, "mIoU vs point budget" + tag, folder / "point_budget.png",
                                           dict(fontsize=8, loc="lower right")))

    pair = EXPERIMENTS[0].rows[:2]  # the baseline (skip decoder) pair
    pstats = [(label, summarize(rows, key(run))) for label, run in pair]
    if all(s["miou"][2] for _, s in pstats):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / len(pstats)
        names = class_names(keys.settings)
        x = np.arange(len(names))
        for i, (label, s) in enumerate(pstats):
            ax.bar(x + (i - (len(pstats) - 1) / 2) * width, [100 * s.get(f"iou_{c}", (np.nan,))[0] for c in names],
                   width, yerr=[100 * np.nan_to_num(s.get(f"iou_{c}", (0, 0))[1]) for c in names], capsize=3,
                   label=f"{label} (mIoU {fmt(s['miou'])} %)")
        ax.set_xticks(x, [c.replace("_", " ") for c in names], fontsize=8)
        ax.set_ylabel("val IoU % (last epoch)")
        ax.set_title("Per-class IoU, 20,000 points, class weights vs none" + tag, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
        fig.tight_layout()
        written.append(folder / "class_weights_iou.png")
        fig.savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)

    low = [run for e in EXPERIMENTS if e.number in (8, 9) for _, run in e.rows if run.points is not None]
    series = {}
    for run in dict.fromkeys(low):
        s = summarize(rows, key(run))
        if s["miou"][2]:
            series.setdefault(low_budget_method(run), []).append((100 * s["labelled_fraction"][0], s["miou"], run))
    if series:
        fig, ax = plt.subplots(figsize=(8, 5))
        for method, pts in series.items():
            pts.sort(key=lambda p: p[0])
            ax.errorbar([p[0] for p in pts], [100 * p[1][0] for p in pts],
                        yerr=[100 * np.nan_to_num(p[1][1]) for p in pts],
                        fmt="s--" if "clicks" in method else "^:" if "forest" in method else "o-", capsize=3,
                        label=method)
            for x, m, run in pts:
                ax.annotate(str(run.points), (x, 100 * m[0]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color="grey")
        dense = summarize(rows, key(replace(BASELINE, points=None)))["miou"]
        if dense[2]:
            m, s = 100 * dense[0], 100 * np.nan_to_num(dense[1])
            ax.axhline(m, color="k", lw=1.5, label=f"dense labels (ceiling) {m:.1f} %")
            ax.axhspan(m - s, m + s, color="k", alpha=0.1)
        majority = summarize(rows, key(Reference(replace(BASELINE, points=None), "majority")))["miou"]
        if majority[2]:
            ax.axhline(100 * majority[0], color="grey", lw=1.5, ls=":",
                       label=f"all-background (no model) {100 * majority[0]:.1f} %")
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter, LogLocator
        percent = FuncFormatter(lambda v, _: f"{v:g} %")
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))  # labels that do not overlap
        ax.xaxis.set_major_formatter(percent)
        ax.xaxis.set_minor_formatter(percent)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.margins(y=0.1)
        ax.set_xlabel("% of the training pixels labelled by clicks at processing size (at the end of the run; "
                      "grey: the starting budget)", fontsize=8)
        written.append(_finish_miou_figure(fig, ax, "Few clicks: mIoU vs labelled share" + tag,
                                           folder / "low_budget.png", dict(fontsize=7, loc="best"), title_size=10))
    curve = learning_curve(keys, folder, tag)
    return written + ([curve] if curve else [])


def learning_curve(keys, folder, tag):
    """learning_curve.png: the dense ceiling's validation curves against optimizer steps, one line per seed (its
    runs' history.json under <folder>/runs), with where train.plateau says each stopped improving and the seconds
    the run took. Only for runs that log their steps (train.py writes "step" into the history); None otherwise."""
    import matplotlib.pyplot as plt

    from train import plateau
    key = keys.config_key(replace(BASELINE, points=None))
    histories = []
    for path in sorted((folder / "runs").glob(f"{key}-s*/history.json")):
        h = json.loads(path.read_text())
        if h and "step" in h[0]:
            histories.append((path.parent.name.rsplit("-s", 1)[1], h))
    if not histories:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for seed, h in histories:
        steps = [x["step"] for x in h]
        flat = plateau(h)
        seconds = sum(x["seconds"] for x in h)
        line, = axes[0].plot(steps, [100 * x["val_miou"] for x in h], lw=1,
                             label=f"seed {seed}: {seconds:.0f} s" + (f", flat after step {h[flat - 1]['step']}"
                                                                       if flat else ""))
        for name in h[0]["val_iou"]:
            axes[1].plot(steps, [100 * x["val_iou"][name] for x in h], lw=1, color=line.get_color(),
                         ls="-" if name == list(h[0]["val_iou"])[-1] else ":")
    axes[0].set_ylabel("val mIoU % (dense labels)")
    axes[1].set_ylabel("val IoU % per class (solid: the last class)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Dense labels: learning curve" + tag, fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "learning_curve.png", dpi=110)
    plt.close(fig)
    return folder / "learning_curve.png"

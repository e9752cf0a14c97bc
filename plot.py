"""Figures comparing runs of experiment.py.

    python plot.py                      # every run_* folder here
    python plot.py run_0 run_1 --out_dir=figures

Reads each run's final_info.json and, from the run folder or from each of its seed_<k>/ folders,
sweep.json, detection_horizon.json, spliced_kl.json and log.jsonl, and writes PNGs:
headline.png (README's figure: the forget-CE increase standard, dsg and pattern reach within a
retain-KL budget, one panel per run, seed bands), frontier.png (retain damage against forgetting, one
curve per strategy, seed bands), frontier_summary.png (retain KL at matched forgetting, per run and
strategy), horizon.png (detection against the pooling horizon), tradeoff.png (QA accuracies at every
sweep point), strategies.png (four headline measures per strategy), precision.png, consistency.png,
training.png, generation.png (greedy continuations under each causal strategy's guard: retain left
identical against forget changed, and the clean model's CE of the guarded forget text), saes.png (SAE
recipes side by side, drawn when a run is BatchTopK or contrastive). A named folder that is missing, or a results file that is not valid JSON, stops with a
one-line error; a run without final_info.json (failed or unfinished) is skipped with a warning, and a
figure whose data a run lacks is drawn without it.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# the runs' own front and interpolation, so a figure shows what final_info.json reports
from experiment import FRONTIER_BUDGETS, FRONTIER_CE, STRATEGIES, frontier_within, pareto_front  # noqa: E402

COLORS = {"standard": "tab:blue", "gate": "tab:gray", "dsg": "tab:purple", "dsg_causal": "tab:pink",
          "pattern": "tab:orange", "hybrid": "tab:green"}
DETECTOR_COLORS = {"learned": "tab:orange", "residual": "tab:brown", "dsg_causal": "tab:pink", "templates": "tab:olive"}
MARKERS = ["o", "s", "^", "D", "v", "P"]


class PlotError(Exception):
    pass


def warn(msg: str):
    print(f"plot.py: warning: {msg}", file=sys.stderr)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlotError(f"{path} is malformed: {e.msg} at line {e.lineno}")


def read_seed(folder: Path) -> dict:
    """The per-seed files of one run folder (or one seed_<k> folder of a seeded run)."""
    seed = {}
    for name, key in (("sweep.json", "sweep"), ("spliced_kl.json", "spliced"), ("detection_horizon.json", "horizon")):
        if (folder / name).exists():
            seed[key] = read_json(folder / name)
    if (folder / "log.jsonl").exists():
        try:
            seed["log"] = [json.loads(l) for l in (folder / "log.jsonl").read_text().splitlines() if l.strip()]
        except json.JSONDecodeError:
            raise PlotError(f"{folder / 'log.jsonl'} is malformed")
    return seed


def load_run(folder: Path) -> dict | None:
    if not folder.is_dir():
        raise PlotError(f"run folder {folder} does not exist")
    info_path = folder / "final_info.json"
    if not info_path.exists():
        status = "unfinished"
        if (folder / "metadata.json").exists():
            status = read_json(folder / "metadata.json").get("status", status)
        warn(f"skipping {folder}: no final_info.json (run {status})")
        return None
    info = read_json(info_path)
    if not isinstance(info, dict) or not all(isinstance(v, dict) and "means" in v for v in info.values()):
        raise PlotError(f"{info_path} is malformed: expected {{entry: {{'means': ..., 'stderrs': ...}}}}")
    seed_dirs = sorted(folder.glob("seed_*"), key=lambda p: p.name)
    seeds = [read_seed(d) for d in seed_dirs if (d / "final_info.json").exists()] or [read_seed(folder)]
    cfg = folder / "config.json"
    config = read_json(cfg) if cfg.exists() else {}
    # a sensitivity folder inside a run (run_1/eval_24) is named with its run: the last part alone repeats
    name = f"{folder.parent.name}/{folder.name}" if (folder.parent / "final_info.json").exists() else folder.name
    return {"name": name, "info": info, "seeds": seeds, "window": config.get("window"),
            "l1": config.get("l1_coeff"), "activation": config.get("activation", "relu"),
            "k": config.get("k"), "contrastive": config.get("contrastive", 0.0)}


def have(run: dict, key: str) -> list:
    return [s[key] for s in run["seeds"] if key in s]


def label(run: dict) -> str:
    if not run.get("window"):
        return run["name"]
    if run.get("activation") == "batchtopk":
        recipe = f", batchtopk k={run['k']}"
    else:
        recipe = f", l1={run['l1']:g}" if run.get("l1") is not None else ""
    recipe += f", contrastive {run['contrastive']:g}" if run.get("contrastive") else ""
    return f"{run['name']} (w={run['window']}{recipe})"


def front_of(points: list[dict], y: str) -> list[dict]:
    """The sweep points on a strategy's Pareto front of (forget CE increase, y), by increasing x,
    with the clean model first (experiment.pareto_front: the front the frontier metrics use)."""
    tagged = [(p["forget_ce_increase"], p[y], float(i + 1)) for i, p in enumerate(points)]
    clean = {"forget_ce_increase": 0.0, y: 0.0, "forget_prob_drop": 0.0, "retain_prob_drop": 0.0}
    front = [points[int(t) - 1] if t else clean for _, _, t in pareto_front(tagged)]
    # a point with y = 0 dominates the clean model itself; the curve still starts there
    return front if front[0] is clean else [clean] + front


def seed_band(fronts: list[list[dict]], key: str, xs: np.ndarray):
    """Mean and stderr over seeds of `key` interpolated along each seed's front at xs; NaN beyond the
    x that every seed reached (no extrapolation)."""
    ys = np.full((len(fronts), len(xs)), np.nan)
    for i, f in enumerate(fronts):
        fx, fy = [p["forget_ce_increase"] for p in f], [p[key] for p in f]
        ok = xs <= fx[-1]
        ys[i, ok] = np.interp(xs[ok], fx, fy)
    mean = ys.mean(0)
    err = ys.std(0, ddof=1) / np.sqrt(len(fronts)) if len(fronts) > 1 else np.zeros(len(xs))
    return mean, err


KL_FLOOR = 1e-4  # a log axis has no 0: a strategy that never touches the retain rows is drawn here


def fig_frontier(runs, out: Path) -> bool:
    rows = [r for r in runs if have(r, "sweep")]
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 4.6 * len(rows)), squeeze=False)
    for (ax_kl, ax_qa), run in zip(axes, rows):
        sweeps = have(run, "sweep")
        for s in STRATEGIES:
            fronts = [front_of([p for p in sw["points"] if p["strategy"] == s], "retain_kl") for sw in sweeps]
            fronts = [f for f in fronts if len(f) > 1]
            if not fronts:
                continue
            xs = np.linspace(0, max(f[-1]["forget_ce_increase"] for f in fronts), 80)
            m, e = seed_band(fronts, "retain_kl", xs)
            ax_kl.plot(xs, np.maximum(m, KL_FLOOR), color=COLORS[s], label=s)
            ax_kl.fill_between(xs, np.maximum(m - e, KL_FLOOR), np.maximum(m + e, KL_FLOOR), color=COLORS[s],
                               alpha=0.2, lw=0)
            for key, ls in (("forget_prob_drop", "-"), ("retain_prob_drop", "--")):
                m, e = seed_band(fronts, key, xs)
                ax_qa.plot(xs, m, color=COLORS[s], ls=ls, label=f"{s}: {key.split('_')[0]}")
                ax_qa.fill_between(xs, m - e, m + e, color=COLORS[s], alpha=0.15, lw=0)
        for x in FRONTIER_CE:
            ax_kl.axvline(x, color="k", lw=0.6, ls=":")
        ax_kl.set_yscale("log")
        ax_kl.set_ylim(bottom=KL_FLOOR / 2)
        ax_kl.set_xlabel("forget-text CE increase (nats/token)")
        ax_kl.set_ylabel(f"retain KL(clean||intervened), nats/token (log; 0 drawn at {KL_FLOOR:g})")
        ax_kl.set_title(f"{label(run)}: retain damage against forgetting ({len(sweeps)} seed(s); band: stderr)",
                        fontsize=9)
        ax_qa.set_xlabel("forget-text CE increase (nats/token)")
        ax_qa.set_ylabel("drop in P(correct answer), over the 4 choices")
        ax_qa.set_title("QA along each front: forget questions (solid), retain questions (dashed)", fontsize=9)
        for ax in (ax_kl, ax_qa):
            ax.grid(alpha=0.3)
        ax_kl.legend(fontsize=7)
        ax_qa.legend(fontsize=6, ncol=2)
    fig.suptitle("Frontiers: lower and further right is more precise (dotted: matched forget-CE levels)")
    save(fig, out / "frontier.png")
    return True


def fig_frontier_summary(runs, out: Path) -> bool:
    """Retain KL each strategy needs for a matched forget-CE increase, per run (the 2x2 of SAE window
    by strategy is read off it with run_1 and run_2)."""
    have_runs = [r for r in runs if any(k.startswith("frontier_") for k in r["info"])]
    if not have_runs:
        return False
    fig, axes = plt.subplots(1, len(FRONTIER_CE), figsize=(5 * len(FRONTIER_CE), 4.2), squeeze=False)
    width = 0.8 / len(have_runs)
    for ax, x in zip(axes[0], FRONTIER_CE):
        drew = False
        for i, run in enumerate(have_runs):
            xs, ys, es = [], [], []
            for j, s in enumerate(STRATEGIES):
                e = run["info"].get(f"frontier_{s}", {"means": {}, "stderrs": {}})
                v = e["means"].get(f"retain_kl_at_ce_{x}")
                if v is not None:  # a log axis has no 0: zero is drawn at the floor, bars start below it
                    err = e["stderrs"].get(f"retain_kl_at_ce_{x}") or 0.0
                    xs.append(j + i * width), ys.append(max(v, KL_FLOOR)), es.append(min(err, max(v, KL_FLOOR) - KL_FLOOR / 2))
            ax.bar(xs, [y - KL_FLOOR / 2 for y in ys], width, bottom=KL_FLOOR / 2, yerr=[es, es], capsize=3,
                   label=label(run))
            drew |= bool(ys)
        group_axis(ax, STRATEGIES, len(have_runs), width, f"retain KL at forget CE +{x} nats\n(lower better; "
                                                             f"0 drawn at {KL_FLOOR:g}; missing: never reached)")
        if drew:
            ax.set_yscale("log")
            ax.set_ylim(bottom=KL_FLOOR / 2)
        else:
            ax.text(0.5, 0.5, "no strategy reached this level", ha="center", transform=ax.transAxes)
    finish(fig, axes[0][0], "Retain damage at matched forgetting (error bars: stderr over seeds)",
           out / "frontier_summary.png")
    return True


def fig_horizon(runs, out: Path) -> bool:
    rows = [r for r in runs if have(r, "horizon")]
    if not rows:
        return False
    panels = [("token_auroc", "token AUROC (held-out rows)"), ("spliced_auroc", "spliced-passage AUROC"),
              ("delay_median", "median delay to the first fire (tokens)"), ("fire_rate_retain", "retain fire rate")]
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.2 * len(panels), 3.6 * len(rows)), squeeze=False)
    for row, run in zip(axes, rows):
        hs = have(run, "horizon")
        H = hs[0]["horizons"]
        for ax, (key, title) in zip(row, panels):
            for name, color in DETECTOR_COLORS.items():
                vals = np.array([[np.nan if v is None else v for v in h["detectors"][name][key]] for h in hs
                                 if name in h["detectors"]], dtype=float)
                if not len(vals):
                    continue
                with warnings.catch_warnings():  # a delay that is None on every seed stays NaN: no point drawn
                    warnings.simplefilter("ignore", RuntimeWarning)
                    m = np.nanmean(vals, 0)
                    e = np.nanstd(vals, 0, ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else np.zeros(len(H))
                ax.errorbar(H, m, yerr=e, color=color, marker="o", ms=3, capsize=2, label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("pooling horizon H (tokens)")
            ax.set_title(f"{run['name']}: {title}", fontsize=9)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.suptitle(f"Detection against the evidence horizon (threshold: {hs[0]['fpr']:.0%} of calibration retain "
                 "tokens fire; error bars: stderr over seeds)")
    save(fig, out / "horizon.png")
    return True


def fig_tradeoff(runs, out: Path) -> bool:
    rows = [r for r in runs if have(r, "sweep")]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for i, run in enumerate(rows):
        pts = have(run, "sweep")[0]["points"]
        for s in STRATEGIES:
            mine = [p for p in pts if p["strategy"] == s]
            if mine:
                ax.scatter([p["retain_acc"] for p in mine], [p["forget_acc"] for p in mine], color=COLORS[s],
                           marker=MARKERS[i % len(MARKERS)], alpha=0.75, label=f"{label(run)}: {s}")
    gate = have(rows[0], "sweep")[0].get("retain_gate", 0.99)
    ax.axvline(gate, color="red", ls="--", lw=1, label=f"retain gate {gate}")
    ax.set_xlabel("retain QA accuracy (fraction of known questions kept)")
    ax.set_ylabel("forget QA accuracy (lower = more unlearned)")
    ax.set_title("QA accuracy at every sweep point (first seed)\n(SAEBench's view: right of the gate, low)")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    save(fig, out / "tradeoff.png")
    return True


HEADLINE_STRATEGIES = ("standard", "dsg", "pattern")  # SAEBench's clamp, the published gate, the learned one
HEADLINE_BUDGETS = np.logspace(-3, 0, 61)  # retain KL, nats/token


def reach_within(points: list[dict], budgets) -> np.ndarray:
    """Forget-CE increase reached within each retain-KL budget along the Pareto front of one strategy's
    sweep points (experiment.frontier_within: final_info's forget_ce_within_retain_kl_<b> at b)."""
    front = pareto_front([(p["forget_ce_increase"], p["retain_kl"], 0.0) for p in points])
    return np.array([frontier_within(front, b) for b in budgets])


def fig_headline(runs, out: Path) -> bool:
    """The matched-budget view of the frontier: how much forgetting each strategy buys for a given
    retain damage. Read along the retain-KL axis every seed has a value, also where a strategy's front
    is a single point at zero retain KL (dsg on most seeds), so the mean over seeds is defined."""
    rows = [r for r in runs if have(r, "sweep")]
    if not rows:
        return False
    ncol = min(2, len(rows))
    nrow = -(-len(rows) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 3.9 * nrow), squeeze=False)
    for ax, run in zip(axes.flat, rows):
        sweeps = have(run, "sweep")
        for s in HEADLINE_STRATEGIES:
            reach = np.array([reach_within(pts, HEADLINE_BUDGETS) for pts in
                              ([p for p in sw["points"] if p["strategy"] == s] for sw in sweeps) if pts])
            if not len(reach):
                continue
            m = reach.mean(0)
            e = reach.std(0, ddof=1) / np.sqrt(len(reach)) if len(reach) > 1 else np.zeros_like(m)
            ax.plot(HEADLINE_BUDGETS, m, color=COLORS[s], label=s)
            ax.fill_between(HEADLINE_BUDGETS, m - e, m + e, color=COLORS[s], alpha=0.2, lw=0)
        for b in FRONTIER_BUDGETS:
            ax.axvline(b, color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("retain-KL budget (nats/token, log)")
        ax.set_ylabel("forget-CE increase reached (nats/token)")
        ax.set_title(f"{label(run)}, {len(sweeps)} seed(s)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    for ax in axes.flat[len(rows):]:
        ax.set_visible(False)
    fig.suptitle("Forgetting within a retain-damage budget (higher is better; band: stderr over seeds;\n"
                 f"dotted: the budgets final_info.json reports, {', '.join(f'{b:g}' for b in FRONTIER_BUDGETS)})",
                 fontsize=10)
    save(fig, out / "headline.png")
    return True


STRATEGY_PANELS = [("frontier", "retain_kl_at_ce_0.5", "retain KL at forget CE +0.5\n(nats/token, lower better)"),
                   ("frontier", "retain_kl_ratio_at_ce_0.5", "... relative to standard\n(lower better)"),
                   ("unlearning", "unlearning_score", "SAEBench unlearning score\n(higher better)"),
                   ("detection", "token_auroc", "detection token AUROC\n(where it clamps; higher better)")]


def fig_strategies(runs, out: Path) -> bool:
    fig, axes = plt.subplots(1, len(STRATEGY_PANELS), figsize=(4.2 * len(STRATEGY_PANELS), 4.2))
    drew = False
    width = 0.8 / max(1, len(runs))
    for ax, (prefix, metric, title) in zip(axes, STRATEGY_PANELS):
        for i, run in enumerate(runs):
            xs, ys, es = [], [], []
            for j, s in enumerate(STRATEGIES):
                e = run["info"].get(f"{prefix}_{s}")
                if e and e["means"].get(metric) is not None:
                    xs.append(j + i * width)
                    ys.append(e["means"][metric])
                    es.append(e.get("stderrs", {}).get(metric) or 0.0)
            if xs:
                drew = True
                ax.bar(xs, ys, width, yerr=es, capsize=3, label=label(run))
            else:
                warn(f"{run['name']} has no {prefix}_*/{metric}: left out of strategies.png")
        group_axis(ax, STRATEGIES, len(runs), width, title)
    finish(fig, axes[0], "Per strategy (error bars: stderr)", out / "strategies.png")
    return drew


def fig_precision(runs, out: Path, n_docs: int = 3) -> bool:
    rows = [r for r in runs if have(r, "spliced")]
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), n_docs, figsize=(5 * n_docs, 3.2 * len(rows)), squeeze=False)
    for row, run in zip(axes, rows):
        for ax, doc in zip(row, have(run, "spliced")[0]["docs"][:n_docs]):
            lab = doc["label"]
            inside = [t for t, v in enumerate(lab) if v]
            if inside:
                ax.axvspan(inside[0] - 0.5, inside[-1] + 0.5, color="gold", alpha=0.3, label="forget passage")
            for s in STRATEGIES:
                if s in doc["kl"]:
                    ax.plot(doc["kl"][s], color=COLORS[s], lw=1, label=s)
            ax.set_title(f"{label(run)}: {doc['id']}", fontsize=9)
            ax.set_xlabel("token position")
            ax.set_ylabel("KL(clean||intervened), nats")
            ax.set_yscale("symlog", linthresh=0.01)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Precision: per-token damage along spliced documents (shaded: inserted biology passage)")
    save(fig, out / "precision.png")
    return True


def fig_consistency(runs, out: Path) -> bool:
    rows = [r for r in runs if "temporal_consistency" in r["info"]]
    if not rows:
        return False
    metrics = [("smoothness", "smoothness: mean|f_t - f_t-1| / mean f\n(lower = smoother)"),
               ("lag1_autocorr", "lag-1 autocorrelation\n(higher = more persistent)"),
               ("jaccard", "Jaccard of active sets at t, t-1\n(higher = more stable)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    width = 0.8 / len(rows)
    for ax, (m, title) in zip(axes, metrics):
        for i, run in enumerate(rows):
            e = run["info"]["temporal_consistency"]
            keys = [f"all_{m}", f"selected_{m}"]
            ax.bar([k + i * width for k in range(2)], [e["means"].get(k, 0.0) for k in keys], width,
                   yerr=[e["stderrs"].get(k, 0.0) for k in keys], capsize=3, label=label(run))
        group_axis(ax, ["all latents", "selected latents"], len(rows), width, title)
    finish(fig, axes[0], "Temporal consistency of SAE latents on held-out text", out / "consistency.png")
    return True


def fig_training(runs, out: Path) -> bool:
    rows = [r for r in runs if have(r, "log")]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for run in rows:
        log = have(run, "log")[0]
        tokens = [l["tokens"] / 1000 for l in log]
        for ax, key in zip(axes, ("loss", "l0", "fve")):
            ax.plot(tokens, [l[key] for l in log], label=label(run))
    for ax, title in zip(axes, ("training loss (mse + l1_coeff * l1)", "L0 (active latents per token)",
                                "variance explained (1 - mse / d_in, training batch)")):
        ax.set_xlabel("training tokens (thousands; first seed)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    save(fig, out / "training.png")
    return True


# (entry, key, title) of the SAE-recipe figure (issue 27's comparison), one panel each
SAE_PANELS = [("sae", "fve", "FVE (higher better)"), ("sae", "dead_frac", "dead latents (lower better)"),
              ("detection_learned", "token_auroc", "detection token AUROC"),
              ("frontier_pattern", "precision_auroc_at_ce_0.5", "pattern: precision AUROC at +0.5"),
              ("frontier_pattern", "forget_ce_within_retain_kl_0.01", "pattern: forget CE within retain KL 0.01"),
              ("unlearning_pattern", "unlearning_score", "pattern: SAEBench score"),
              ("sparse_probing", "sae_top_1_test_accuracy", "probing: top-1 latent accuracy"),
              ("temporal_consistency", "all_lag1_autocorr", "lag-1 autocorrelation of latents")]


def fig_saes(runs, out: Path) -> bool:
    """SAE recipes side by side (ReLU / BatchTopK, window, contrastive): one bar per run per measure,
    stderr over seeds. Drawn only when some run is not the default ReLU recipe without contrastive."""
    if not any(r.get("activation") == "batchtopk" or r.get("contrastive") for r in runs):
        return False
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    for ax, (entry, key, title) in zip(axes.flat, SAE_PANELS):
        for i, run in enumerate(runs):
            e = run["info"].get(entry)
            m = e["means"].get(key) if e else None
            ax.bar(i, np.nan if m is None else m, 0.8, yerr=(e.get("stderrs", {}).get(key) or 0) if e else 0,
                   capsize=3, label=label(run), color=f"C{i}")
        ax.set_xticks(range(len(runs)), [r["name"] for r in runs], fontsize=7, rotation=30)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)  # below the panels, off the bars
    fig.suptitle("SAE recipes side by side (error bars: stderr over seeds)")
    save(fig, out / "saes.png", rect=(0, 0.08, 1, 1))
    return True


GUARDED = ("standard", "gate", "dsg_causal", "pattern", "hybrid")  # experiment.CAUSAL_STRATEGIES


def fig_generation(runs, out: Path) -> bool:
    """What each causal strategy's guard does to greedy continuations (the --generate stage): retain
    continuations left identical to clean against forget continuations changed; and the clean model's
    CE of the guarded forget continuations beside its CE of the true held-out text."""
    rows = [r for r in runs if "generation_clean" in r["info"]]
    if not rows:
        return False
    fig, (ax, ax_ce) = plt.subplots(1, 2, figsize=(12, 4.6))
    width = 0.8 / len(rows)
    for i, run in enumerate(rows):
        info, mark = run["info"], MARKERS[i % len(MARKERS)]
        for j, s in enumerate(GUARDED):
            e = info.get(f"generation_{s}")
            if not e or "retain_identical" not in e["means"] or "forget_identical" not in e["means"]:
                continue
            m, se = e["means"], e.get("stderrs", {})
            ax.errorbar(m["retain_identical"], 1 - m["forget_identical"], xerr=se.get("retain_identical") or 0,
                        yerr=se.get("forget_identical") or 0, fmt=mark, color=COLORS[s], capsize=3,
                        label=f"{label(run)}: {s}")
            ax_ce.bar(j + i * width, m.get("forget_ce", np.nan), width, yerr=se.get("forget_ce") or 0, capsize=3,
                      color=COLORS[s], edgecolor="k", hatch=["", "//", "..", "xx"][i % 4])
        clean = info["generation_clean"]["means"]
        if "forget_ce_true" in clean:
            ax_ce.axhline(clean["forget_ce_true"], color="k", ls="--", lw=1, alpha=0.6 + 0.1 * i,
                          label=f"{label(run)}: true held-out text")
            ax_ce.axhline(clean["forget_ce"], color="grey", ls=":", lw=1, label=f"{label(run)}: clean continuation")
    ax.set_xlabel("retain continuations identical to clean (fraction)")
    ax.set_ylabel("forget continuations changed (fraction)")
    ax.set_xlim(-0.05, 1.05), ax.set_ylim(-0.05, 1.05), ax.grid(alpha=0.3)
    ax.set_title("greedy continuations at each strategy's forget-CE +1.0 point\n(top right best; error bars: stderr over seeds)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    group_axis(ax_ce, GUARDED, len(rows), width, "clean model's CE of the guarded forget continuations\n"
               "(nats/token; hatching: run, in legend order)")
    ax_ce.legend(fontsize=7)
    fig.suptitle("Generation under the streaming guard")
    save(fig, out / "generation.png")
    return True


def group_axis(ax, groups, n_runs: int, width: float, title: str):
    """Ticks under the middle of each group of bars (one bar per run), title and grid."""
    ax.set_xticks([j + width * (n_runs - 1) / 2 for j in range(len(groups))], groups, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def finish(fig, legend_ax, title: str, path: Path):
    legend_ax.legend(fontsize=8)
    fig.suptitle(title)
    save(fig, path)


def save(fig, path: Path, rect=(0, 0, 1, 1)):
    """Lay out (within `rect` of the figure: room left for a legend outside the panels), write, close."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURES = (("headline", fig_headline), ("frontier", fig_frontier), ("frontier_summary", fig_frontier_summary),
           ("horizon", fig_horizon), ("tradeoff", fig_tradeoff), ("strategies", fig_strategies),
           ("precision", fig_precision), ("consistency", fig_consistency), ("training", fig_training),
           ("generation", fig_generation), ("saes", fig_saes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Figures comparing experiment.py runs.")
    ap.add_argument("runs", nargs="*", help="run folders (default: every run_* folder here)")
    ap.add_argument("--out_dir", default="plots", help="folder for the PNGs (default: plots)")
    ap.add_argument("--only", default="", help="comma-separated figure names to draw (default: every figure), "
                    f"from {', '.join(n for n, _ in FIGURES)}")
    args = ap.parse_args(argv)
    try:
        only, names = [n for n in args.only.split(",") if n], [n for n, _ in FIGURES]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise PlotError(f"--only: unknown figure {unknown[0]!r} (known: {', '.join(names)})")
        folders = [Path(r) for r in args.runs] or sorted(Path(".").glob("run_*"), key=lambda p: p.name)
        if not folders:
            raise PlotError("no run_* folders here; name the run folders to plot")
        runs = [r for r in (load_run(f) for f in folders) if r is not None]
        if not runs:
            raise PlotError("none of the run folders holds a finished run")
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        made = [name for name, fig in FIGURES if (not only or name in only) and fig(runs, out)]
    except PlotError as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(m + '.png' for m in made)} to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

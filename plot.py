"""Figures comparing runs of experiment.py.

    python plot.py                      # every run_* folder here
    python plot.py run_0 run_1 --out_dir=figures

Reads each run's final_info.json, sweep.json, log.jsonl and spliced_kl.json and writes PNGs:
tradeoff.png, headline.png, precision.png, consistency.png, training.png. A named folder that is
missing, or a results file that is not valid JSON, stops with a one-line error; a run without
final_info.json (failed or unfinished) is skipped with a warning, and a figure whose data a run
lacks (an older version) is drawn without that run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STRATEGIES = ("standard", "pattern", "hybrid", "gate")
COLORS = {"standard": "tab:blue", "pattern": "tab:orange", "hybrid": "tab:green", "gate": "tab:gray"}
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
    run = {"name": folder.name, "info": info}
    for name, key in (("sweep.json", "sweep"), ("spliced_kl.json", "spliced")):
        if (folder / name).exists():
            run[key] = read_json(folder / name)
    if (folder / "log.jsonl").exists():
        try:
            run["log"] = [json.loads(l) for l in (folder / "log.jsonl").read_text().splitlines() if l.strip()]
        except json.JSONDecodeError:
            raise PlotError(f"{folder / 'log.jsonl'} is malformed")
    cfg = folder / "config.json"
    config = read_json(cfg) if cfg.exists() else {}
    run["window"], run["l1"] = config.get("window"), config.get("l1_coeff")
    return run


def label(run: dict) -> str:
    if not run.get("window"):
        return run["name"]
    return f"{run['name']} (w={run['window']}" + (f", l1={run['l1']:g})" if run.get("l1") is not None else ")")


def fig_tradeoff(runs, out: Path) -> bool:
    have = [r for r in runs if "sweep" in r]
    if not have:
        return False
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for i, run in enumerate(have):
        pts = run["sweep"]["points"]
        for s in STRATEGIES:
            mine = [p for p in pts if p["strategy"] == s]
            if mine:
                ax.scatter([p["retain_acc"] for p in mine], [p["forget_acc"] for p in mine], color=COLORS[s],
                           marker=MARKERS[i % len(MARKERS)], alpha=0.75, label=f"{label(run)}: {s}")
    gate = have[0]["sweep"].get("retain_gate", 0.99)
    ax.axvline(gate, color="red", ls="--", lw=1, label=f"retain gate {gate}")
    ax.set_xlabel("retain QA accuracy (fraction of known questions kept)")
    ax.set_ylabel("forget QA accuracy (lower = more unlearned)")
    ax.set_title("Unlearning trade-off over the sweep\n(good points: right of the gate, low)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save(fig, out / "tradeoff.png")
    return True


HEADLINE = [("unlearning", "unlearning_score", "unlearning score\n(1 - forget acc, higher better)"),
            ("unlearning", "retain_kl", "retain KL(clean||intervened)\n(nats/token, lower better)"),
            ("unlearning", "precision_auroc", "precision AUROC\n(KL separates passage, higher better)"),
            ("detection", "token_f1", "detection token F1\n(held-out text, higher better)")]


def fig_headline(runs, out: Path) -> bool:
    fig, axes = plt.subplots(1, len(HEADLINE), figsize=(4.2 * len(HEADLINE), 4.2))
    drew = False
    width = 0.8 / max(1, len(runs))
    for ax, (prefix, metric, title) in zip(axes, HEADLINE):
        for i, run in enumerate(runs):
            xs, ys, es = [], [], []
            for j, s in enumerate(STRATEGIES):
                e = run["info"].get(f"{prefix}_{s}")
                if e and metric in e["means"]:
                    xs.append(j + i * width)
                    ys.append(e["means"][metric])
                    es.append(e.get("stderrs", {}).get(metric, 0.0))
            if xs:
                drew = True
                ax.bar(xs, ys, width, yerr=es, capsize=3, label=label(run))
            else:
                warn(f"{run['name']} has no {prefix}_*/{metric}: left out of headline.png")
        group_axis(ax, STRATEGIES, len(runs), width, title)
    finish(fig, axes[0], "Headline metrics per strategy (error bars: standard error)", out / "headline.png")
    return drew


def fig_precision(runs, out: Path, n_docs: int = 3) -> bool:
    have = [r for r in runs if "spliced" in r]
    if not have:
        return False
    fig, axes = plt.subplots(len(have), n_docs, figsize=(5 * n_docs, 3.2 * len(have)), squeeze=False)
    for row, run in zip(axes, have):
        for ax, doc in zip(row, run["spliced"]["docs"][:n_docs]):
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
    have = [r for r in runs if "temporal_consistency" in r["info"]]
    if not have:
        return False
    metrics = [("smoothness", "smoothness: mean|f_t - f_t-1| / mean f\n(lower = smoother)"),
               ("lag1_autocorr", "lag-1 autocorrelation\n(higher = more persistent)"),
               ("jaccard", "Jaccard of active sets at t, t-1\n(higher = more stable)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    width = 0.8 / len(have)
    for ax, (m, title) in zip(axes, metrics):
        for i, run in enumerate(have):
            e = run["info"]["temporal_consistency"]
            keys = [f"all_{m}", f"selected_{m}"]
            ax.bar([k + i * width for k in range(2)], [e["means"].get(k, 0.0) for k in keys], width,
                   yerr=[e["stderrs"].get(k, 0.0) for k in keys], capsize=3, label=label(run))
        group_axis(ax, ["all latents", "selected latents"], len(have), width, title)
    finish(fig, axes[0], "Temporal consistency of SAE latents on held-out text", out / "consistency.png")
    return True


def fig_training(runs, out: Path) -> bool:
    have = [r for r in runs if r.get("log")]
    if not have:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for run in have:
        tokens = [l["tokens"] / 1000 for l in run["log"]]
        for ax, key in zip(axes, ("loss", "l0", "fve")):
            ax.plot(tokens, [l[key] for l in run["log"]], label=label(run))
    for ax, title in zip(axes, ("training loss (mse + l1_coeff * l1)", "L0 (active latents per token)",
                                "variance explained (1 - mse / d_in, training batch)")):
        ax.set_xlabel("training tokens (thousands)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    save(fig, out / "training.png")
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


def save(fig, path: Path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Figures comparing experiment.py runs.")
    ap.add_argument("runs", nargs="*", help="run folders (default: every run_* folder here)")
    ap.add_argument("--out_dir", default="plots", help="folder for the PNGs (default: plots)")
    args = ap.parse_args(argv)
    try:
        folders = [Path(r) for r in args.runs] or sorted(Path(".").glob("run_*"), key=lambda p: p.name)
        if not folders:
            raise PlotError("no run_* folders here; name the run folders to plot")
        runs = [r for r in (load_run(f) for f in folders) if r is not None]
        if not runs:
            raise PlotError("none of the run folders holds a finished run")
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        made = [name for name, fig in (("tradeoff", fig_tradeoff), ("headline", fig_headline),
                                      ("precision", fig_precision), ("consistency", fig_consistency),
                                      ("training", fig_training)) if fig(runs, out)]
    except PlotError as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(m + '.png' for m in made)} to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

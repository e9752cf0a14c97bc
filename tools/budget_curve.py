"""Forgetting against retain damage as a curve: the forget-CE increase each strategy reaches within a
grid of retain-KL budgets, read from the committed sweeps (sweep.json) with the harness's own Pareto
front and interpolation (experiment.sweep_front / frontier_within). final_info.json carries two
budgets (0.01, 0.05); this prints the whole curve, mean ± stderr over seeds, and per seed which of
two strategies reaches further. It reads results only: no model, no SAE.

    python tools/budget_curve.py run_2 run_2/eval_24 --versus pattern,dsg
    python tools/budget_curve.py run_1/control_ramp --versus pattern,pattern_random --plot plots/control.png

With --plot it also draws each run's curves, one panel per run: a strategy and its --random_control twin
(<strategy>_random, dashed) in one colour.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import experiment as ex  # noqa: E402

BUDGETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def seed_folders(run: Path) -> list[Path]:
    """run/seed_k/ for a seeded run, else the run folder itself; each must hold sweep.json."""
    folders = sorted(run.glob("seed_*")) or [run]
    missing = [f for f in folders if not (f / "sweep.json").is_file()]
    if missing:
        raise ex.UsageError(f"{missing[0]}: no sweep.json")
    return folders


def reach_within(points: list[dict], strategy: str, budgets=BUDGETS) -> list[float] | None:
    """Forget-CE increase within each retain-KL budget along the strategy's Pareto front; None when
    the sweep has no point of that strategy."""
    mine = [p for p in points if p["strategy"] == strategy]
    if not mine:
        return None
    front = ex.sweep_front(mine, "retain_kl")  # the front final_info.json's frontier measures use
    return [ex.frontier_within(front, b) for b in budgets]


def curves(run: Path) -> dict[str, np.ndarray]:
    """strategy -> (seeds, budgets) array of forget-CE increases."""
    per_seed = [ex.read_json(f / "sweep.json", "sweep")["points"] for f in seed_folders(run)]
    names = dict.fromkeys(p["strategy"] for p in per_seed[0])
    out = {}
    for s in names:
        rows = [reach_within(pts, s) for pts in per_seed]
        if all(r is not None for r in rows):
            out[s] = np.array(rows)
    return out


def fmt(col: np.ndarray) -> str:
    return f"{col.mean():.2f}" + (f" ± {ex.stderr(col):.2f}" if len(col) > 1 else "")


def report(run: Path, versus: tuple[str, str] | None):
    c = curves(run)
    n = len(next(iter(c.values())))
    print(f"\n{run} ({n} seed{'s' * (n > 1)}): forget-CE increase (nats) within a retain-KL budget")
    print("| strategy | " + " | ".join(f"KL {b:g}" for b in BUDGETS) + " |")
    print("|---|" + "---|" * len(BUDGETS))
    for s, a in c.items():
        print(f"| {s} | " + " | ".join(fmt(a[:, j]) for j in range(len(BUDGETS))) + " |")
    if versus and all(v in c for v in versus):
        a, b = (c[v] for v in versus)
        wins = (a > b + 1e-9).sum(0)
        losses = (b > a + 1e-9).sum(0)
        print(f"seeds where {versus[0]} reaches further / {versus[1]} further: "
              + "  ".join(f"{b_:g}: {w}/{l}" for b_, w, l in zip(BUDGETS, wins, losses)))


COLORS = {"standard": "tab:blue", "gate": "tab:green", "dsg": "tab:purple", "dsg_causal": "tab:pink",
          "pattern": "tab:orange", "hybrid": "tab:brown"}


def figure(n: int, ncol: int, width: float):
    """A figure of n budget-curve panels, ncol a row; the unused ones hidden."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(width * ncol, 4.0 * nrow), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat[:n]


def draw_curve(ax, a: np.ndarray, color: str, ls: str, label: str):
    """One (seeds, budgets) curve: the mean over seeds, with a band of one stderr over seeds."""
    m = a.mean(0)
    e = np.array([ex.stderr(a[:, j]) for j in range(a.shape[1])])
    ax.plot(BUDGETS, m, color=color, ls=ls, marker="o", ms=3, label=label)
    ax.fill_between(BUDGETS, m - e, m + e, color=color, alpha=0.12, lw=0)


def finish_panel(ax, title: str):
    ax.set_xscale("log")
    ax.set_xlabel("retain-KL budget (nats/token, log)")
    ax.set_ylabel("forget-CE increase reached (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def save_figure(fig, title: str, path: Path):
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"\nwrote {path}")


def plot(runs: list[Path], path: Path):
    """One panel per run: every strategy's curve, its --random_control twin dashed in the same colour."""
    fig, axes = figure(len(runs), min(len(runs), 3), 5.4)
    for ax, run in zip(axes, runs):
        for s, a in curves(run).items():
            base = s.removesuffix("_random")
            draw_curve(ax, a, COLORS.get(base, "grey"), "--" if s != base else "-",
                       s.replace("_random", ", random latents"))
        finish_panel(ax, str(run))
    save_figure(fig, "Forgetting within a retain-damage budget (band: stderr over seeds)", path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (with seed_k/ subfolders or one sweep.json)")
    ap.add_argument("--versus", default="pattern,dsg", help="two strategies to compare seed by seed")
    ap.add_argument("--plot", default="", help="also draw every run's curves into this PNG, one panel per run")
    args = ap.parse_args(argv)
    versus = tuple(args.versus.split(",")) if args.versus else None
    if versus and len(versus) != 2:
        print("error: --versus takes two strategies, comma-separated", file=sys.stderr)
        return 2
    try:
        for r in args.runs:
            report(Path(r), versus)
        if args.plot:
            plot([Path(r) for r in args.runs], Path(args.plot))
    except ex.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

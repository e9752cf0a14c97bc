"""Two evidence accumulators side by side: the same SAEs evaluated once with the learned detector's EMA
evidence (--evidence ema, the default) and once with the two-state HMM filter (--evidence hmm). For each
pair of run folders it prints, mean ± stderr over seeds:

  - the forget-CE increase that pattern, dsg and dsg_causal reach within retain KL 0.001 / 0.005 / 0.01 /
    0.05 (tools/budget_curve.py's curve: the harness's own front and interpolation), with, per budget,
    the seeds where pattern reaches further than dsg (or dsg_causal) / falls short;
  - the detector and clamp measures the choice between accumulators turns on (final_info.json):
    detection token and spliced AUROC, median delay at passage start and tokens to stop after it,
    retain fire rate per token and per row (held-out, and on the calibration rows the threshold was
    set on), the fraction of held-out retain rows where pattern's clamp acts at all, pattern's
    precision AUROC and retain-KL ratio to standard at +0.5; where the two means are within two
    stderrs, the seeds where hmm is higher / lower.

With --plot it draws the budget curves, one panel per pair: pattern with each accumulator against dsg
and dsg_causal (solid: the ema run, dashed: the hmm run; dsg and dsg_causal can differ between the two
because they sweep the gated selection, which is made where the detector fires).

    python tools/evidence_compare.py --pair "run_1, 24 rows=run_1/eval_24_ema,run_1/eval_24_hmm" \\
        --pair "real text=saes/real_relu_w4,saes/real_relu_w4/hmm" --plot plots/evidence.png

Any two detector variants of the same SAEs compare the same way; --labels names them (default ema,hmm),
e.g. the per-token against the per-row threshold (--detector_fpr_unit):

    python tools/evidence_compare.py --labels token,row --pair "run_1, 24 rows=run_1/eval_24_ema,run_1/eval_24_row"

It reads results only: no model, no SAE.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import budget_curve as bc  # noqa: E402
import doc_tables as dt  # noqa: E402
import experiment as ex  # noqa: E402

BUDGETS = (0.001, 0.005, 0.01, 0.05)
VERSUS = ("dsg", "dsg_causal")
# (final_info entry, measure, label, decimals), read per seed from seed_<k>/final_info.json: the detector and clamp rows
# of the docs' evidence table (its forget-CE rows are this tool's budget table)
MEASURES = [(e, k, title, d) for title, e, k, d, _ in dt.EVIDENCE_MEASURES if not k.startswith("forget_ce_within")]


def seed_infos(run: Path) -> list[dict]:
    """Each seed's final_info.json measures ({entry: {measure: value}}), in seed order."""
    out = []
    for f in bc.seed_folders(run):
        info = ex.read_json(f / "final_info.json", "final_info")
        out.append({k: v["means"] for k, v in info.items() if isinstance(v, dict) and "means" in v})
    return out


def per_seed(infos: list[dict], entry: str, key: str) -> np.ndarray | None:
    vals = [i.get(entry, {}).get(key) for i in infos]
    return None if any(v is None for v in vals) else np.array(vals, dtype=float)


def fmt(a: np.ndarray | None, digits: int = 3) -> str:
    if a is None:
        return "-"
    return f"{a.mean():.{digits}f}" + (f" ± {ex.stderr(a):.{digits}f}" if len(a) > 1 else "")


def seed_wins(a: np.ndarray, b: np.ndarray) -> str:
    """'w/l' seeds where a > b / a < b, shown only where the means are within two stderrs of each other
    (elsewhere the means already decide)."""
    if len(a) < 2 or len(a) != len(b):
        return ""
    gap, se = abs(a.mean() - b.mean()), np.hypot(ex.stderr(a), ex.stderr(b))
    if gap > 2 * se:
        return ""
    return f" ({int((a > b + 1e-9).sum())}/{int((a < b - 1e-9).sum())})"


def budget_table(name: str, first: Path, second: Path, labels=("ema", "hmm")) -> dict:
    """Print the budget table of one pair; return {label: (seeds, budgets) array} for the figure."""
    runs = {labels[0]: bc.curves(first), labels[1]: bc.curves(second)}
    print(f"\n### {name}: forget-CE increase (nats) within a retain-KL budget ({first} / {second})\n")
    print("| strategy, variant | " + " | ".join(f"KL {b:g}" for b in BUDGETS) + " |")
    print("|---|" + "---|" * len(BUDGETS))
    cols = [bc.BUDGETS.index(b) for b in BUDGETS]
    curves = {}
    for s in ("pattern",) + VERSUS:
        for acc, c in runs.items():
            if s in c:
                curves[f"{s}, {acc}"] = c[s]
                print(f"| {s}, {acc} | " + " | ".join(fmt(c[s][:, j], 2) for j in cols) + " |")
    for acc, c in runs.items():
        for v in VERSUS:
            # a run without v (a variant that changes only pattern) is compared with the other run's v: same SAEs and rows
            src = acc if v in c else next((other for other, o in runs.items() if v in o), None)
            if "pattern" in c and src is not None:
                a, b = c["pattern"][:, cols], runs[src][v][:, cols]
                wins = "  ".join(f"{bud:g}: {int((a[:, j] > b[:, j] + 1e-9).sum())}/{int((a[:, j] < b[:, j] - 1e-9).sum())}"
                                 for j, bud in enumerate(BUDGETS))
                print(f"\nseeds where pattern ({acc}) reaches further than {v} ({src} run) / falls short: {wins}")
    return curves


def measure_table(name: str, first: Path, second: Path, labels=("ema", "hmm")):
    a_inf, b_inf = seed_infos(first), seed_infos(second)
    print(f"\n### {name}: detector and clamp (mean ± stderr over seeds; in brackets, where the means are "
          f"within two stderrs, the seeds where {labels[1]} is higher / lower)\n")
    print(f"| measure | {labels[0]} | {labels[1]} |")
    print("|---|---|---|")
    for entry, key, label, d in MEASURES:
        a, b = per_seed(a_inf, entry, key), per_seed(b_inf, entry, key)
        wins = seed_wins(b, a) if a is not None and b is not None else ""
        print(f"| {label} | {fmt(a, d)} | {fmt(b, d)}{wins} |")


def plot(pairs: list[tuple[str, dict]], path: Path, labels=("ema", "hmm")):
    colors = {"pattern": "tab:orange", "dsg": "tab:purple", "dsg_causal": "tab:pink"}
    # more than two pairs: two panels a row
    fig, axes = bc.figure(len(pairs), len(pairs) if len(pairs) <= 2 else 2, 6.2)
    for ax, (name, curves) in zip(axes, pairs):
        for label, arr in curves.items():
            s, acc = label.split(", ")
            bc.draw_curve(ax, arr, colors[s], "-" if acc == labels[0] else "--", label)
        bc.finish_panel(ax, name)
    bc.save_figure(fig, f"Detector variants: forgetting within a retain-damage budget\n"
                        f"(solid: the {labels[0]} run, dashed: the {labels[1]} run; band: stderr over seeds)", path)


def parse_pair(text: str) -> tuple[str, Path, Path]:
    name, sep, runs = text.rpartition("=")
    parts = runs.split(",")
    if not sep or len(parts) != 2:
        raise ex.UsageError(f"--pair {text!r}: expected NAME=FIRST_RUN,SECOND_RUN")
    for p in parts:
        if not Path(p).is_dir():
            raise ex.UsageError(f"--pair {text!r}: {p} is not a folder")
    return name, Path(parts[0]), Path(parts[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", action="append", required=True, help="NAME=FIRST_RUN,SECOND_RUN (repeatable): the same SAEs, two detector variants")
    ap.add_argument("--plot", default="", help="write the budget-curve figure here (PNG)")
    ap.add_argument("--labels", default="ema,hmm", help="names of the two runs of each pair (e.g. token,row for "
                    "--detector_fpr_unit)")
    args = ap.parse_args(argv)
    try:
        pairs = [parse_pair(p) for p in args.pair]
        labels = tuple(args.labels.split(","))
        if len(labels) != 2 or len(set(labels)) != 2:
            raise ex.UsageError(f"--labels {args.labels!r}: expected two different names A,B")
        drawn = []
        for name, first, second in pairs:
            drawn.append((name, budget_table(name, first, second, labels)))
            measure_table(name, first, second, labels)
        if args.plot:
            plot(drawn, Path(args.plot), labels)
    except (ex.UsageError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The results tables of README.md and docs/results.md, generated from the committed final_info.json
files, so that a rerun run folder updates its tables with one command and no table can drift from
its JSON.

    python tools/doc_tables.py            # rewrite every generated table in place
    python tools/doc_tables.py --check    # exit 1 and print a diff where a table differs from the JSON

A generated table sits between a line `<!-- table KIND ARGS -->` and a line `<!-- end table -->`;
KIND and ARGS (run folders, a forget-CE level) say what it shows (see KINDS), and everything in
between is this tool's output. Each cell is `mean ± stderr` from the `means` / `stderrs` of one final_info.json entry
(the stderr is left out where it is 0, `n.r.` is null: a level never reached, `–` a strategy the run
did not sweep). It reads JSON only: no model, no SAE.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # budget_curve, for the `budgets` kind

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/results.md")
STRATEGIES = ("standard", "gate", "dsg", "dsg_causal", "pattern", "hybrid")
DETECTORS = ("learned", "residual", "templates", "dsg", "dsg_causal", "gate", "standard", "pattern")
BEGIN = re.compile(r"^<!-- table (\S+)((?: \S+)*) -->$")
END = "<!-- end table -->"

# README's table: the default run, the two w=1 baselines and real text; standard (SAEBench's
# baseline), dsg (the published gate) and pattern (the learned causal gate)
README_RUNS = ("run_1", "run_0", "run_2", "run_real")
README_STRATEGIES = ("standard", "dsg", "pattern")
# (title, entry prefix, key, decimals): the entry is f"{prefix}_{strategy}"
README_COLUMNS = (("retain KL at +0.5", "frontier", "retain_kl_at_ce_0.5", 3),
                  ("forget CE within retain KL 0.01", "frontier", "forget_ce_within_retain_kl_0.01", 2),
                  ("forget CE within retain KL 0.05", "frontier", "forget_ce_within_retain_kl_0.05", 2),
                  ("precision AUROC at +0.5", "frontier", "precision_auroc_at_ce_0.5", 3),
                  ("SAEBench score", "unlearning", "unlearning_score", 3))


@lru_cache(maxsize=None)
def final_info(run: str) -> dict:
    return json.loads((ROOT / run / "final_info.json").read_text())


def value(run: str, entry: str, key: str) -> tuple[float | None, float | None] | None:
    """(mean, stderr) of one key, or None when the run has no such entry."""
    e = final_info(run).get(entry)
    if e is None:
        return None
    return e["means"][key], e["stderrs"][key]


def fmt(v: tuple[float | None, float | None] | None, decimals: int) -> str:
    """`mean ± stderr` as printed everywhere in the docs: no stderr where it is 0, `n.r.` for null."""
    if v is None:
        return "–"
    mean, err = v
    if mean is None:
        return "n.r."
    return f"{mean:.{decimals}f}" + (f" ± {err:.{decimals}f}" if err else "")


def cell(run: str, entry: str, key: str, decimals: int) -> str:
    return fmt(value(run, entry, key), decimals)


def link(run: str, doc: str) -> str:
    """A markdown link from `doc` to the run's final_info.json, named by the run."""
    target = os.path.relpath(ROOT / run / "final_info.json", (ROOT / doc).parent)
    return f"[{run}]({Path(target).as_posix()})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def swept(runs, prefix="unlearning") -> list[str]:
    return [s for s in STRATEGIES if any(f"{prefix}_{s}" in final_info(r) for r in runs)]


# ------------------------------------------------------------------------------------------------
# Kinds of table: each takes the document it goes into and its arguments, and returns its lines
# ------------------------------------------------------------------------------------------------

def t_readme(doc: str) -> list[str]:
    """README's headline numbers. Each header names the key (`frontier.` = entry frontier_<strategy>),
    each row the file: tests/test_docs.py reads the table back against the JSON."""
    header = ["run", "strategy"] + [f"{title}<br>`{prefix}.{key}`" for title, prefix, key, _ in README_COLUMNS]
    rows = [[link(run, doc), f"`{s}`"] + [cell(run, f"{prefix}_{s}", key, d) for _, prefix, key, d in README_COLUMNS]
            for run in README_RUNS for s in README_STRATEGIES]
    return table(header, rows)


def t_sae(doc: str, *runs: str) -> list[str]:
    cols = (("FVE", "fve", 3), ("L0", "l0", 3), ("CE recovered", "ce_loss_recovered", 3), ("dead", "dead_frac", 3))
    return table(["run"] + [c[0] for c in cols], [[link(r, doc)] + [cell(r, "sae", k, d) for _, k, d in cols] for r in runs])


def t_frontier(doc: str, x: str, *runs: str) -> list[str]:
    """retain KL at forget-CE +x (ratio to standard) / spliced after-passage KL at +x."""
    def one(r, s):
        if f"frontier_{s}" not in final_info(r):
            return "–"
        e = f"frontier_{s}"
        return (f"{cell(r, e, f'retain_kl_at_ce_{x}', 3)} ({cell(r, e, f'retain_kl_ratio_at_ce_{x}', 2)})"
                f" / {cell(r, e, f'spliced_kl_after_at_ce_{x}', 3)}")
    return table(["strategy"] + [link(r, doc) for r in runs], [[s] + [one(r, s) for r in runs] for s in swept(runs)])


def t_budget(doc: str, *runs: str) -> list[str]:
    """forget-CE increase within retain KL 0.01 / 0.05; SAEBench score."""
    def one(r, s):
        if f"frontier_{s}" not in final_info(r):
            return "–"
        f = f"frontier_{s}"
        return (f"{cell(r, f, 'forget_ce_within_retain_kl_0.01', 2)} / {cell(r, f, 'forget_ce_within_retain_kl_0.05', 2)}"
                f"; {cell(r, f'unlearning_{s}', 'unlearning_score', 3)}")
    return table(["strategy"] + [link(r, doc) for r in runs], [[s] + [one(r, s) for r in runs] for s in swept(runs)])


BUDGET_COLUMNS = (0.001, 0.005, 0.01, 0.05)


def t_budgets(doc: str, *runs: str) -> list[str]:
    """Forget-CE increase within retain KL 0.001 / 0.005 / 0.01 / 0.05 of each gated strategy a run swept:
    tools/budget_curve.py's curve from each seed's sweep.json, mean ± stderr over seeds."""
    import budget_curve as bc  # imports experiment (torch): only tables of this kind need it
    cols = [bc.BUDGETS.index(b) for b in BUDGET_COLUMNS]
    rows = []
    for r in runs:
        curves = bc.curves(ROOT / r)
        for s in (x for x in ("pattern", "pattern_random", "hybrid", "dsg", "dsg_causal") if x in curves):
            a = curves[s]
            rows.append([f"`{s}`, {link(r, doc)}"] + [fmt((float(a[:, j].mean()), bc.ex.stderr(a[:, j])), 2)
                                                     for j in cols])
    return table(["strategy, run"] + [f"KL {b:g}" for b in BUDGET_COLUMNS], rows)


def t_detection(doc: str, *runs: str) -> list[str]:
    """token AUROC / spliced AUROC / retain fire rate / passages detected / median delay."""
    keys = (("token_auroc", 3), ("spliced_auroc", 3), ("fire_rate_retain", 3), ("passages_detected", 3),
            ("delay_tokens_median", 1))

    def one(r, d):
        e = f"detection_{d}"
        return " / ".join(cell(r, e, k, n) for k, n in keys) if e in final_info(r) else "–"
    names = [d for d in DETECTORS if any(f"detection_{d}" in final_info(r) for r in runs)]
    return table(["detector"] + [link(r, doc) for r in runs], [[d] + [one(r, d) for r in runs] for d in names])


def t_precision(doc: str, *runs: str) -> list[str]:
    """precision AUROC at the SAEBench scoring point / at matched forgetting (+0.5)."""
    def one(r, s):
        if f"unlearning_{s}" not in final_info(r):
            return "–"
        return (f"{cell(r, f'unlearning_{s}', 'precision_auroc', 3)} / "
                f"{cell(r, f'frontier_{s}', 'precision_auroc_at_ce_0.5', 3)}")
    return table(["strategy"] + [link(r, doc) for r in runs], [[s] + [one(r, s) for r in runs] for s in swept(runs)])


def t_strategies(doc: str, run: str) -> list[str]:
    """One run, strategies as columns, with the targets: the layout of the real-text table."""
    ss = swept([run])
    rows = [
        ("token AUROC / spliced AUROC of its rule",
         lambda s: f"{cell(run, f'detection_{s}', 'token_auroc', 3)} / {cell(run, f'detection_{s}', 'spliced_auroc', 3)}",
         "≥ 0.90 / ≥ 0.90"),
        ("retain KL at +0.25 / +0.5 / +1.0, ratio to `standard`",
         lambda s: " / ".join(cell(run, f"frontier_{s}", f"retain_kl_ratio_at_ce_{x}", 2) for x in ("0.25", "0.5", "1.0")),
         "≤ 0.25"),
        ("forget-CE increase within retain KL 0.01 / 0.05",
         lambda s: " / ".join(cell(run, f"frontier_{s}", f"forget_ce_within_retain_kl_{b}", 2) for b in ("0.01", "0.05")),
         ""),
        ("precision AUROC at +0.5", lambda s: cell(run, f"frontier_{s}", "precision_auroc_at_ce_0.5", 3), "≥ 0.85"),
        ("SAEBench score", lambda s: cell(run, f"unlearning_{s}", "unlearning_score", 3), ""),
    ]
    return table([f"measure ({link(run, doc)})"] + [f"`{s}`" for s in ss] + ["target"],
                 [[name] + [fn(s) for s in ss] + [target] for name, fn, target in rows])


def t_versus(doc: str, strategy: str, *runs: str) -> list[str]:
    """One strategy across runs (a sensitivity folder beside its parent run), measures as rows."""
    f, u, d = f"frontier_{strategy}", f"unlearning_{strategy}", f"detection_{strategy}"
    rows = [
        ("retain-KL ratio at +0.25 / +0.5 / +1.0",
         lambda r: " / ".join(cell(r, f, f"retain_kl_ratio_at_ce_{x}", 2) for x in ("0.25", "0.5", "1.0"))),
        ("retain KL at +0.5", lambda r: cell(r, f, "retain_kl_at_ce_0.5", 3)),
        ("forget-CE increase within retain KL 0.01", lambda r: cell(r, f, "forget_ce_within_retain_kl_0.01", 2)),
        ("forget-CE increase within retain KL 0.05", lambda r: cell(r, f, "forget_ce_within_retain_kl_0.05", 2)),
        ("precision AUROC at +0.5", lambda r: cell(r, f, "precision_auroc_at_ce_0.5", 3)),
        ("SAEBench score", lambda r: cell(r, u, "unlearning_score", 3)),
        ("retain fire rate of its rule", lambda r: cell(r, d, "fire_rate_retain", 4)),
        ("median delay of its rule (tokens)", lambda r: cell(r, d, "delay_tokens_median", 1)),
    ]
    return table([f"`{strategy}`"] + [link(r, doc) for r in runs], [[name] + [fn(r) for r in runs] for name, fn in rows])


def t_machine(doc: str, *runs: str) -> list[str]:
    """Where and how long each run ran, from its metadata.json (and its seeds')."""
    def meta(path: Path) -> dict:
        return json.loads(path.read_text()) if path.exists() else {}

    rows = []
    for r in runs:
        seeds = [meta(p) for p in sorted((ROOT / r).glob("seed_*/metadata.json"))]
        m = meta(ROOT / r / "metadata.json") or seeds[0]
        walls = [s["wall_time_s"] for s in seeds]
        target = os.path.relpath(ROOT / r / "command.txt", (ROOT / doc).parent)
        rows.append([f"[{r}]({Path(target).as_posix()})", str(len(seeds) or 1), m["cpu_model"],
                     "yes" if m["cpu_bf16"] else "no", m["versions"]["torch"], str(m["torch_threads"]),
                     f"{meta(ROOT / r / 'metadata.json')['wall_time_s']:.0f} s" if (ROOT / r / "metadata.json").exists() else "–",
                     f"{min(walls):.0f}-{max(walls):.0f} s" if walls else "–"])
    return table(["run (command)", "seeds", "CPU", "native bf16", "torch", "threads", "wall, whole run", "wall per seed"], rows)


def t_generation(doc: str, run: str) -> list[str]:
    """The --generate stage of one run: per causal strategy (guard at its +1.0 point), what greedy
    continuations keep and change; the clean model's rows for reference. The point's forget-CE
    increase is shown where the stage refined it (--guard_refine; "–" for runs made before)."""
    def cell(run_, entry: str, key: str, decimals: int) -> str:  # "–" where the row has no such measure (clean)
        return fmt(value(run_, entry, key) if key in final_info(run_)[entry]["means"] else None, decimals)

    def changed(entry: str, key: str) -> str:  # the fraction not identical to clean
        if key not in final_info(run)[entry]["means"]:
            return "–"
        v = value(run, entry, key)
        return fmt((None if v[0] is None else 1 - v[0], v[1]), 2)

    cols = [("forget-CE increase at its refined point",
             lambda e: cell(run, e, "point_forget_ce_increase", 2) if "point_sweep_multiplier" in
             final_info(run)[e]["means"] else "–"),
            ("retain identical", lambda e: cell(run, e, "retain_identical", 2)),
            ("forget changed", lambda e: changed(e, "forget_identical")),
            ("spliced changed", lambda e: changed(e, "spliced_identical")),
            ("forget: first difference (tokens)", lambda e: cell(run, e, "forget_first_difference", 1)),
            ("detector fire rate on forget continuations", lambda e: cell(run, e, "forget_fire", 2)),
            ("clean model's CE of forget continuations", lambda e: cell(run, e, "forget_ce", 2)),
            ("repeated 4-grams, forget / retain",
             lambda e: f"{cell(run, e, 'forget_rep4', 3)} / {cell(run, e, 'retain_rep4', 3)}"),
            ("tokens/s", lambda e: cell(run, e, "tokens_per_s", 1))]
    info = final_info(run)
    names = ["clean"] + [s for s in STRATEGIES if f"generation_{s}" in info]
    rows = [[f"`{n}`"] + [fn(f"generation_{n}") for _, fn in cols] for n in names]
    true = value(run, "generation_clean", "forget_ce_true")
    rows.append(["true held-out text"] + ["–"] * 6 + [fmt(true, 2), "–", "–"])
    return table([f"guard ({link(run, doc)})"] + [c[0] for c in cols], rows)


# Issue 27's comparison of SAE recipes: (title, entry, key, decimals, +1 higher is better / -1 lower / 0 neither)
SAE_MEASURES = (("FVE", "sae", "fve", 3, 1), ("CE recovered", "sae", "ce_loss_recovered", 3, 1),
                ("L0", "sae", "l0", 1, 0), ("dead latents", "sae", "dead_frac", 3, -1),
                ("temporal consistency: lag-1 autocorrelation", "temporal_consistency", "all_lag1_autocorr", 3, 0),
                ("detection token AUROC", "detection_learned", "token_auroc", 3, 1),
                ("detection spliced AUROC", "detection_learned", "spliced_auroc", 3, 1),
                ("`pattern` retain KL at +0.5", "frontier_pattern", "retain_kl_at_ce_0.5", 3, -1),
                ("`pattern` retain KL at +1.0", "frontier_pattern", "retain_kl_at_ce_1.0", 3, -1),
                ("`standard` retain KL at +0.5", "frontier_standard", "retain_kl_at_ce_0.5", 3, -1),
                ("`standard` retain KL at +1.0", "frontier_standard", "retain_kl_at_ce_1.0", 3, -1),
                ("`pattern` precision AUROC at +0.5", "frontier_pattern", "precision_auroc_at_ce_0.5", 3, 1),
                ("`pattern` forget CE within retain KL 0.01", "frontier_pattern", "forget_ce_within_retain_kl_0.01", 2, 1),
                ("`pattern` forget CE within retain KL 0.05", "frontier_pattern", "forget_ce_within_retain_kl_0.05", 2, 1),
                ("`dsg` forget CE within retain KL 0.01", "frontier_dsg", "forget_ce_within_retain_kl_0.01", 2, 1),
                ("`dsg` forget CE within retain KL 0.05", "frontier_dsg", "forget_ce_within_retain_kl_0.05", 2, 1),
                ("`pattern` SAEBench score", "unlearning_pattern", "unlearning_score", 3, 1),
                ("`standard` SAEBench score", "unlearning_standard", "unlearning_score", 3, 1),
                ("probing: top-1 latent accuracy", "sparse_probing", "sae_top_1_test_accuracy", 3, 1),
                ("probing: all latents accuracy", "sparse_probing", "sae_test_accuracy", 3, 1))
_SAE_ROW = {m[0]: m for m in SAE_MEASURES}
# The verdict's five questions (issue 27): does a temporal SAE beat the plain one at matched L0?
VERDICT = ("`pattern` precision AUROC at +0.5", "`pattern` forget CE within retain KL 0.01",
           "detection token AUROC", "`pattern` SAEBench score", "probing: top-1 latent accuracy")


@lru_cache(maxsize=None)
def seed_infos(run: str) -> tuple[dict, ...]:
    """The final_info.json of each seed folder of a run, in seed order (read once, like final_info)."""
    files = sorted((ROOT / run).glob("seed_*/final_info.json"), key=lambda p: int(p.parent.name[5:]))
    return tuple(json.loads(f.read_text()) for f in files)


def seed_values(run: str, entry: str, key: str) -> list[float | None]:
    """The per-seed values of one key, in seed order (None where a seed lacks it)."""
    return [None if entry not in info else info[entry]["means"].get(key) for info in seed_infos(run)]


def t_saes(doc: str, *runs: str) -> list[str]:
    """SAE recipes side by side, measures as rows: mean ± stderr over seeds."""
    rows = [[title] + [cell(r, e, k, d) if e in final_info(r) else "–" for r in runs]
            for title, e, k, d, _ in SAE_MEASURES]
    return table(["measure"] + [link(r, doc) for r in runs], rows)


def compare(run: str, ref: str, entry: str, key: str, sign: int, decimals: int) -> str:
    """`run` against `ref` on one measure: the difference of means with its stderr (the two runs'
    stderrs combined), `better` / `worse` where it exceeds two stderrs, otherwise `within 2 se` and the
    seeds where `run` is better, paired by seed number (same data order, not the same SAE)."""
    return compare_entries(run, entry, ref, entry, key, sign, decimals)


def compare_entries(run: str, entry: str, ref: str, ref_entry: str, key: str, sign: int, decimals: int) -> str:
    """compare(), for two entries that may differ (a strategy against its random control in one run)."""
    a, b = value(run, entry, key), value(ref, ref_entry, key)
    if a is None or b is None or a[0] is None or b[0] is None:
        return "n.r."
    diff, se = a[0] - b[0], ((a[1] or 0) ** 2 + (b[1] or 0) ** 2) ** 0.5
    text = f"{diff:+.{decimals}f} ± {se:.{decimals}f}"
    if abs(diff) > 2 * se:
        return f"{text}: **{'better' if diff * sign > 0 else 'worse'}**"
    pairs = [(x, y) for x, y in zip(seed_values(run, entry, key), seed_values(ref, ref_entry, key))
             if x is not None and y is not None]
    wins = sum((x - y) * sign > 0 for x, y in pairs)
    return f"{text}: within 2 se, better on {wins}/{len(pairs)} seeds"


def t_verdict(doc: str, ref: str, *runs: str) -> list[str]:
    """Each run against the reference run (the plain SAE of the same recipe) on the verdict's measures."""
    rows = [[title] + [compare(r, ref, _SAE_ROW[title][1], _SAE_ROW[title][2], _SAE_ROW[title][4], _SAE_ROW[title][3])
                       for r in runs] for title in VERDICT]
    return table([f"measure: run − {link(ref, doc)}"] + [link(r, doc) for r in runs], rows)


# The sequential-evidence comparison (issue 26): (title, entry, key, decimals, sign as in SAE_MEASURES);
# the first seven are SAE_MEASURES' rows of the same title
EVIDENCE_MEASURES = tuple(_SAE_ROW[t] for t in (
    "`pattern` forget CE within retain KL 0.01", "`pattern` forget CE within retain KL 0.05",
    "`dsg` forget CE within retain KL 0.01", "`dsg` forget CE within retain KL 0.05",
    "`pattern` precision AUROC at +0.5", "detection token AUROC", "detection spliced AUROC")) + (
    ("`dsg_causal` forget CE within retain KL 0.01", "frontier_dsg_causal", "forget_ce_within_retain_kl_0.01", 2, 1),
    ("`dsg_causal` forget CE within retain KL 0.05", "frontier_dsg_causal", "forget_ce_within_retain_kl_0.05", 2, 1),
    ("`pattern` retain-KL ratio to `standard` at +0.5", "frontier_pattern", "retain_kl_ratio_at_ce_0.5", 3, -1),
    ("median delay at passage start (tokens)", "detection_learned", "delay_tokens_median", 1, -1),
    ("median tokens to stop after the passage", "detection_learned", "stop_tokens_median", 1, -1),
    ("detector retain fire rate per token", "detection_learned", "fire_rate_retain", 4, -1),
    ("detector retain rows with a fire", "detection_learned", "fire_rows_retain", 3, -1),
    ("calibration retain fire rate per token", "detection_learned", "cal_fire_rate_retain", 4, 0),
    ("calibration retain rows with a fire", "detection_learned", "cal_fire_rows_retain", 3, 0),
    ("retain rows where `pattern` clamps", "detection_pattern", "fire_rows_retain", 3, -1),
    ("forget tokens where `pattern` clamps", "detection_pattern", "token_recall", 3, 1))


# what --pattern_clamp changes beside the evidence measures: the after-passage damage and SAEBench's score
CLAMP_MEASURES = EVIDENCE_MEASURES + (
    ("`pattern` after-passage KL ratio to `standard` at +0.5", "frontier_pattern", "spliced_kl_after_ratio_at_ce_0.5", 3, -1),
    # the ratio's two sides: on the w=4 SAE standard's own after-passage damage is the smaller one
    ("`pattern` after-passage KL at +0.5", "frontier_pattern", "spliced_kl_after_at_ce_0.5", 3, -1),
    ("`standard` after-passage KL at +0.5", "frontier_standard", "spliced_kl_after_at_ce_0.5", 3, 0),
    _SAE_ROW["`pattern` SAEBench score"])


def generation_measures(*rows: tuple) -> tuple:
    """Measure rows of the generation stage from (guard, title, key, decimals, sign)."""
    return tuple((f"`{s}` generation: {t}", f"generation_{s}", k, d, sign) for s, t, k, d, sign in rows)


# --detector_fpr_unit position against token: the clamp's measures, the learned detector's held-out retain
# false alarms per position bucket (runs made before the buckets were reported show "–"), and the generation
# stage, whose prompts are a row's first 32 tokens
POSITION_MEASURES = CLAMP_MEASURES + tuple(
    (f"detector retain fire rate, tokens {b}", "detection_learned", f"fire_rate_retain_tokens_{b.replace('-', '_')}", 4, 0)
    for b in ("1-32", "33-64", "65-on")) + generation_measures(
        ("pattern", "retain continuations identical to clean", "retain_identical", 2, 1),
        ("standard", "retain continuations identical to clean", "retain_identical", 2, 0),
        ("pattern", "forget continuations identical to clean", "forget_identical", 2, -1),
        ("pattern", "repeated 4-grams in forget continuations", "forget_rep4", 3, -1),
        ("clean", "repeated 4-grams in forget continuations", "forget_rep4", 3, 0),
        ("pattern", "clean model's CE of forget continuations", "forget_ce", 2, -1),
        ("pattern", "forget-CE increase at its refined point", "point_forget_ce_increase", 2, 0))


# --pattern_edit steer against the clamp (and --hold_rows against one threshold): the clamp's measures and what
# the model writes (issue 28's targets: retain continuations unchanged, forget ones changed as often as
# dsg_causal's, their CE and their loops)
STEER_MEASURES = CLAMP_MEASURES + generation_measures(
        ("pattern", "forget-CE increase at its refined point", "point_forget_ce_increase", 2, 0),
        ("pattern", "retain continuations identical to clean", "retain_identical", 2, 1),
        ("pattern", "forget continuations identical to clean", "forget_identical", 2, -1),
        ("dsg_causal", "forget continuations identical to clean", "forget_identical", 2, 0),
        ("pattern", "repeated 4-grams in forget continuations", "forget_rep4", 3, -1),
        ("clean", "repeated 4-grams in forget continuations", "forget_rep4", 3, 0),
        ("pattern", "detector fire rate on forget continuations", "forget_fire", 2, -1),
        ("clean", "detector fire rate on forget continuations", "forget_fire", 2, 0),
        ("pattern", "clean model's CE of forget continuations", "forget_ce", 2, -1),
        ("clean", "clean model's CE of the true continuations", "forget_ce_true", 2, 0))


def t_evidence(doc: str, *runs: str, label: str = "hmm − ema", measures=EVIDENCE_MEASURES) -> list[str]:
    """Pairs of runs of the same SAEs, two detector variants (--evidence ema then hmm; or, as `threshold`,
    --detector_fpr_unit token then row): both, and the second minus the first."""
    if len(runs) % 2:
        raise ValueError(f"{doc}: tables evidence and threshold take pairs of runs")
    pairs = list(zip(runs[::2], runs[1::2]))

    def has(r, e, k):
        return k in final_info(r).get(e, {}).get("means", {})

    def one(r, e, k, d):
        return cell(r, e, k, d) if has(r, e, k) else "–"

    def diff(a, b, e, k, d, sign):  # a measure with no better direction (sign 0): the difference alone
        if not (has(a, e, k) and has(b, e, k)):
            return "–"
        return compare(b, a, e, k, sign, d) if sign else compare(b, a, e, k, 1, d).split(":")[0]
    rows = [[title] + [c for a, b in pairs for c in (one(a, e, k, d), one(b, e, k, d), diff(a, b, e, k, d, sign))]
            for title, e, k, d, sign in measures]
    rows = [r for r in rows if any(c != "–" for c in r[1:])]  # a stage no run of the table has (no generation)
    header = ["measure"] + [c for a, b in pairs for c in (link(a, doc), link(b, doc), label)]
    return table(header, rows)


# --random_control: a strategy on its selections against the same strategy on random latents of the same
# sizes (title, entry prefix, key, decimals, sign as in SAE_MEASURES)
CONTROL_MEASURES = (("forget CE within retain KL 0.01", "frontier", "forget_ce_within_retain_kl_0.01", 2, 1),
                    ("forget CE within retain KL 0.05", "frontier", "forget_ce_within_retain_kl_0.05", 2, 1),
                    ("retain KL at +0.5", "frontier", "retain_kl_at_ce_0.5", 4, -1),
                    ("retain KL at +1.0", "frontier", "retain_kl_at_ce_1.0", 4, -1),
                    ("precision AUROC at +0.5", "frontier", "precision_auroc_at_ce_0.5", 3, 1),
                    ("after-passage KL at +0.5", "frontier", "spliced_kl_after_at_ce_0.5", 3, -1),
                    ("SAEBench score", "unlearning", "unlearning_score", 3, 1))


def t_control(doc: str, *runs: str) -> list[str]:
    """Each strategy a run swept with --random_control: on its selections, on the random twins, and the
    difference (selections − random; `better` where the selections win beyond two stderrs)."""
    rows = []
    for s in STRATEGIES:
        for title, pre, key, d, sign in CONTROL_MEASURES:
            cells = []
            for r in runs:
                mine, ctrl = f"{pre}_{s}", f"{pre}_{s}_random"
                if ctrl not in final_info(r):
                    cells += ["–"] * 3
                    continue
                cells += [cell(r, mine, key, d), cell(r, ctrl, key, d), compare_entries(r, mine, r, ctrl, key, sign, d)]
            if any(c != "–" for c in cells):
                rows.append([f"`{s}`: {title}"] + cells)
    header = ["measure"] + [c for r in runs for c in (f"selections ({link(r, doc)})", "random latents", "selections − random")]
    return table(header, rows)


# --detector residual (or combined) against the same run gating on SAE latents: pattern's measures (its
# generation stage's too, where both runs have one), and each run's gate detector (detection_learned,
# detection_residual or detection_combined) side by side. (title, entry, key, decimals, sign as in
# SAE_MEASURES, the gate's own detection entry when the row is about the detector); the tighter budgets are
# the `budgets` table's (final_info.json carries 0.01 and 0.05)
GATE_MEASURES = tuple(("`pattern` " + t, "frontier_pattern", k, d, sign, False) for t, k, d, sign in (
    ("forget CE within retain KL 0.01", "forget_ce_within_retain_kl_0.01", 2, 1),
    ("forget CE within retain KL 0.05", "forget_ce_within_retain_kl_0.05", 2, 1),
    ("retain-KL ratio to `standard` at +0.5", "retain_kl_ratio_at_ce_0.5", 3, -1),
    ("precision AUROC at +0.5", "precision_auroc_at_ce_0.5", 3, 1),
    ("after-passage KL ratio to `standard` at +0.5", "spliced_kl_after_ratio_at_ce_0.5", 3, -1),
    ("after-passage KL at +0.5", "spliced_kl_after_at_ce_0.5", 3, -1))) + (
    ("`pattern` SAEBench score", "unlearning_pattern", "unlearning_score", 3, 1, False),
    ("retain rows where `pattern` clamps", "detection_pattern", "fire_rows_retain", 3, -1, False),
    ("forget tokens where `pattern` clamps", "detection_pattern", "token_recall", 3, 1, False)) + tuple(
    ("`pattern` generation: " + t, "generation_pattern", k, d, sign, False) for t, k, d, sign in (
        ("retain continuations identical to clean", "retain_identical", 2, 1),
        ("forget continuations identical to clean", "forget_identical", 2, -1),
        ("repeated 4-grams in forget continuations", "forget_rep4", 3, -1),
        ("clean model's CE of forget continuations", "forget_ce", 2, -1))) + tuple(
    ("gate: " + t, None, k, d, sign, True) for t, k, d, sign in (
        ("token AUROC", "token_auroc", 3, 1), ("spliced AUROC", "spliced_auroc", 3, 1),
        ("forget tokens firing", "fire_rate_forget", 3, 1), ("retain tokens firing", "fire_rate_retain", 4, -1),
        ("retain rows with a fire", "fire_rows_retain", 3, -1),
        ("median delay at passage start (tokens)", "delay_tokens_median", 1, -1),
        ("median tokens to stop after the passage", "stop_tokens_median", 1, -1),
        ("fire rate on the text after a passage", "fire_rate_after", 3, -1)))


GATE_NAMES = {"detection_residual": ("raw residual", "residual"), "detection_combined": ("latents + residual", "combined")}


def gate_entry(run: str) -> str:
    """The detection entry of the gate a --detector residual | combined run used (combined runs carry both)."""
    return "detection_combined" if "detection_combined" in final_info(run) else "detection_residual"


def t_gate(doc: str, *runs: str) -> list[str]:
    """Pairs of runs of the same SAEs and rows: pattern gated on SAE latents (--detector learned), then on raw
    residuals (--detector residual) or on both (--detector combined); both, and the second minus the first
    (`better` beyond two stderrs)."""
    if len(runs) % 2:
        raise ValueError(f"{doc}: table gate takes pairs of runs")
    rows = []
    for title, entry, key, d, sign, gate in GATE_MEASURES:
        if entry == "generation_pattern" and any(value(r, entry, key) is None for r in runs):
            continue  # generation rows only where every run has the stage
        cells = []
        for a, b in zip(runs[::2], runs[1::2]):
            ea, eb = ("detection_learned", gate_entry(b)) if gate else (entry, entry)
            cells += [cell(a, ea, key, d), cell(b, eb, key, d), compare_entries(b, eb, a, ea, key, sign, d)]
        rows.append([title] + cells)
    header = ["measure"]
    for a, b in zip(runs[::2], runs[1::2]):
        name, short = GATE_NAMES[gate_entry(b)]
        header += [f"SAE latents ({link(a, doc)})", f"{name} ({link(b, doc)})", f"{short} − latents"]
    return table(header, rows)


KINDS = {"control": t_control, "gate": t_gate, "generation": t_generation, "machine": t_machine, "readme": t_readme, "sae": t_sae, "frontier": t_frontier, "budget": t_budget, "detection": t_detection,
         "precision": t_precision, "strategies": t_strategies, "versus": t_versus,
         "saes": t_saes, "verdict": t_verdict, "evidence": t_evidence,
         "threshold": lambda doc, *runs: t_evidence(doc, *runs, label="row − token"),
         "cusum": lambda doc, *runs: t_evidence(doc, *runs, label="cusum − ema"),
         "clamp": lambda doc, *runs: t_evidence(doc, *runs, label="all − active", measures=CLAMP_MEASURES),
         "ramp": lambda doc, *runs: t_evidence(doc, *runs, label="ramp − hard", measures=CLAMP_MEASURES),
         "boundary": lambda doc, *runs: t_evidence(doc, *runs, label="boundary − plain fit", measures=CLAMP_MEASURES),
         "latents": lambda doc, *runs: t_evidence(doc, *runs, label="more − fewer latents", measures=CLAMP_MEASURES),
         "position": lambda doc, *runs: t_evidence(doc, *runs, label="position − token", measures=POSITION_MEASURES),
         "steer": lambda doc, *runs: t_evidence(doc, *runs, label="steer − clamp", measures=STEER_MEASURES),
         "dense": lambda doc, *runs: t_evidence(doc, *runs, label="dense steer, boundary, ramp − hard gate", measures=CLAMP_MEASURES),
         "hold": lambda doc, *runs: t_evidence(doc, *runs, label="hold − one threshold", measures=STEER_MEASURES),
         "activation": lambda doc, *runs: t_evidence(doc, *runs, label="BatchTopK − ReLU", measures=STEER_MEASURES),
         "reach": lambda doc, *runs: t_evidence(doc, *runs, label="reach 3 − every later token", measures=CLAMP_MEASURES),
         "budgets": t_budgets}


# ------------------------------------------------------------------------------------------------
# Rewriting the marked tables
# ------------------------------------------------------------------------------------------------

def render(doc: str, text: str) -> str:
    """`text` with every marked table replaced by this tool's output for it."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        out.append(lines[i])
        m = BEGIN.match(lines[i])
        i += 1
        if not m:
            continue
        kind, args = m.group(1), m.group(2).split()
        if kind not in KINDS:
            raise ValueError(f"{doc}: unknown table kind {kind!r} (known: {', '.join(KINDS)})")
        try:
            end = lines.index(END, i)
        except ValueError:
            raise ValueError(f"{doc}: table {kind} {' '.join(args)} has no `{END}` line")
        out += [""] + KINDS[kind](doc, *args) + [""]  # blank lines: the comments stay out of the table
        i = end
    return "\n".join(out)


def stale() -> dict[str, str]:
    """doc -> unified diff of its text against the regenerated tables, for every doc that differs."""
    diffs = {}
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        new = render(doc, text)
        if new != text:
            diffs[doc] = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), doc,
                                                      f"{doc} (from the JSON)"))
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report tables that differ from the JSON (exit 1)")
    args = ap.parse_args(argv)
    diffs = stale()
    if args.check:
        for d in diffs.values():
            print(d)
        return 1 if diffs else 0
    for doc in diffs:
        path = ROOT / doc
        path.write_text(render(doc, path.read_text()))
        print(f"rewrote the tables of {doc}")
    if not diffs:
        print("every table already matches the JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())

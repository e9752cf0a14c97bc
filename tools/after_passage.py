"""Where `pattern`'s after-passage KL comes from, on calibration documents: the tokens after a passage
where the detector still fires, or the passage's own change read through attention.

    python tools/after_passage.py --sae_dir run_1/seed_0 [--pattern_clamp all] [--pattern_ramp 1]
        [--pattern_edit steer] [--hold_rows 0.5] [--pattern_reach 3] [--multipliers 1,2,3,10,30,100,300,1000] [--rows 12] [--spliced 6]

It runs experiment.py's sweep for `standard` and `pattern` on calibration rows and calibration spliced
documents (tools/selection_scan.py's data: training documents held back from fitting the detector;
held-out and spliced evaluation documents are never read) and prints `pattern`'s after-passage KL at
+0.5 nats and its ratio to `standard`'s, with `pattern`'s clamp on the spliced documents

  - as it is;
  - switched off on every token after the passage (an oracle that stops at the passage's last token:
    what is left is the passage's change read through attention);
  - on every passage token and nowhere else (an oracle detector). It acts on every selected latent there (or
    steers there at full strength), the rule of --pattern_clamp all; under --pattern_clamp active the forget
    rows keep the active-latent rule, so at +0.5 this variant clamps the passage far harder than they do:
    read it with --pattern_clamp all.

Forget and retain rows are clamped as they are in every variant, so the forget-CE axis is the same.
It then prints the detector's fire rate at each of the first tokens after a passage and its evidence
above the threshold there, inside passages, further after them and at retain false alarms.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import experiment as ex  # noqa: E402
import selection_scan as ss  # noqa: E402

VARIANTS = ("as it is", "off after the passage", "the whole passage only")


def distance_after(label_NT: torch.Tensor) -> torch.Tensor:
    """(N, T) int: 1, 2, ... at the tokens after each row's last passage token, 0 elsewhere (inside, before,
    rows without a passage)."""
    T = label_NT.shape[1]
    pos = torch.arange(T)
    last = torch.where(label_NT.any(1), (label_NT * pos).amax(1), torch.full((len(label_NT),), T))
    return (pos - last.unsqueeze(1)).clamp_min(0)


def variant_where(where_BTk: torch.Tensor, label_BT: torch.Tensor, variant: str) -> torch.Tensor:
    """pattern's clamp on spliced rows under each VARIANTS entry (bool or, under a ramp, float)."""
    if variant == "as it is":
        return where_BTk
    if variant == "off after the passage":
        return where_BTk * (distance_after(label_BT) == 0).unsqueeze(-1).to(where_BTk.dtype)
    return label_BT.unsqueeze(-1).expand_as(where_BTk).to(where_BTk.dtype)


def sweep_variants(cfg, model, sae, sels, dets, d: ex.EvalData) -> dict[str, list[dict]]:
    """pattern's sweep points per variant: one plan per selection and set, the spliced plan rewritten."""
    out = {v: [] for v in VARIANTS}
    bs = ex.eval_batches(d)
    reach = {v: cfg.pattern_reach for v in VARIANTS}  # pattern's --pattern_reach in every variant
    for sel in sels:
        c = ex.make_clamp(cfg, sel, dets, "pattern", 0.0)
        plans = {n: [ex.clamp_plan(c, sae, b.resid, b.time) for b in bl] for n, bl in bs.items()}
        first, spl = 0, []
        for b, p in zip(bs["spliced"], plans["spliced"]):
            lab = d.ts_s.rows.label[first:first + len(b.resid), :p.where.shape[1]]
            first += len(b.resid)
            spl.append({v: p._replace(where=variant_where(p.where, lab, v)) for v in VARIANTS})
        for m in cfg.multipliers:
            edits = {n: [{v: ex.clamp_edit(sae, c, p, m, b.resid) for v in VARIANTS}
                         for b, p in zip(bs[n], plans[n])] for n in bs if n != "spliced"}
            edits["spliced"] = [{v: ex.clamp_edit(sae, c, pv[v], m, b.resid) for v in VARIANTS}
                                for b, pv in zip(bs["spliced"], spl)]
            for v, (meas, _) in ex.measure_edits(model, cfg.layer, d, edits, reach).items():
                out[v].append(ex.sweep_point("pattern", m, sel, meas))
    return out


def evidence_report(det, sae, d: ex.EvalData, first: int = 4):
    """The detector on the calibration spliced documents (all of them) and calibration retain rows."""
    ev_s, tm_s = ex.plain_scores(det, sae, d.spl_acts, d.spl_rows.mask)
    ev_s = ex.pool(det, ev_s, tm_s)
    ev_r, tm_r = ex.plain_scores(det, sae, d.retain.acts_held, d.retain.held.mask)
    ev_r = ex.pool(det, ev_r, tm_r)
    m, lab, dist = d.spl_rows.mask, d.spl_rows.label, distance_after(d.spl_rows.label)
    regions = {"inside": lab & m, **{f"after +{k}": (dist == k) & m for k in range(1, first + 1)},
               f"after > +{first}": (dist > first) & m}
    print(f"\ndetector (threshold {det.threshold:.3f}): fire rate, and evidence above the threshold where it fires "
          "(quartiles)")
    for name, sel in list(regions.items()) + [("retain rows", tm_r.valid)]:
        ev = ev_r[sel] if name == "retain rows" else ev_s[sel]
        fired = ev[ev >= det.threshold] - det.threshold
        q = np.quantile(fired.numpy(), [0.25, 0.5, 0.75]) if len(fired) else [float("nan")] * 3
        print(f"  {name:14s} tokens {len(ev):6d}  fire rate {float((ev >= det.threshold).float().mean()):.3f}  "
              f"excess {q[0]:5.2f} / {q[1]:5.2f} / {q[2]:5.2f}")


@torch.no_grad()
def main():
    ap = ss.calibration_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("--pattern_clamp", default="all", choices=("active", "all"), help="experiment.py's --pattern_clamp")
    ap.add_argument("--pattern_ramp", type=float, default=0.0, help="experiment.py's --pattern_ramp")
    ap.add_argument("--pattern_edit", default="clamp", choices=("clamp", "steer"), help="experiment.py's --pattern_edit")
    ap.add_argument("--hold_rows", type=float, default=0.0, help="experiment.py's --hold_rows (0: one threshold)")
    ap.add_argument("--pattern_reach", type=int, default=-1, help="experiment.py's --pattern_reach (-1: every later token)")
    ap.add_argument("--multipliers", default="1,2,3,10,30,100,300,1000", help="comma-separated clamp values")
    args = ap.parse_args()
    cfg, model, sae, d, sels, dets = ss.calibration_setup(args, pattern_edit=args.pattern_edit, hold_rows=args.hold_rows,
                                                          pattern_reach=args.pattern_reach, generate=False)
    cpu, bf16 = ex.cpu_info()
    print(f"# {args.sae_dir}: {args.rows} calibration rows per domain, {args.spliced} calibration spliced documents, "
          f"--pattern_clamp {args.pattern_clamp} --pattern_ramp {args.pattern_ramp:g} --pattern_edit "
          f"{args.pattern_edit} --hold_rows {args.hold_rows:g} --pattern_reach {args.pattern_reach}; cpu {cpu}, "
          f"native bf16 {bf16}", flush=True)
    standard, _ = ex.run_sweep(dataclasses.replace(cfg, strategies=("standard",)), model, sae, sels, dets, d, False)
    after = ex.frontier_entry(standard, standard)["means"]["spliced_kl_after_at_ce_0.5"]
    print(f"standard: after-passage KL at +0.5 {after:.4f}")
    for v, pts in sweep_variants(cfg, model, sae, sels, dets, d).items():
        m = ex.frontier_entry(pts, standard)["means"]
        f = lambda x: "n.r." if x is None else f"{x:.3f}"
        print(f"pattern, {v:24s} after-passage KL at +0.5 {f(m['spliced_kl_after_at_ce_0.5'])}  ratio to standard "
              f"{f(m['spliced_kl_after_ratio_at_ce_0.5'])}  precision {f(m['precision_auroc_at_ce_0.5'])}", flush=True)
    evidence_report(dets.gate(cfg.detector), sae, d)


if __name__ == "__main__":
    main()

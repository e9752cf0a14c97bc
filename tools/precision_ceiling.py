"""How precise can any gate be? The spliced precision measure against a gate that knows the passage.

    python tools/precision_ceiling.py --sae_dir run_1/seed_0 [--spliced_docs 12]
                                      [--forget_corpus F --retain_corpus R]
    python tools/precision_ceiling.py --sae_dir run_1/seed_0 --calibration --horizons 1,2,4,8

The precision measure (`precision_auroc` in sweep.json) ranks per-token KL inside a forget passage
against KL before and after it. Clamping inside the passage also changes the tokens after it: they
attend to the edited positions. To see how much of the after-passage KL is this leak and how much is
a gate that stays on too long, this script adds an `oracle` clamp that sets the selected latents
wherever they fire inside the passage (the true labels) and nowhere else, beside `standard`,
`pattern` and `hybrid` with the run's own selections (SAEBench's and, for the gated strategies, the
gated one of --gated_features) and detector. For every selection and
multiplier it prints, per clamp, the mean KL inside / after the passage, the fraction of
after-passage tokens it clamps, and the precision AUROC. The oracle's AUROC is the ceiling a causal
per-token gate can reach with this clamp.

With --calibration the spliced documents are built from the calibration documents (every 4th
training document, never used to fit a detector) instead of the held-out ones, and --horizons adds
`pattern` with the learned detector pooled over each H (its threshold re-set at --detector_fpr on
the calibration retain rows): the choice of the default horizon by this table reads training data
only.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment as ex  # noqa: E402

STRATEGIES = ("standard", "pattern", "hybrid")


def oracle_plan(sae, lat, b: ex.Batch, label_BT: torch.Tensor) -> ex.Plan:
    """Clamp the selected latents wherever they fire inside the passage: a gate with perfect recall
    and no delay or false fire."""
    f = sae.encode(b.resid, b.time.valid, lat, b.time.prev)
    return ex.Plan((f > 0) & (b.time.valid & label_BT.to(f.device)).unsqueeze(-1), f)


def point(kl_NT, clamped_NT, rows: ex.Rows) -> dict:
    k, c = ex.by_region(kl_NT, rows), ex.by_region(clamped_NT[:, :-1].float(), rows)
    return {"kl_inside": float(k["inside"].mean()), "kl_after": float(k["after"].mean()),
            "clamped_inside": float(c["inside"].mean()), "clamped_after": float(c["after"].mean()),
            "precision_auroc": ex.precision_auroc(k["inside"], k["outside"])}


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sae_dir", required=True, help="a run folder holding sae.safetensors, cfg.json and config.json")
    ap.add_argument("--forget_corpus", default="embedded")
    ap.add_argument("--retain_corpus", default="embedded")
    ap.add_argument("--spliced_docs", type=int, default=12)
    ap.add_argument("--calibration", action="store_true", help="spliced documents from calibration training documents")
    ap.add_argument("--horizons", default="", help="comma-separated H: pattern with the detector pooled over each")
    args = ap.parse_args()
    cfg = ex.run_config(Path(args.sae_dir), ex.Config(forget_corpus=args.forget_corpus, retain_corpus=args.retain_corpus),
                        own=("out_dir", "forget_corpus", "retain_corpus", "seeds"))
    model, tok = ex.load_model(cfg, torch.device("cpu"))
    sae = ex.load_sae(Path(args.sae_dir))
    docs = {d: ex.load_corpus(getattr(cfg, f"{d}_corpus"), d) for d in ("forget", "retain")}
    forget, retain = (ex.build_corpus(model, tok, cfg, docs[d], d, False) for d in ("forget", "retain"))
    if args.calibration:
        cal = lambda c: [c.train_docs[i] for i in sorted(set(c.train.doc[ex.calibration_rows(c.train)].tolist()))]
        spl = ex.build_spliced(cal(forget), cal(retain), args.spliced_docs, seed=0, what="calibration")
    elif cfg.forget_corpus == cfg.retain_corpus == "embedded":
        spl = ex.load_spliced(args.spliced_docs)
    else:
        spl = ex.build_spliced(forget.held_docs, retain.held_docs, args.spliced_docs, seed=0)
    rows = ex.spliced_rows(tok, spl, 2 * cfg.context_length)
    ts = ex.prepare_text(model, cfg.layer, rows, cfg.batch_rows, keep_clean=True)
    labels = [rows.label[s] for s in ex.batches(len(rows.tokens), cfg.batch_rows)]
    sp_f = ex.active_fraction(sae, forget.acts_train, forget.train.mask)
    sp_r = ex.active_fraction(sae, retain.acts_train, retain.train.mask)
    sels = ex.make_selections(cfg, sae, forget, retain, sp_f, sp_r)
    dets = ex.fit_detectors(cfg, sae, forget, retain, sp_f, sp_r)
    sels += ex.gated_selections(cfg, sae, dets, forget, retain)  # --gated_features of the run's config
    variants = {}
    for H in [float(h) for h in args.horizons.split(",") if h]:
        det = dets.learned._replace(horizon=H)
        variants[f"pattern_H{H:g}"] = ex.calibrate(det, sae, retain, cfg.detector_fpr, hold_rows=cfg.hold_rows)
    print(f"# {args.sae_dir}: {len(spl)} spliced documents ({'calibration' if args.calibration else 'held-out'}); "
          f"cpu {ex.cpu_info()[0]}", flush=True)
    for sel in sels:
        clamps = {s: ex.make_clamp(cfg, sel, dets, s, 0.0) for s in STRATEGIES if s in ex.sweeps(cfg, sel)}
        clamps |= {k: clamps["pattern"]._replace(detector=det) for k, det in variants.items()}
        plans = [{s: ex.clamp_plan(c, sae, b.resid, b.time) for s, c in clamps.items()}
                 | {"oracle": oracle_plan(sae, sel.latents, b, lab)} for b, lab in zip(ts.batches, labels)]
        clamped = {s: torch.cat([p[s].where.any(-1).cpu() for p in plans]) for s in plans[0]}
        for mult in cfg.multipliers:
            # the oracle gates pattern's own edit (a steer under --pattern_edit steer) on the passage labels
            edits = [{s: ex.clamp_edit(sae, clamps.get(s, clamps["pattern"]), p, mult, b.resid) for s, p in bp.items()}
                     for b, bp in zip(ts.batches, plans)]
            out = ex.text_stats(model, cfg.layer, ts, edits)
            for s, (_, kl) in out.items():
                r = point(kl, clamped[s], rows)
                print(f"{sel.rule:8s} threshold {sel.threshold:<6g} n {len(sel.latents):<3d} x{mult:<6g} {s:12s} "
                      + "  ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()

"""Detector design on training data only: candidate latents, window and horizon, scored on the
calibration documents (every 4th training document, never used to fit a detector).

    python tools/detector_scan.py --sae_dir run_1/seed_0 [--forget_corpus F --retain_corpus R]

For each variant it fits the learned detector (and its residual control) on the other training
documents, then reports on the calibration documents: token AUROC (forget rows vs retain rows), and
on spliced documents built from calibration documents (a forget passage inside retain text) the
passage AUROC, the passages detected and the mean / median delay at the threshold that lets 1% of
calibration retain tokens fire. Held-out documents are never read: the defaults of
--detector_latents, --detector_window and --horizon were chosen from this table.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment as ex  # noqa: E402


def train_only_corpus(model, tok, cfg, domain: str) -> ex.Corpus:
    docs = ex.load_corpus(getattr(cfg, f"{domain}_corpus"), domain)
    train_docs, _ = ex.split_docs(docs)
    rows = ex.make_rows(tok, train_docs, cfg.context_length, cfg.max_corpus_tokens, forget=domain == "forget")
    acts = ex.harvest(model, cfg.layer, rows, cfg.batch_rows)
    return ex.Corpus(train_docs, [], rows, rows, acts, acts[:0])


def calibration_spliced(model, tok, cfg, forget: ex.Corpus, retain: ex.Corpus, n: int = 40):
    cal_docs = lambda c: [c.train_docs[i] for i in sorted(set(c.train.doc[ex.calibration_rows(c.train)].tolist()))]
    spl = ex.build_spliced(cal_docs(forget), cal_docs(retain), n, seed=0, what="calibration")
    rows = ex.spliced_rows(tok, spl, 2 * cfg.context_length)
    return rows, ex.harvest(model, cfg.layer, rows, cfg.batch_rows)


def scores(det, sae, acts, mask):
    s, tm = ex.plain_scores(det, sae, acts, mask)
    return s, tm


def report(name, det, sae, forget, retain, spl_rows, spl_acts, horizons, fpr):
    cf, cr = ex.calibration_rows(forget.train), ex.calibration_rows(retain.train)
    s_f, tm_f = scores(det, sae, forget.acts_train[cf], forget.train.mask[cf])
    s_r, tm_r = scores(det, sae, retain.acts_train[cr], retain.train.mask[cr])
    s_s, tm_s = scores(det, sae, spl_acts, spl_rows.mask)
    for H in horizons:
        e_f, e_r, e_s = ex.ema(s_f, tm_f, H), ex.ema(s_r, tm_r, H), ex.ema(s_s, tm_s, H)
        thr = ex.threshold_for_fpr(e_r[tm_r.valid], fpr)
        tok_auc = ex.auroc(torch.cat([e_f[tm_f.valid], e_r[tm_r.valid]]),
                           torch.cat([torch.ones(int(tm_f.valid.sum())), torch.zeros(int(tm_r.valid.sum()))]))
        m, lab = spl_rows.mask, spl_rows.label
        fires = (e_s >= thr) & m
        delays = [ex.detection_delay(fires[i], lab[i]) for i in range(len(fires))]
        hit = [d for d in delays if d is not None]
        print(f"{name:24s} H={H:<3g} token_auroc {tok_auc:.3f}  spliced_auroc {ex.auroc(e_s[m], lab[m]):.3f}  "
              f"forget_fire {(e_f[tm_f.valid] >= thr).float().mean():.3f}  passages {len(hit) / len(delays):.3f}  "
              f"delay mean {np.mean(hit) if hit else float('nan'):5.1f} median {np.median(hit) if hit else float('nan'):5.1f}",
              flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sae_dir", required=True, help="a run folder holding sae.safetensors, cfg.json and config.json")
    ap.add_argument("--forget_corpus", default="embedded")
    ap.add_argument("--retain_corpus", default="embedded")
    ap.add_argument("--latents", default="64,256,1024", help="candidate counts to try")
    ap.add_argument("--windows", default="1,2,4,8", help="detector windows to try")
    ap.add_argument("--horizons", default="1,2,4,8,16,32")
    args = ap.parse_args()
    run_cfg = ex.read_json(Path(args.sae_dir) / "config.json", "run config")
    cfg = dataclasses.replace(ex.Config(), layer=run_cfg["layer"], context_length=run_cfg["context_length"],
                              forget_corpus=args.forget_corpus, retain_corpus=args.retain_corpus)
    model, tok = ex.load_model(cfg, torch.device("cpu"))
    sae = ex.load_sae(Path(args.sae_dir))
    forget, retain = (train_only_corpus(model, tok, cfg, d) for d in ("forget", "retain"))
    spl_rows, spl_acts = calibration_spliced(model, tok, cfg, forget, retain)
    sp_f = ex.active_fraction(sae, forget.acts_train, forget.train.mask)
    sp_r = ex.active_fraction(sae, retain.acts_train, retain.train.mask)
    horizons = [float(h) for h in args.horizons.split(",")]
    for L in [int(x) for x in args.windows.split(",")]:
        c = dataclasses.replace(cfg, detector_window=L)
        for n in [int(x) for x in args.latents.split(",")]:
            det = ex.fit_lag_detector(c, sae, ex.candidate_latents(sp_f, sp_r, n), forget, retain)
            report(f"latents {n} window {L}", det, sae, forget, retain, spl_rows, spl_acts, horizons, cfg.detector_fpr)
        det = ex.fit_lag_detector(c, sae, None, forget, retain)
        report(f"residual window {L}", det, sae, forget, retain, spl_rows, spl_acts, horizons, cfg.detector_fpr)


if __name__ == "__main__":
    main()

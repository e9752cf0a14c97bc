"""The gated selection's sizes and the detector's evidence accumulator, chosen on training data only:
the sweep and the frontier measures of `experiment.py`, run on calibration documents (every 4th
training document, never used to fit a detector) instead of held-out ones.

    python tools/selection_scan.py --sae_dir run_1/seed_0 [--forget_corpus F --retain_corpus R]
        [--gated 25@0.001,50@0.001,100@0.001] [--evidence ema:2,hmm:0.01:0.25] [--rank cover,attribution]
        [--calibrate token:0.01,row:0.05] [--hold_rows 0,0.5] [--pattern_clamp active|all] [--pattern_ramp 1]
        [--multipliers 1,3,10]

The evaluation rows are calibration rows of both domains, the spliced documents are built from
calibration documents, and the question sets are cut to a few questions (their numbers are not
read here). For each evidence accumulator (`ema:H`, `hmm:SWITCH:SCALE` or `cusum:CAP`) and each threshold rule
(--calibrate `token:FPR`, that fraction of the calibration retain tokens fire, or `row:FPR`, that
fraction of the calibration retain rows fire anywhere; set on the calibration retain rows) and each --hold_rows
(a two-threshold gate, experiment.py's flag of that name) it prints
the detector's measures (token and passage AUROC, median delay at a passage's start and tokens to
stop after it, retain fire rate per token and per row) and, for `pattern` and `dsg`, the frontier
measures with SAEBench's selections alone and with each gated selection (`N@THRESHOLD`) added: precision AUROC at +0.5, retain-KL and
after-passage-KL ratios to `standard` at +0.5, and the forget-CE increase within retain KL 0.001 /
0.005 / 0.01 / 0.05. Held-out and spliced evaluation documents are never read.

--rank says how the gated selection ranks the latents that pass its retain test: `cover` (the
harness's rule: the fraction of the forget tokens where the detector fires that a latent is active
on) and/or `attribution` (a tried alternative, not in experiment.py: the first-order rise of forget
CE when the latent is ablated where the detector fires, -sum_t f_i(t) d_i . dCE/dresid(t), on the
first --attribution_rows forget training rows that are not calibration rows).
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment as ex  # noqa: E402

BUDGETS = (0.001, 0.005, 0.01, 0.05)


def calibration_corpus(c: ex.Corpus) -> ex.Corpus:
    """The corpus with its calibration training rows in the place of the held-out rows."""
    cal = ex.calibration_rows(c.train)
    held = ex.Rows(*(t[cal] for t in c.train))
    return c._replace(held_docs=c.train_docs, held=held, acts_held=c.acts_train[cal])


def calibration_data(cfg, model, tok, rows: int, spliced: int) -> ex.EvalData:
    """prepare_data with calibration rows and calibration spliced documents; a handful of questions."""
    corpora, questions = ex.load_inputs(dataclasses.replace(cfg, max_qa=16))
    forget, retain = (calibration_corpus(ex.build_corpus(model, tok, cfg, corpora[d], d, False))
                      for d in ("forget", "retain"))
    kv = cfg.pattern_reach >= 0  # --pattern_reach re-runs read the clean keys and values
    ts_f = ex.prepare_text(model, cfg.layer, ex.head_rows(forget.held, rows), cfg.batch_rows, keep_kv=kv)
    ts_r = ex.prepare_text(model, cfg.layer, ex.head_rows(retain.held, rows), cfg.batch_rows, keep_clean=True, keep_kv=kv)
    cal_docs = lambda c: [c.train_docs[i] for i in sorted(set(c.held.doc.tolist()))]
    spl_all = ex.build_spliced(cal_docs(forget), cal_docs(retain), max(spliced, ex.DETECTION_SPLICED_DOCS), seed=0,
                               what="calibration")
    spl_rows = ex.spliced_rows(tok, spl_all, 2 * cfg.context_length)
    ts_s = ex.prepare_text(model, cfg.layer, ex.head_rows(spl_rows, spliced), cfg.batch_rows, keep_clean=True, keep_kv=kv)
    qa = {d: ex.prepare_qa(model, tok, cfg.layer, questions[d][:4], cfg.qa_scoring, cfg.batch_rows, keep_kv=kv)
          for d in questions}
    spl_acts = ex.harvest(model, cfg.layer, spl_rows, cfg.batch_rows)
    return ex.EvalData(forget, retain, ts_f, ts_r, ts_s, spl_all[:spliced], qa["forget"], qa["retain"], {},
                       spl_rows, spl_acts)


def attribution_batch(model, layer: int, sae, b: ex.Batch, fires_BT: torch.Tensor) -> torch.Tensor:
    """(F,) per latent: -sum over the positions in fires_BT of f_i(t) * d_i . dCE/dresid(t), where CE is
    the summed next-token CE of the batch: to first order, the CE rise when latent i is ablated there
    (resid(t) - f_i(t) d_i). The blocks after `layer` run from the cached clean resid with grad."""
    r = b.resid.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        h = ex.run_tail.__wrapped__(model, layer, b._replace(resid=r))  # run_tail without its no_grad
        logits = ex.logits_at(model, h[:, :-1])
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.tokens[:, 1:].flatten(), reduction="none")
        (ce * ex.scored(b.attn).flatten().to(ce.dtype)).sum().backward()
    with torch.no_grad():
        f_BTF = sae.encode(b.resid, b.time.valid, None, b.time.prev)
        dg_BTF = r.grad @ (sae.W_dec / sae.scale).T.to(r.grad.dtype)  # d_i . grad at every position
        return -(f_BTF.to(dg_BTF.dtype) * dg_BTF * fires_BT.unsqueeze(-1)).sum((0, 1))


def attribution(model, layer: int, sae, det, c: ex.Corpus, rows: int, batch: int = 8) -> torch.Tensor:
    """attribution_batch summed over the first `rows` forget training rows outside the calibration set,
    at the tokens where the detector fires."""
    keep = torch.nonzero(~ex.calibration_rows(c.train)).flatten()[:rows]
    score = torch.zeros(sae.d_sae)
    for s in ex.batches(len(keep), batch):
        idx = keep[s]
        b = ex.clean_forward(model, layer, c.train.tokens[idx], c.train.attn[idx])
        fires = ex.detector_fires(det, sae, b.resid, b.time)
        score += attribution_batch(model, layer, sae, b, fires).cpu()
    return score


def parse_evidence(spec: str, det: ex.LagDetector) -> ex.LagDetector:
    kind, *args = spec.split(":")
    if kind == "ema":
        return det._replace(evidence="ema", horizon=float(args[0]))
    if kind == "cusum":
        return det._replace(evidence="cusum", cap=float(args[0]))
    return det._replace(evidence="hmm", switch=float(args[0]), scale=float(args[1]))


def frontier_line(name: str, mine: list, standard: list) -> str:
    m = ex.frontier_entry(mine, standard)["means"]
    within = [ex.frontier_within(ex.sweep_front(mine, "retain_kl"), b) for b in BUDGETS]
    f = lambda v: "  n.r." if v is None else f"{v:6.3f}"
    return (f"{name:34s} precision {f(m['precision_auroc_at_ce_0.5'])}  kl_ratio {f(m['retain_kl_ratio_at_ce_0.5'])}  "
            f"after_ratio {f(m['spliced_kl_after_ratio_at_ce_0.5'])}  within " + " ".join(f"{v:5.2f}" for v in within))


def detector_line(name: str, det, sae, d: ex.EvalData) -> str:
    m = ex.detection_entry(lambda x, tm: ex.detector_fire_score(det, sae, x, tm), sae, d)["means"]
    return (f"{name:34s} token_auroc {m['token_auroc']:.3f}  spliced_auroc {m['spliced_auroc']:.3f}  "
            f"delay {m['delay_tokens_median']:.0f}  stop {m['stop_tokens_median']:.0f}  "
            f"retain_fire {m['fire_rate_retain']:.4f}  retain_rows {m['fire_rows_retain']:.3f}  "
            f"forget_fire {m['fire_rate_forget']:.3f}  after_fire {m['fire_rate_after']:.3f}  retain_fire_by_position "
            + " / ".join(f"{v:.4f}" for k, v in m.items() if k.startswith("fire_rate_retain_tokens_") and v is not None))


def calibration_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every calibration-document tool takes: the SAE, the corpora, the rows it reads."""
    ap.add_argument("--sae_dir", required=True, help="a run folder holding sae.safetensors, cfg.json and config.json")
    ap.add_argument("--forget_corpus", default="embedded")
    ap.add_argument("--retain_corpus", default="embedded")
    ap.add_argument("--rows", type=int, default=12, help="calibration rows per domain for CE and KL")
    ap.add_argument("--spliced", type=int, default=6, help="calibration spliced documents for the KL measures")
    ap.add_argument("--detector_boundary", type=float, default=0.0,
                    help="experiment.py's --detector_boundary (its spliced training documents come from the fitting "
                         "documents, never the calibration ones)")
    ap.add_argument("--detector", default="learned", choices=("learned", "residual", "combined"),
                    help="experiment.py's --detector: the detector pattern gates on and whose evidence is scanned")
    return ap


def calibration_setup(args, **overrides):
    """The model, the SAE of --sae_dir (its run's layer and context length), the calibration data, the
    selections and the fitted detectors. `overrides` are Config fields; --pattern_clamp, --pattern_ramp and
    --multipliers (empty: experiment.py's grid) are the caller's flags of the same names."""
    run_cfg = ex.read_json(Path(args.sae_dir) / "config.json", "run config")
    cfg = dataclasses.replace(ex.Config(), layer=run_cfg["layer"], context_length=run_cfg["context_length"],
                              forget_corpus=args.forget_corpus, retain_corpus=args.retain_corpus,
                              pattern_clamp=args.pattern_clamp, pattern_ramp=args.pattern_ramp,
                              detector_boundary=args.detector_boundary, detector=args.detector, **overrides)
    if args.multipliers:
        cfg = dataclasses.replace(cfg, multipliers=tuple(float(m) for m in args.multipliers.split(",")))
    model, tok = ex.load_model(cfg, torch.device("cpu"))
    sae = ex.load_sae(Path(args.sae_dir))
    d = calibration_data(cfg, model, tok, args.rows, args.spliced)
    sp_f = ex.active_fraction(sae, d.forget.acts_train, d.forget.train.mask)
    sp_r = ex.active_fraction(sae, d.retain.acts_train, d.retain.train.mask)
    dets = ex.fit_detectors(cfg, sae, d.forget, d.retain, sp_f, sp_r, ex.boundary_splices(cfg, model, tok, d.forget, d.retain))
    sels = ex.make_selections(cfg, sae, d.forget, d.retain, sp_f, sp_r)
    if cfg.gated_features:
        sels += ex.gated_selections(cfg, sae, dets, d.forget, d.retain)
    return cfg, model, sae, d, sels, dets


@torch.no_grad()
def main():
    ap = calibration_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("--gated", default="25@0.001,50@0.001,100@0.001", help="gated selections N@THRESHOLD")
    ap.add_argument("--evidence", default="ema:2,hmm:0.01:0.25", help="accumulators ema:H | hmm:SWITCH:SCALE | cusum:CAP")
    ap.add_argument("--calibrate", default="token:0.01", help="detector thresholds UNIT:FPR, unit token (a fraction of "
                    "the calibration retain tokens fire), row (of the calibration retain rows, any fire) or position (of the "
                    "calibration retain tokens in each position bucket)")
    ap.add_argument("--rank", default="cover", help="gated ranking(s): cover (the harness's) | attribution")
    ap.add_argument("--attribution_rows", type=int, default=64, help="forget training rows for --rank attribution")
    ap.add_argument("--pattern_clamp", default="active", choices=("active", "all"),
                    help="what pattern clamps where the detector fires (experiment.py's --pattern_clamp)")
    ap.add_argument("--pattern_ramp", type=float, default=0.0,
                    help="experiment.py's --pattern_ramp (0: a hard gate); its scale is set again at each threshold")
    ap.add_argument("--multipliers", default="", help="comma-separated clamp values (default: experiment.py's)")
    ap.add_argument("--hold_rows", default="0", help="comma-separated experiment.py --hold_rows values (0: one threshold; "
                    "others apply to token:FPR thresholds)")
    ap.add_argument("--points", action="store_true", help="also print pattern's sweep points")
    ap.add_argument("--detector_only", action="store_true", help="the detector's measures only, no sweep")
    args = ap.parse_args()
    cfg, model, sae, d, sels, dets = calibration_setup(args, gated_features=())
    print(f"# {args.sae_dir}: {args.rows} calibration rows per domain, {args.spliced} calibration spliced documents; "
          f"cpu {ex.cpu_info()[0]}, native bf16 {ex.cpu_info()[1]}", flush=True)
    base = dataclasses.replace(cfg, strategies=("standard", "dsg"))
    ref, _ = ex.run_sweep(base, model, sae, sels, dets, d, False) if not args.detector_only else ([], None)
    standard = [p for p in ref if p["strategy"] == "standard"]
    if standard:
        print(frontier_line("standard", standard, standard), flush=True)
        print(frontier_line("dsg  saebench", [p for p in ref if p["strategy"] == "dsg"], standard), flush=True)
    holds = [float(h) for h in args.hold_rows.split(",")]
    for spec, cal, hold in ((e, c, h) for e in args.evidence.split(",") for c in args.calibrate.split(",") for h in holds):
        det = parse_evidence(spec, dets.gate(cfg.detector))
        unit, fpr = cal.split(":")
        if hold and unit != "token":
            continue
        det = ex.calibrate(det, sae, d.retain, float(fpr), unit=unit, hold_rows=hold)
        det = det._replace(ramp=ex.ramp_width(det, sae, d.forget, args.pattern_ramp))
        spec_name = spec if cal == "token:0.01" else f"{spec} {cal}"  # the harness's default threshold: no suffix
        spec_name += f" hold_rows {hold:g} (hold {det.hold:.2f})" if hold else ""
        dets_v = dets._replace(**{ex.Detectors.gate_field(cfg.detector): det})
        print(detector_line(f"detector {spec_name}", det, sae, d), flush=True)
        if args.detector_only:
            continue
        pat = dataclasses.replace(cfg, strategies=("pattern",))
        mine, _ = ex.run_sweep(pat, model, sae, sels, dets_v, d, False)
        print(frontier_line(f"pattern {spec_name} saebench", mine, standard), flush=True)
        ranks = {r: rank_key(r, args, model, cfg, sae, det, d) for r in args.rank.split(",")}
        for g, rank in ((g, r) for g in args.gated.split(",") for r in ranks):
            n, thr = g.split("@")
            gcfg = dataclasses.replace(cfg, gated_features=(int(n),), gated_threshold=float(thr),
                                       strategies=("dsg", "pattern"))
            gsel = gated_by(gcfg, sae, dets_v, d, ranks[rank])
            pts, _ = ex.run_sweep(gcfg, model, sae, gsel, dets_v, d, False)
            cover = coverage(sae, gsel[0].latents, det, d, cfg.pattern_clamp == "all") if gsel else float("nan")
            name = f"{g}" + (f" {rank}" if rank != "cover" else "")
            print(frontier_line(f"pattern {spec_name} +gated {name}", mine + [p for p in pts if p["strategy"] == "pattern"],
                                standard) + f"  clamp_cover {cover:.3f}", flush=True)
            gated_pattern = [p for p in pts if p["strategy"] == "pattern"]
            print(frontier_line(f"pattern {spec_name} gated {name} alone", gated_pattern, standard), flush=True)
            if args.points:
                for p in mine + gated_pattern:
                    print(f"    {p['selection']:8s} {p['retain_threshold']:<6g} x{p['multiplier']:<6g} forget_ce "
                          f"{p['forget_ce_increase']:6.3f} retain_kl {p['retain_kl']:.4f} precision {p['precision_auroc']:.3f} "
                          f"inside {p['spliced_kl_inside']:.3f} after {p['spliced_kl_after']:.3f}", flush=True)
            # dsg's gated selection is made where this detector fires: printed once, for the first accumulator
            # at the default threshold
            if spec_name == args.evidence.split(",")[0]:
                dsg = [p for p in ref if p["strategy"] == "dsg"] + [p for p in pts if p["strategy"] == "dsg"]
                print(frontier_line(f"dsg  +gated {g}", dsg, standard), flush=True)


def rank_key(rank: str, args, model, cfg, sae, det, d: ex.EvalData) -> torch.Tensor | None:
    """None: the harness's cover ranking; else the (F,) attribution scores."""
    if rank == "cover":
        return None
    if rank != "attribution":
        raise SystemExit(f"error: --rank {rank!r}: expected cover or attribution")
    with torch.no_grad():  # main runs under no_grad; attribution_batch turns grad on where it needs it
        return attribution(model, cfg.layer, sae, det, d.forget, args.attribution_rows)


def gated_by(gcfg, sae, dets, d: ex.EvalData, key: torch.Tensor | None) -> list:
    """The gated selection ranked by cover (key None: experiment.gated_selections) or by `key`, with the
    same retain test (touch < --gated_threshold on the retain tokens where the detector fires)."""
    if key is None:
        return ex.gated_selections(gcfg, sae, dets, d.forget, d.retain)
    cnt_r, fire_r, _ = ex.gated_counts(sae, dets.gate(gcfg.detector), d.retain)
    n, thr = gcfg.gated_features[0], gcfg.gated_threshold
    lat = ex.select_gated(key, cnt_r / max(fire_r, 1), n, thr)
    return [ex.selection_levels(gcfg, sae, d.forget, d.retain, lat, thr, n, "gated")] if len(lat) else []


def coverage(sae, lat, det, d: ex.EvalData, dense: bool = False) -> float:
    """Fraction of calibration forget tokens where pattern would clamp: the detector fires and a
    selected latent is active (dense: the detector fires)."""
    c = ex.Clamp("pattern", lat, 0.0, 4, det, None, 0.0, dense)
    fire, _ = ex.over_rows(lambda x, tm: ex.rule_fire_score(c, sae, x, tm), sae, d.forget.acts_held, d.forget.held.mask)
    return float(fire[d.forget.held.mask].float().mean())


if __name__ == "__main__":
    main()

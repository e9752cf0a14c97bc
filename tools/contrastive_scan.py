"""The T-SAE contrastive weight, chosen on training data only: SAEs trained as `experiment.py` trains
them (same rows, steps and seed), one per weight, measured on the calibration rows (every 4th
training document of each domain; training text, never held-out text).

    python tools/contrastive_scan.py --weights 0,0.1,1,10 [--window 1] [--activation batchtopk] [--k 48]
        [--forget_corpus F --retain_corpus R] [--seed 0]

For each weight it prints: FVE and L0 of the whole SAE and FVE of the high-level latents decoded
alone (the Matryoshka level), the InfoNCE of the high-level codes on adjacent calibration pairs
(`experiment.info_nce`, the training loss's own form, negatives from the other rows of the same
64-row block) beside its chance level log(candidates), and the mean lag-1 autocorrelation of the
high-level and of the other latents (`experiment.temporal_consistency`). Weight 0 trains without the
T-SAE terms; its "high-level" latents are just the first --high_frac of the dictionary.
"""
import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment as ex  # noqa: E402


@torch.no_grad()
def measures(sae: ex.TemporalSAE, acts_NTD, mask_NT, n_high: int) -> dict:
    """FVE (whole and high-level alone), L0, InfoNCE of the high-level codes and its chance level, lag-1
    autocorrelation of the high-level and the other latents, on the given rows."""
    xs, xh, xhi, nce, chance, f_all = [], [], [], [], [], []
    for s in ex.batches(len(acts_NTD), 64):
        m = mask_NT[s]
        o = sae(acts_NTD[s], m)
        f_NF, x_ND = o.f[m], acts_NTD[s][m]
        xs.append(x_ND), xh.append(o.x_hat[m])
        xhi.append((f_NF[:, :n_high] @ sae.W_dec[:n_high] + sae.b_dec) / sae.scale)  # decode in input units
        cur, prev, row = ex.adjacent_pairs(m)
        hi = f_NF[:, :n_high]
        on = (hi[cur].abs().sum(-1) > 0) & (hi[prev].abs().sum(-1) > 0)
        nce.append(float(ex.info_nce(hi[cur[on]], hi[prev[on]], row[on])))
        r = row[on]  # an anchor's candidates: its positive and the pairs of the other rows
        chance.append(float(torch.log((r[:, None] != r[None, :]).sum(1).float() + 1).mean()) if len(r) else 0.0)
        f_all.append(o.f)
    x, xh_, xhi_ = torch.cat(xs), torch.cat(xh), torch.cat(xhi)
    f_BTF = torch.cat(f_all)
    hi_tc, lo_tc = (ex.temporal_consistency(f_BTF[..., sl], mask_NT) for sl in (slice(0, n_high), slice(n_high, None)))
    return {"fve": ex.frac_variance_explained(x, xh_), "fve_high": ex.frac_variance_explained(x, xhi_),
            "l0": float((f_BTF[mask_NT] > 0).sum(-1).float().mean()),
            "infonce": sum(nce) / len(nce), "chance": sum(chance) / len(chance),
            "lag1_high": hi_tc["lag1_autocorr"], "lag1_low": lo_tc["lag1_autocorr"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="0,0.1,1,10", help="comma-separated --contrastive weights to train")
    args, rest = ap.parse_known_args(argv)
    try:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ex.UsageError(f"--weights {args.weights}: expected comma-separated numbers")
        if any(w < 0 for w in weights):
            raise ex.UsageError("--weights must be >= 0")
        cfg = ex.parse_config(rest + ["--out_dir", tempfile.mkdtemp(prefix="contrastive_scan_")])
        device = ex.pick_device(cfg)
        model, tok = ex.load_model(cfg, device)
        corpora, _ = ex.load_inputs(cfg)
    except ex.UsageError as e:
        print(f"contrastive_scan.py: error: {e}", file=sys.stderr)
        return 2
    cs = [ex.build_corpus(model, tok, cfg, corpora[d], d, False) for d in ("forget", "retain")]
    acts, mask = torch.cat([c.acts_train for c in cs]), torch.cat([c.train.mask for c in cs])
    cal = torch.cat([ex.calibration_rows(c.train) for c in cs])
    if not cal.any():
        print("contrastive_scan.py: error: no calibration rows (every 4th training document): the corpora "
              "have fewer than 4 training documents within --max_corpus_tokens", file=sys.stderr)
        return 2
    n_high = ex.high_latents(dataclasses.replace(cfg, contrastive=1.0))  # the level's size with the T-SAE terms on
    print(f"w={cfg.window} {cfg.activation} k={cfg.k} seed={cfg.seed}: {int(mask.sum())} training tokens, "
          f"{int(mask[cal].sum())} of them in calibration rows; high-level latents: the first {n_high}")
    print("weight | FVE | FVE high-level alone | L0 | InfoNCE high (chance) | lag-1 autocorr high / rest")
    for w in weights:
        c = dataclasses.replace(cfg, contrastive=w)
        sae = ex.train_sae(c, acts, mask, device, Path(cfg.out_dir)).float().eval()
        r = measures(sae, acts[cal].to(device), mask[cal].to(device), n_high)
        print(f"{w:g} | {r['fve']:.3f} | {r['fve_high']:.3f} | {r['l0']:.1f} | {r['infonce']:.2f} ({r['chance']:.2f}) | "
              f"{r['lag1_high']:.3f} / {r['lag1_low']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the temporal SAE's "dead" latents come from: per-latent firing rates of an SAE trained on the
default run's activations, counted on the evaluation rows, on all held-out rows and on the training rows.

    python tools/latent_rates.py --window 4                  # the default run's SAE
    python tools/latent_rates.py --window 1                  # the plain-SAE baseline
    python tools/latent_rates.py --window 4 --pos_std 0.1    # position embeddings initialised at std 0.1
    python tools/latent_rates.py --window 4 --freeze W_q,W_k # window parameters kept at their init

Trains with `train_sae` at the default settings (other budgets with --l1_coeff / --train_tokens), then
prints L0 and FVE on the evaluation rows (the first `--eval_rows` held-out rows per domain), the
fraction of latents that never fire on the evaluation rows, on all held-out rows (`dead_frac` in
final_info.json) and on the training rows, the
fraction firing on under 0.1% of training tokens, the dead fractions a Poisson model predicts for the
evaluation and held-out rows from the training rates, and for w > 1 the context term's share of the pre-activation
variance (ctx W_ctx against (x - b_dec) W_enc). The harvested activations are cached in --cache.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment as ex  # noqa: E402

DOMAINS = ("forget", "retain")


def harvested(cfg: ex.Config, cache: Path) -> dict:
    """{domain: {"train": (acts, mask), "held": (acts, mask)}}, cached as safetensors."""
    if not cache.exists():
        model, tok = ex.load_model(cfg, torch.device("cpu"))
        corpora, _ = ex.load_inputs(cfg)
        flat = {}
        for dom in DOMAINS:
            c = ex.build_corpus(model, tok, cfg, corpora[dom], dom, False)
            flat.update({f"{dom}.train.acts": c.acts_train, f"{dom}.train.mask": c.train.mask,
                         f"{dom}.held.acts": c.acts_held, f"{dom}.held.mask": c.held.mask})
        save_file({k: v.contiguous() for k, v in flat.items()}, str(cache))
    flat = load_file(str(cache))
    return {dom: {part: (flat[f"{dom}.{part}.acts"], flat[f"{dom}.{part}.mask"]) for part in ("train", "held")}
            for dom in DOMAINS}


@torch.no_grad()
def stats(sae, parts: list) -> dict:
    """Per-latent fire counts, tokens, FVE, and the variances of the encoder's two terms."""
    fired, xs, xhs, var_enc, var_ctx = torch.zeros(sae.d_sae), [], [], 0.0, 0.0
    for acts, mask in parts:
        for s in range(0, len(acts), 64):
            x, m = acts[s:s + 64], mask[s:s + 64]
            out = sae(x, m)
            fired += (out.f[m] > 0).sum(0)
            xs.append(x[m])
            xhs.append(out.x_hat[m])
            if sae.window > 1:
                xc = x * sae.scale - sae.b_dec
                var_enc += (xc @ sae.W_enc)[m].var(0).sum().item() * int(m.sum())
                var_ctx += (sae.window_context(xc, m) @ sae.W_ctx)[m].var(0).sum().item() * int(m.sum())
    x, x_hat = torch.cat(xs), torch.cat(xhs)
    return {"fired": fired, "tokens": len(x), "fve": ex.frac_variance_explained(x, x_hat),
            "ctx_share": var_ctx / (var_enc + var_ctx) if sae.window > 1 else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--l1_coeff", type=float, default=ex.Config().l1_coeff)
    ap.add_argument("--train_tokens", type=int, default=ex.Config().train_tokens)
    ap.add_argument("--pos_std", type=float, default=1.0, help="std of the position embeddings' init (class: 1.0)")
    ap.add_argument("--w_ctx_init", type=float, default=0.1, help="W_ctx init = this * W_dec^T (class: 0.1)")
    ap.add_argument("--freeze", default="", help="comma-separated window parameters kept at their init")
    ap.add_argument("--cache", default="/tmp/latent_rates_acts.safetensors", help="harvested activations, reused if present")
    args = ap.parse_args()
    cfg = ex.Config(window=args.window, l1_coeff=args.l1_coeff, train_tokens=args.train_tokens, out_dir="unused")
    data = harvested(cfg, Path(args.cache))

    init = ex.TemporalSAE.reset_parameters

    @torch.no_grad()
    def reset(sae):  # the class's init, then this run's changes to the window parameters
        init(sae)
        if sae.window > 1:
            sae.pos.mul_(args.pos_std)
            sae.W_ctx.copy_(args.w_ctx_init * sae.W_dec.T)
            for name in filter(None, args.freeze.split(",")):
                getattr(sae, name).requires_grad_(False)
    ex.TemporalSAE.reset_parameters = reset

    acts = torch.cat([data[d]["train"][0] for d in DOMAINS])
    mask = torch.cat([data[d]["train"][1] for d in DOMAINS])
    with tempfile.TemporaryDirectory() as d:
        sae = ex.train_sae(cfg, acts, mask, torch.device("cpu"), Path(d))
    n = cfg.eval_rows  # the sweep's evaluation rows: the first held-out rows of each domain
    ev = stats(sae, [(a[:n], m[:n]) for d in DOMAINS for a, m in [data[d]["held"]]])
    held = stats(sae, [data[d]["held"] for d in DOMAINS])
    train = stats(sae, [(acts, mask)])
    rate = train["fired"] / train["tokens"]
    print(json.dumps({
        "window": args.window, "l1_coeff": args.l1_coeff, "pos_std": args.pos_std, "w_ctx_init": args.w_ctx_init,
        "freeze": args.freeze, "tokens": {k: s["tokens"] for k, s in (("eval", ev), ("held", held), ("train", train))},
        "l0_eval": round(ev["fired"].sum().item() / ev["tokens"], 1), "fve_eval": round(ev["fve"], 4),
        "dead_eval": round((ev["fired"] == 0).float().mean().item(), 4),
        "dead_held": round((held["fired"] == 0).float().mean().item(), 4),
        "dead_train": round((train["fired"] == 0).float().mean().item(), 4),
        "rare_train_below_0.1%": round((rate < 1e-3).float().mean().item(), 4),
        "poisson_dead_eval_from_train_rates": round(torch.exp(-rate * ev["tokens"]).mean().item(), 4),
        "poisson_dead_held_from_train_rates": round(torch.exp(-rate * held["tokens"]).mean().item(), 4),
        "median_train_rate": float(rate.median()),
        "ctx_share_of_pre_variance": None if held["ctx_share"] is None else round(held["ctx_share"], 3)}))


if __name__ == "__main__":
    main()

"""Does another kind of edit loop less at matched forgetting? Issue 28's loop target (repeated-4-gram
rate of guarded forget continuations at most +0.10 over clean) is missed by every guard, and
tools/loop_source.py found that the loops go with the forgetting wherever the edit acts. This tool
keeps where a guard edits and changes what the edit is.

    python tools/edit_kind.py --run_dir <seed folder with sae.safetensors> [--strategies standard,pattern] \\
        [--kinds clamp,normclamp,project,meanproj]

Kinds, each applied where the guard clamps (a ramp's fraction scales it), at strength s:

  - clamp: the harness's edit (SAEBench's): the selected latents set to -s, error term kept;
  - normclamp: clamp, then the edited residual rescaled to its clean norm (is it the norm that loops?);
  - project: the residual's component in the span of the selected decoder directions removed s times
    (s = 1: removed; directional ablation);
  - meanproj: the same for the residual minus the calibration retain mean (s = 1: that component set to
    the retain mean's);
  - randproj (a control, not in the default list): project's removal in a random span of the same
    dimension (fixed seed): does any edit that forgets as much at the same places loop as much?

Calibration documents only (every 4th training document, the rows the detector's threshold is set on;
never the held-out ones the committed generation figures use). For each strategy's guard (load_guard:
its sweep point at forget CE +1.0) and kind, the strength is bisected geometrically to the least that
reaches forget CE +1.0 on 24 calibration forget rows (the generation stage's level), then it prints
the retain KL on 24 calibration retain rows and, for greedy continuations of 18 calibration forget
prompts (the stage's lengths), the fraction changed, the repeated-4-gram excess over clean, the
learned detector's fire rate on them and the clean model's CE of them, as tools/loop_source.py does.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment as ex  # noqa: E402
from loop_source import continuation_text, loop_excess, one_line_errors, repeat_rate  # noqa: E402

KINDS = ("clamp", "normclamp", "project", "meanproj")
CONTROLS = ("randproj",)
LEVEL = ex.GUARD_LEVEL


def span(kind: str, sae, latents) -> torch.Tensor | None:
    """(D, k) orthonormal basis of the span a projecting kind removes (None for the clamps): the selected
    latents' decoder directions, or for randproj a random span of the same size (fixed seed). Made once
    per guard, not at every position."""
    if kind in ("clamp", "normclamp"):
        return None
    if kind not in ("project", "meanproj", "randproj"):
        raise ex.UsageError(f"unknown kind {kind!r}: one of {', '.join(KINDS + CONTROLS)}")
    span_DK = sae.W_dec[latents].T
    if kind == "randproj":
        span_DK = torch.randn(span_DK.shape, generator=torch.Generator().manual_seed(0)).to(span_DK)
    return torch.linalg.qr(span_DK)[0]


def edit(kind: str, sae, latents, where, f, s: float, x, mu=None, Q=None):
    """x (..., D) with one kind of edit at strength s where `where` (..., k: bool, or a ramp's float)
    says the guard clamps; f (..., k) the clean selected latents; mu (D,) the retain mean (meanproj);
    Q the kind's span (span(); made here when not given)."""
    if kind in ("clamp", "normclamp"):
        y = ex.apply_plan(sae, latents, ex.Plan(where, f), s, x)
        if kind == "clamp":
            return y
        edited = (where.float().amax(-1, keepdim=True) > 0)
        return torch.where(edited, y * x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True).clamp_min(1e-6), y)
    Q = (span(kind, sae, latents) if Q is None else Q).to(x)
    base = x - mu.to(x) if kind == "meanproj" else x
    u = where.float().amax(-1, keepdim=True).to(x.dtype)  # the guard's fraction at the position (0 or 1 without a ramp)
    return x - s * u * ((base @ Q) @ Q.T)


class KindGuard(ex.Guard):
    """A guard whose edit is `kind` at its clamp's multiplier (the strength); the state is the guard's."""

    def __init__(self, g: ex.Guard, kind: str, strength: float, mu=None):
        super().__init__(g.sae, g.layer, g.clamp._replace(multiplier=strength), g.point)
        self.kind, self.mu, self.Q = kind, mu, span(kind, g.sae, g.clamp.latents)

    def apply(self, sae, x_BD, where, f_sel):
        return edit(self.kind, sae, self.clamp.latents, where, f_sel, self.clamp.multiplier, x_BD, self.mu, self.Q)


def teacher_forced(g: ex.Guard, kind: str, strength: float, mu=None) -> ex.Intervention:
    """The same edit on whole rows (clamp_fn's, with another kind of edit)."""
    c, Q = g.clamp._replace(multiplier=strength), span(kind, g.sae, g.clamp.latents)

    def fn(resid_BTD, tm):
        p = ex.clamp_plan(c, g.sae, resid_BTD, tm)
        return edit(kind, g.sae, c.latents, p.where, p.f, strength, resid_BTD, mu, Q)
    return fn


def least_strength(forget_ce, start: float, steps: int = 7, grow: int = 6) -> tuple[float, float] | None:
    """(least strength found that reaches LEVEL, its forget-CE increase): from `start`, x3 up until the
    level is reached (at most `grow` times), then `steps` geometric bisections (down from the first,
    by a third, where `start` already reaches it). None if it is never reached."""
    lo, hi, got = 0.0, start, forget_ce(start)
    for _ in range(grow):
        if got >= LEVEL:
            break
        lo, hi = hi, hi * 3
        got = forget_ce(hi)
    return ex.least_reaching(forget_ce, lo, hi, got, steps, LEVEL, down=3) if got >= LEVEL else None


HELDOUT = (("forget CE +", "forget_ce_increase", 2), ("retain KL", "retain_kl", 4), ("precision", "precision_auroc", 3),
           ("after-passage KL", "spliced_kl_after", 4), ("forget acc", "forget_acc", 3), ("retain acc", "retain_acc", 3))


def heldout_line(m: dict) -> str:
    """The sweep's measures of one point (measures()' {name: (mean, stderr)}) that the choice of edit turns on."""
    return "  ".join(f"{t}{'' if t.endswith('+') else ' '}{m[k][0]:.{d}f}" for t, k, d in HELDOUT)


def calibration(tok, cfg, docs, forget: bool) -> ex.Rows:
    rows = ex.make_rows(tok, ex.split_docs(docs)[0], cfg.context_length, cfg.max_corpus_tokens, forget=forget)
    keep = ex.calibration_rows(rows)
    return ex.Rows(*(t[keep] for t in rows))


@torch.no_grad()
def run(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run_dir", required=True, help="a seed folder holding sae.safetensors, guard.json, sweep.json")
    ap.add_argument("--strategies", default="standard,pattern", help="causal strategies, comma-separated")
    ap.add_argument("--kinds", default=",".join(KINDS), help="kinds of edit, comma-separated")
    ap.add_argument("--rows", type=int, default=24, help="calibration rows per domain for forget CE and retain KL")
    ap.add_argument("--prompts", type=int, default=18, help="calibration forget prompts")
    ap.add_argument("--heldout", action="store_true",
                    help="also measure each kind, at the strength found on calibration rows, on the run's own "
                         "evaluation data as the sweep measures a point: held-out forget CE and retain KL, "
                         "precision AUROC and after-passage KL on the spliced documents, question accuracy")
    args = ap.parse_args(argv)
    kinds = args.kinds.split(",")
    if bad := [k for k in kinds if k not in KINDS + CONTROLS]:
        raise ex.UsageError(f"unknown kind {bad[0]!r}: one of {', '.join(KINDS + CONTROLS)}")
    folder = Path(args.run_dir)
    guards = {s: ex.load_guard(folder, s) for s in args.strategies.split(",")}
    cfg = ex.run_config(folder, ex.Config(), own=("out_dir", "seeds", "generate_from", "sae_path", "overwrite"))
    model, tok = ex.load_model(cfg, torch.device("cpu"))
    corpora, questions = ex.load_inputs(cfg)
    cf, cr = calibration(tok, cfg, corpora["forget"], True), calibration(tok, cfg, corpora["retain"], False)
    pr = ex.make_prompts(cf, args.prompts, cfg.prompt_tokens, cfg.generate_tokens)
    if pr is None:
        raise ex.UsageError(f"{folder}: no calibration forget row is long enough for a prompt and a continuation")
    lf, lr = (ex.Rows(*(t[:args.rows] for t in r)) for r in (cf, cr))
    d = ex.EvalData(**{f: None for f in ex.EvalData._fields} | {
        "ts_f": ex.prepare_text(model, cfg.layer, lf, cfg.batch_rows),
        "ts_r": ex.prepare_text(model, cfg.layer, lr, cfg.batch_rows)})
    mu = ex.harvest(model, cfg.layer, lr, cfg.batch_rows)[lr.mask].mean(0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else ex.bos_id(tok)
    det, sae = ex.run_detector(folder), next(iter(guards.values())).sae
    full = ex.prepare_data(cfg, model, tok, corpora, questions, ex.Stages(), False) if args.heldout else None
    clean, _ = ex.greedy(model, pr, cfg.generate_tokens, pad)
    ps = ex.prompt_state(model, cfg.layer, pr)
    print(f"# {folder}: calibration documents, {len(pr.ids)} forget prompts, {cfg.generate_tokens} tokens, "
          f"level +{LEVEL}; cpu {ex.cpu_info()[0]}, native bf16 {ex.cpu_info()[1]}", flush=True)
    stats = lambda out: continuation_text(model, cfg.layer, sae, det, pr, ps, out)
    print(f"clean: repeated-4-gram rate {repeat_rate(clean):.3f}  {stats(clean)}", flush=True)
    for s, g in guards.items():
        for kind in kinds:
            at = lambda m: teacher_forced(g, kind, m, mu)
            found = least_strength(lambda m: ex.level_at(model, cfg.layer, at(m), d, retain=False)[0],
                                   g.clamp.multiplier if kind.endswith("clamp") else 1.0)
            if found is None:
                print(f"{s:10s} {kind:9s} never reaches +{LEVEL}", flush=True)
                continue
            m, _ = found
            forget, kl = ex.level_at(model, cfg.layer, at(m), d)
            out, _ = ex.greedy(model, pr, cfg.generate_tokens, pad, KindGuard(g, kind, m, mu))
            changed, excess = loop_excess(out, clean)
            print(f"{s:10s} {kind:9s} x{m:<8.3g} forget +{forget:.2f}  retain KL {kl:.4f}  changed {changed:.2f}  "
                  f"4-gram excess {excess:+.3f}  {stats(out)}", flush=True)
            if full is not None:
                print(f"{'':20s} held out: {heldout_line(ex.point_measures(model, cfg.layer, at(m), full)[0])}", flush=True)


def main(argv=None) -> int:
    return one_line_errors(run, argv)


if __name__ == "__main__":
    sys.exit(main())

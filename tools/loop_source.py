"""Where a guard's loops come from while the model writes: the clamp on the prompt, or the clamp on the
tokens the model writes.

    python tools/loop_source.py --run_dir run_1/clamp_ramp/seed_0 [--strategies standard,pattern] [--prompts 18]

The run folder must hold its SAE (sae.safetensors) and guard state, as `--generate_from` needs. For
each strategy it takes the guard at the multiplier the generation stage used (the refined one recorded
in final_info.json, else the sweep point's) and writes greedy continuations of the held-out forget
prompts (the generation stage's forget set, alone in its batch) with the guard's edit kept

  - everywhere (the generation stage's guard);
  - on the prompt only (the call that reads the prompt; every written token's residual left clean);
  - on the written tokens only (the prompt read clean; the guard's state still follows it).

It prints, per variant, the fraction of continuations that differ from the clean one, the
repeated-4-gram rate (experiment.repeated_ngram_rate) minus the clean continuations' (issue 28's loop
target is at most +0.10 over clean), and, as the generation stage measures them, the learned
detector's fire rate on the continuation (how much forget-domain text it still writes) and the clean
model's CE of it.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment as ex  # noqa: E402

PHASES = ("everywhere", "prompt only", "written only")


class PhaseGuard(ex.Guard):
    """A guard whose edit is kept on one phase of generate(): the first call of a sequence (past == 0)
    reads the prompt, every later call one written token. The state is updated on every call alike."""

    def __init__(self, g: ex.Guard, phase: str):
        super().__init__(g.sae, g.layer, g.clamp, g.point)
        self.phase = phase

    def edit(self, sae, resid_BTD, mask, past: int):
        out = super().edit(sae, resid_BTD, mask, past)
        if self.phase == "everywhere" or (past == 0) == (self.phase == "prompt only"):
            return out
        return resid_BTD


def guard_as_generated(folder: Path, strategy: str) -> ex.Guard:
    """load_guard's guard, at the multiplier the generation stage recorded for it (refined or not)."""
    g = ex.load_guard(folder, strategy)
    info = ex.read_json(folder / "final_info.json", "results")
    m = info.get(f"generation_{strategy}", {}).get("means", {}).get("point_multiplier")
    return g if m is None else ex.Guard(g.sae, g.layer, g.clamp._replace(multiplier=float(m)), dict(g.point, multiplier=m))


def repeat_rate(out_NG: torch.Tensor) -> float:
    """Mean repeated-4-gram rate of N continuations."""
    return float(np.mean([ex.repeated_ngram_rate(r) for r in out_NG]))


def loop_excess(out_NG: torch.Tensor, clean_NG: torch.Tensor) -> tuple[float, float]:
    """(fraction of continuations that differ from clean, mean repeated-4-gram rate minus clean's)."""
    return float((out_NG != clean_NG).any(1).float().mean()), repeat_rate(out_NG) - repeat_rate(clean_NG)


def continuation_text(model, layer: int, sae, det, pr, ps, out_NG: torch.Tensor) -> str:
    """The generation stage's two measures of continuations, as printed: the learned detector's fire rate on
    them (how much forget-domain text is still written) and the clean model's CE of them."""
    st = ex.continuation_stats(model, layer, sae, det, pr, ps, out_NG)
    return f"detector fire {st['fires'].float().mean():.2f}  clean CE {st['ce'].mean():.2f}"


@torch.no_grad()
def run(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run_dir", required=True, help="a seed folder holding sae.safetensors, guard.json, final_info.json")
    ap.add_argument("--strategies", default="standard,pattern", help="causal strategies, comma-separated")
    ap.add_argument("--prompts", type=int, default=18, help="held-out forget prompts")
    args = ap.parse_args(argv)
    folder = Path(args.run_dir)
    # the run's own data, layer and generation lengths
    cfg = ex.run_config(folder, ex.Config(), own=("out_dir", "seeds", "generate_from", "sae_path", "overwrite"))
    model, tok = ex.load_model(cfg, torch.device("cpu"))
    corpora, _ = ex.load_inputs(cfg)
    held = ex.make_rows(tok, ex.split_docs(corpora["forget"])[1], cfg.context_length, cfg.max_corpus_tokens, forget=True)
    pr = ex.make_prompts(held, args.prompts, cfg.prompt_tokens, cfg.generate_tokens)  # the stage's forget set
    if pr is None:
        raise ex.UsageError(f"{folder}: no held-out forget row is long enough for a prompt and a continuation")
    pad = tok.pad_token_id if tok.pad_token_id is not None else ex.bos_id(tok)
    guards = {s: guard_as_generated(folder, s) for s in args.strategies.split(",")}
    det = ex.run_detector(folder)
    clean, _ = ex.greedy(model, pr, cfg.generate_tokens, pad)
    ps = ex.prompt_state(model, cfg.layer, pr)

    stats = lambda out: continuation_text(model, cfg.layer, next(iter(guards.values())).sae, det, pr, ps, out)
    print(f"# {folder}: {len(pr.ids)} forget prompts, {cfg.generate_tokens} tokens; cpu {ex.cpu_info()[0]}, "
          f"native bf16 {ex.cpu_info()[1]}", flush=True)
    print(f"{'clean':10s} {'':9s} {'':18s} {'':31s} {stats(clean)}", flush=True)
    for s, g in guards.items():
        for phase in PHASES:
            out, _ = ex.greedy(model, pr, cfg.generate_tokens, pad, PhaseGuard(g, phase))
            changed, excess = loop_excess(out, clean)
            print(f"{s:10s} x{g.clamp.multiplier:<8.3g} edit {phase:13s} changed {changed:.2f}  4-gram excess {excess:+.3f}  "
                  f"{stats(out)}", flush=True)


def one_line_errors(run, argv=None) -> int:
    """A tool's exit status: run(argv); bad input (UsageError) is one line on stderr and status 1."""
    try:
        run(argv)
    except ex.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    return one_line_errors(run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Speed and memory benchmarks. Each figure is printed with the configuration it used.

    python bench.py                  # all figures: 1-3 took 5.6 minutes on the 2-core AMD EPYC, plus a default run
    python bench.py --skip_e2e       # without the end-to-end run of experiment.py (figures 4 and 5)
    python bench.py --bf16_emulated 512   # figure 2 only, under bf16 autocast even where bf16 is emulated
    pip install -r requirements-bench.txt   # optional: the SAELens and dictionary_learning peers

1. harvesting: tokens/s stopping after block `layer` vs the full forward on the same batch;
   target >= (n_blocks / (layer + 1)) * 0.7 times the full forward.
2. SAE training step: tokens/s of ours (window 1 and 4) vs SAELens' standard ReLU training SAE and
   dictionary_learning's StandardTrainer.update on the same activations, batch and threads, each
   precision like for like: all in fp32, then all under bf16 autocast (where the hardware has no
   native bf16, at the default size only, on the same emulated kernels: ratios only). Steps are
   timed in interleaved rounds (medians). Ours runs at the L0 of the committed runs (its backward
   is sparse) and at init (dense); targets w=1 >= 1.2x and
   w=4 >= 0.8x the faster peer. GFLOP/s (dense-equivalent) vs a plain matmul of the same shape.
   2b: our step's sparse vs dense backward across densities (SPARSE_MAX_DENSITY's crossover).
3. sweep cost: seconds per sweep point with the cached tail vs full hooked forwards;
   target >= 90% of the ideal n_blocks / (n_blocks - layer - 1).
4. end to end: wall time and stages of the default `python experiment.py`; target <= 10 min.
5. memory: peak resident memory of that run; target <= 4 GiB.
6. guard: generated tokens/s with the KV cache, clean vs under a `pattern` guard at the default sizes,
   batch 1 and 8; target overhead <= 20% per generated token.
Time nothing while another torch job runs: on 2 cores a second job halves every figure.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import experiment as ex

ROOT = Path(__file__).resolve().parent
EMULATED_BF16 = "bf16 autocast (EMULATED: ratios only, rates mean nothing)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 3) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_harvest(model, tok, cfg, device):
    docs = ex.split_docs(ex.load_corpus("embedded", "forget"))[0]
    rows = ex.head_rows(ex.make_rows(tok, docs, cfg.context_length, 10**9, forget=True), cfg.batch_rows)
    n_tok = int(rows.attn.sum())
    n_blocks = len(ex.blocks_of(model))
    ids, attn = rows.tokens.to(device), rows.attn.long().to(device)
    with torch.no_grad():
        t_harvest = timed(lambda: ex.harvest(model, cfg.layer, rows, cfg.batch_rows), device)
        t_full = timed(lambda: model(input_ids=ids, attention_mask=attn, use_cache=False), device)
    target = n_blocks / (cfg.layer + 1) * 0.7
    print(f"\n[1] harvesting  batch {tuple(rows.tokens.shape)}, layer {cfg.layer} of {n_blocks}, {model.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"    harvest (stop after block {cfg.layer}): {n_tok / t_harvest:10.0f} tokens/s")
    print(f"    full forward (all blocks + LM head):   {n_tok / t_full:10.0f} tokens/s")
    print(f"    speed-up {t_full / t_harvest:.2f}x   target >= {target:.2f}x   "
          f"{'MET' if t_full / t_harvest >= target else 'NOT MET'}")
    return ex.harvest(model, cfg.layer, ex.head_rows(ex.make_rows(tok, docs, cfg.context_length, 10**9, forget=True), 48),
                      cfg.batch_rows), rows


def matmul_gflops(n, d, f, dtype, device, repeats: int = 5) -> float:
    """A plain (n x d) @ (d x f) as nn.Linear does it (weight stored f x d); bf16 as the steps meet it,
    fp32 tensors under torch.autocast. On a CPU without native bf16 the layout decides: this one ran at
    15-18 GFLOP/s, `a @ b` with b stored d x f at 1.2 (2-core EPYC)."""
    a, w = torch.randn(n, d, device=device), torch.randn(f, d, device=device)
    bf16 = dtype == torch.bfloat16

    def mm():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return torch.nn.functional.linear(a, w)
    t = timed(mm, device, repeats=repeats)
    return 2 * n * d * f / t / 1e9


def interleaved(steps: dict, device, rounds: int) -> dict:
    """Median seconds per call of each step, timed in turn round after round, so a background job
    slows every step alike instead of whichever happened to run beside it."""
    for fn in steps.values():
        fn()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def our_sae(x_BTD, m_BT, window: int, d_sae: int, device, density: float | None):
    """A fresh SAE on these rows, input scale and b_dec set as train_sae sets them; with `density`,
    b_enc shifted so that this fraction of (token, latent) pairs fires, as after training."""
    sae = ex.TemporalSAE(x_BTD.shape[-1], d_sae, window, ex.Config().d_head).to(device)
    with torch.no_grad():
        x = x_BTD[m_BT]
        sae.scale.fill_((sae.d_in / x.pow(2).sum(-1).mean()).sqrt().item())
        sae.b_dec.copy_(x.mean(0) * sae.scale)
        if density is not None:
            pre = sae.pre_acts(x_BTD, m_BT)[m_BT].flatten()
            sae.b_enc.sub_(pre.kthvalue(max(1, round((1 - density) * len(pre)))).values)
    return sae


def our_step(acts, mask, window, d_sae, batch_tokens, autocast, device, density=None, max_density=None):
    """One train_step of ours on whole rows; `max_density` forces the step's sparse (1) or dense (0) backward."""
    rows = max(1, round(batch_tokens / mask.sum(1).float().mean().item()))
    x, m = acts[:rows].to(device), mask[:rows].to(device)
    sae = our_sae(x, m, window, d_sae, device, density)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-6, fused=True)  # tiny lr: the sparsity stays where it was set

    def step():
        saved = ex.SPARSE_MAX_DENSITY
        ex.SPARSE_MAX_DENSITY = saved if max_density is None else max_density
        try:
            step.l0 = ex.train_step(sae, opt, x, m, 1.0, 1e-6, autocast)["l0"]
        finally:
            ex.SPARSE_MAX_DENSITY = saved
    step.tokens = int(m.sum())
    return step


def plain_step(acts_ND, d_sae, device, autocast: bool):
    """A hand-written standard ReLU SAE step, all dense: the floor any library should reach."""
    d = acts_ND.shape[1]
    W_enc = torch.randn(d, d_sae, device=device, requires_grad=True)
    W_dec = torch.randn(d_sae, d, device=device, requires_grad=True)
    b_enc = torch.zeros(d_sae, device=device, requires_grad=True)
    b_dec = torch.zeros(d, device=device, requires_grad=True)
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=1e-6)
    x = acts_ND.to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            f = torch.relu((x - b_dec) @ W_enc + b_enc)
            loss = (f @ W_dec + b_dec - x).pow(2).sum(-1).mean() + (f * W_dec.norm(dim=1)).sum(-1).mean()
        opt.zero_grad()
        loss.float().backward()
        opt.step()
    return step


def saelens_step(acts_ND, d_sae, device, autocast: bool):
    """SAELens' standard ReLU training SAE through its trainer's public `step` (any tensor iterator
    works); bf16 through the trainer's own `autocast` option (forward under torch.autocast)."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer
    d = acts_ND.shape[1]
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=d_sae, l1_coefficient=1.0, device=str(device)))
    x = acts_ND.to(device)
    trainer_cfg = SAETrainerConfig(total_training_samples=len(x) * 1000, train_batch_size_samples=len(x), lr=1e-6,
                                   lr_end=1e-7, device=str(device), logger=LoggingConfig(log_to_wandb=False),
                                   autocast=autocast)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(lambda: x, None))

    def step():
        trainer.step(x)
        trainer.n_training_steps += 1
    return step


def dictionary_learning_step(acts_ND, d_sae, device, autocast: bool):
    """dictionary_learning's StandardTrainer.update; it has no autocast option, so bf16 wraps the
    whole update (forward, backward and the optimiser step) in torch.autocast."""
    from dictionary_learning.trainers.standard import StandardTrainer
    d = acts_ND.shape[1]
    trainer = StandardTrainer(steps=10_000, activation_dim=d, dict_size=d_sae, layer=0, lm_name="bench",
                              lr=1e-6, l1_penalty=1.0, warmup_steps=1, sparsity_warmup_steps=1, device=str(device))
    x = acts_ND.to(device)
    state = {"step": 0}

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            trainer.update(state["step"], x)
        state["step"] += 1
    return step


PEERS = (("SAELens StandardTrainingSAE", saelens_step), ("dictionary_learning StandardTrainer", dictionary_learning_step))
TARGETS = {1: 1.2, 4: 0.8}  # ours / the faster peer


def committed_l0(window: int) -> float:
    """Held-out L0 of the committed default-size run with this window (what a trained SAE fires)."""
    run = ROOT / {1: "run_0", 4: "run_1"}[window] / "final_info.json"
    return json.loads(run.read_text())["sae"]["means"]["l0"] if run.exists() else {1: 109.0, 4: 45.0}[window]


def bench_sae_step(acts, mask, device, d_sae: int, batch_tokens: int, native_bf16: bool, rounds: int = 7,
                   precisions=None):
    D = acts.shape[-1]
    flat = acts[mask][:batch_tokens]
    dense_flop = {1: 12 * D * d_sae, 4: 18 * D * d_sae}  # fwd + bwd GEMMs: encoder, decoder (+ W_ctx for w=4)
    print(f"\n[2] SAE training step  {D} -> {d_sae}, batch {batch_tokens} tokens, {torch.get_num_threads()} threads, "
          f"{device}; medians of {rounds} interleaved rounds")
    print(f"    GFLOP/s count the dense step's work (w=1: 12*D*F = {dense_flop[1] / 1e6:.1f} MFLOP/token, w=4: 18*D*F);"
          f" ours does less once sparse, so its figure is dense-equivalent")
    precisions = precisions or [("fp32", False)] + ([("bf16 autocast", True)] if native_bf16 else [])
    for label, autocast in precisions:
        dtype = torch.bfloat16 if autocast else torch.float32
        ceiling = matmul_gflops(batch_tokens, D, d_sae, dtype, device)
        print(f"  {label}: plain matmul ({batch_tokens}x{D}) @ ({D}x{d_sae}) {ceiling:.1f} GFLOP/s = the dense ceiling: "
              f"w=1 {ceiling * 1e9 / dense_flop[1]:.0f}, w=4 {ceiling * 1e9 / dense_flop[4]:.0f} tokens/s")
        steps, tokens, flop = {}, {}, {}
        for name, make in PEERS:
            try:
                steps[name] = make(flat, d_sae, device, autocast)
                tokens[name], flop[name] = len(flat), dense_flop[1]
            except ImportError:
                print(f"    {name:38s} not installed (see requirements-bench.txt)")
            except Exception as e:  # a peer's API drift must not hide our own figures
                print(f"    {name:38s} failed: {type(e).__name__}: {str(e)[:120]}")
        peers = list(steps)
        steps["hand-written plain ReLU step"] = plain_step(flat, d_sae, device, autocast)
        tokens["hand-written plain ReLU step"], flop["hand-written plain ReLU step"] = len(flat), dense_flop[1]
        for w in (1, 4):
            l0 = committed_l0(w)
            for state, density in ((f"L0 {l0:.0f} (trained)", l0 / d_sae), ("at init (dense)", None)):
                name = f"ours window={w} {state}"
                steps[name] = our_step(acts, mask, w, d_sae, batch_tokens, autocast, device, density)
                tokens[name], flop[name] = steps[name].tokens, dense_flop[w]
        try:
            secs = interleaved(steps, device, rounds)
        except Exception as e:  # a peer failing mid-run: time the rest without it
            print(f"    interleaved timing failed ({type(e).__name__}: {str(e)[:120]}); retrying without the peers")
            for name in peers:
                steps.pop(name)
            peers, secs = [], interleaved(steps, device, rounds)
        tps = {name: tokens[name] / secs[name] for name in steps}
        best = max((tps[p] for p in peers), default=None)
        for name in steps:
            gflops = flop[name] * tps[name] / 1e9
            line = f"    {name:38s} {tps[name]:9.0f} tokens/s  {gflops:6.1f} GFLOP/s = {gflops / ceiling:4.0%} of ceiling"
            if name.startswith("ours"):
                line += f" (L0 {steps[name].l0:.0f})"
                w = int(name.split("=")[1][0])
                if best:
                    ratio = tps[name] / best
                    line += f"  {ratio:.2f}x faster peer"
                    if "trained" in name:
                        line += f" (target >= {TARGETS[w]}x: {'MET' if ratio >= TARGETS[w] else 'NOT MET'})"
            print(line)
    if not any(autocast for _, autocast in precisions):
        print("  bf16 autocast at this size: skipped, this CPU has no native bf16 (no avx512_bf16 / amx_bf16); "
              "the default size is also timed emulated, for the ratios")


def bench_crossover(acts, mask, device, d_sae: int, batch_tokens: int, native_bf16: bool, rounds: int = 5):
    """Our step with its sparse backward forced on and off across densities: where the sparse one
    stops winning is SPARSE_MAX_DENSITY's value (measured in fp32; bf16 GEMMs move it lower)."""
    densities = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    for label, autocast in [("fp32", False)] + ([("bf16 autocast", True)] if native_bf16 else []):
        print(f"\n[2b] crossover  {acts.shape[-1]} -> {d_sae}, batch {batch_tokens}, {label}: tokens/s with the sparse / "
              f"dense backward by density (SPARSE_MAX_DENSITY = {ex.SPARSE_MAX_DENSITY})")
        for w in (1, 4):
            steps = {(d, mode): our_step(acts, mask, w, d_sae, batch_tokens, autocast, device, d, mode)
                     for d in densities for mode in (1.0, 0.0)}
            secs = interleaved(steps, device, rounds)
            cells = [f"{d:.0%}: {steps[d, 1.0].tokens / secs[d, 1.0]:.0f} / {steps[d, 0.0].tokens / secs[d, 0.0]:.0f}"
                     for d in densities]
            print(f"    window={w}  " + ",  ".join(cells))


def bench_sweep(model, tok, cfg, device, acts, mask, rounds: int = 7):
    """One sweep point (standard clamp, 10 frequent latents, multiplier 30) on 16 forget rows: CE at
    every position with the cached tail (changed rows only) vs a full hooked forward."""
    sae = ex.TemporalSAE(acts.shape[-1], cfg.d_sae, cfg.window, cfg.d_head).to(device)
    with torch.no_grad():
        sae.scale.fill_(ex.math.sqrt(acts.shape[-1] / acts[mask].pow(2).sum(-1).mean().item()))
        sae.b_enc.fill_(-0.5)
    sp = ex.active_fraction(sae, acts, mask)
    lat = torch.argsort(sp, descending=True)[10:20].to(device)  # frequent, not ubiquitous
    fn = ex.clamp_fn(sae, ex.Clamp("standard", lat, 30.0, cfg.detector_window, None, None, 0.0))
    docs = ex.split_docs(ex.load_corpus("embedded", "forget"))[1]
    rows = ex.head_rows(ex.make_rows(tok, docs, cfg.context_length, 10**9, forget=True), 16)
    ts = ex.prepare_text(model, cfg.layer, rows, cfg.batch_rows)
    n_blocks = len(ex.blocks_of(model))

    def full():  # no reuse: the whole hooked forward, LM head at every position
        with torch.no_grad():
            for b in ts.batches:
                edited = fn(b.resid, b.time)
                with ex.intervene(model, cfg.layer, lambda r: edited):
                    model(input_ids=b.tokens, attention_mask=b.attn.long(), use_cache=False)

    # interleaved medians: timed one after the other, drift in the machine's speed (3 repeats each) moved
    # the ratio between 79% and 100% of ideal over five runs of the same code
    secs = interleaved({"fast": lambda: ex.text_stats(model, cfg.layer, ts, ex.edits_of(fn, ts.batches), kl=False),
                        "full": full}, device, rounds)
    t_fast, t_full = secs["fast"], secs["full"]
    ideal = n_blocks / (n_blocks - cfg.layer - 1)
    changed = sum(int((fn(b.resid, b.time) != b.resid).flatten(1).any(1).sum()) for b in ts.batches)
    print(f"\n[3] sweep cost  {len(rows.tokens)} forget rows x {cfg.context_length} tokens ({changed} changed by the "
          f"clamp), layer {cfg.layer} of {n_blocks}; medians of {rounds} interleaved rounds")
    print(f"    cached tail (blocks {cfg.layer + 1}..{n_blocks - 1}, changed rows): {t_fast:.2f} s/point")
    print(f"    full hooked forward:                          {t_full:.2f} s/point")
    print(f"    ratio {t_full / t_fast:.2f}x vs ideal {ideal:.2f}x = {t_full / t_fast / ideal:.0%} of ideal "
          f"(target >= 90%: {'MET' if t_full / t_fast >= 0.9 * ideal else 'NOT MET'})")


@torch.no_grad()
def bench_guard(model, tok, cfg, rounds: int = 5):
    """Figure 6: greedy generation with the KV cache, clean against under a `pattern` guard at the
    default sizes (w=4 SAE of d_sae latents, the gated selection's 400 latents, the learned detector's
    256 latents over 4 lags); medians of interleaved rounds. The guard's work does not depend on its
    weights' values (every matmul runs whether or not it clamps), so random weights time it fairly."""
    torch.manual_seed(0)
    d = model.config.hidden_size
    sae = ex.TemporalSAE(d, cfg.d_sae, cfg.window, cfg.d_head).to(model.device)
    det = ex.LagDetector(torch.randperm(cfg.d_sae)[:cfg.detector_latents], torch.randn(cfg.detector_latents, cfg.detector_window),
                         0.0, cfg.horizon, 0.0)
    clamp = ex.Clamp("pattern", torch.randperm(cfg.d_sae)[:cfg.gated_features[0]], 30.0, cfg.detector_window, det, None, 0.0)
    guard = ex.Guard(sae, cfg.layer, clamp)
    docs = ex.load_corpus("embedded", "forget")
    rows = ex.make_rows(tok, docs, cfg.context_length, 10**6, forget=True)
    pad = ex.bos_id(tok)
    print(f"\n[6] guard overhead  greedy generation of {cfg.generate_tokens} tokens after {cfg.prompt_tokens}-token "
          f"prompts, KV cache, fp32, layer {cfg.layer}; medians of {rounds} interleaved rounds; target <= 20%")
    for batch in (1, 8):
        pr = ex.make_prompts(rows, batch, cfg.prompt_tokens, cfg.generate_tokens)
        times = {"clean": [], "guarded": []}
        for _ in range(rounds):
            for name, g in (("clean", None), ("guarded", guard)):
                times[name].append(ex.greedy(model, pr, cfg.generate_tokens, pad, g)[1])
        clean, guarded = (statistics.median(times[k]) for k in ("clean", "guarded"))
        print(f"    batch {batch}: clean {clean:.1f} tokens/s, guarded {guarded:.1f} tokens/s, overhead per token "
              f"{clean / guarded - 1:+.1%} ({'MET' if clean / guarded - 1 <= 0.2 else 'NOT MET'}); "
              f"{guard.encodes} SAE encodes for {rounds * (cfg.prompt_tokens + cfg.generate_tokens)} positions x batch")
        guard.encodes = 0


def bench_e2e():
    with tempfile.TemporaryDirectory() as d:
        t = time.time()
        res = subprocess.run([sys.executable, str(ROOT / "experiment.py"), f"--out_dir={d}/run"], cwd=ROOT,
                             capture_output=True, text=True)
        wall = time.time() - t
        if res.returncode != 0:
            print(f"\n[4] end to end FAILED: {res.stderr.strip().splitlines()[-1]}")
            return
        meta = json.loads(Path(d, "run", "metadata.json").read_text())
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"\n[4] end to end  `python experiment.py` (defaults), device {meta['device']}, cpu {meta.get('cpu_model')}, "
          f"native bf16 {meta.get('cpu_bf16')}")
    print(f"    wall {wall:.0f} s ({wall / 60:.1f} min)   target <= 10 min: {'MET' if wall <= 600 else 'NOT MET'}")
    print("    stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in meta["stage_times_s"].items()))
    print(f"\n[5] memory  peak resident {peak_gib:.2f} GiB   target <= 4 GiB: {'MET' if peak_gib <= 4 else 'NOT MET'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip_e2e", action="store_true", help="skip the end-to-end run (figures 4 and 5)")
    ap.add_argument("--skip_steps", action="store_true", help="skip the SAE step comparison (figures 2 and 2b)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip_guard", action="store_true", help="skip the guard's generation overhead (figure 6)")
    ap.add_argument("--only_guard", action="store_true", help="only figure 6")
    ap.add_argument("--bf16_emulated", type=int, default=0, metavar="TOKENS",
                    help="only figure 2 under bf16 autocast at this batch, also where bf16 is emulated (a CPU without "
                         "avx512_bf16 / amx): every step runs the same emulated kernels, so the ratios are like for "
                         "like, but no rate says how fast native bf16 would be")
    args = ap.parse_args()
    if args.bf16_emulated < 0:
        sys.exit(f"bench.py: error: --bf16_emulated must be a batch size in tokens (> 0), got {args.bf16_emulated}")
    cfg = ex.Config(device=args.device)
    device = ex.pick_device(cfg)
    cpu_model, cpu_bf16 = ex.cpu_info()
    native_bf16 = device.type == "cuda" or cpu_bf16
    print(f"cpu {cpu_model}; native bf16 (avx512_bf16 / amx_bf16): {'yes' if cpu_bf16 else 'no'}; "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    model, tok = ex.load_model(cfg, device)
    if args.only_guard:
        bench_guard(model, tok, cfg)
        return
    acts, rows = bench_harvest(model, tok, cfg, device)
    if device.type == "cpu" and cpu_bf16:  # the bf16 figure, for reference: the CPU default stays fp32
        bench_harvest(model.to(torch.bfloat16), tok, cfg, device)
        model.to(torch.float32)
    elif device.type == "cpu":
        print("    bf16 harvesting: skipped, this CPU has no native bf16 (it would measure the emulation)")
    mask = torch.ones(acts.shape[:2], dtype=torch.bool)
    mask[:, 0] = False
    if args.bf16_emulated:
        label = "bf16 autocast" if native_bf16 else EMULATED_BF16
        bench_sae_step(acts, mask, device, cfg.d_sae, args.bf16_emulated, native_bf16, rounds=3,
                       precisions=[(label, True)])
        return
    for d_sae, batch in () if args.skip_steps else ((cfg.d_sae, cfg.batch_tokens), (4608, 4096)):
        bench_sae_step(acts, mask, device, d_sae, batch, native_bf16)
    if not args.skip_steps and not native_bf16:  # emulated bf16 ran ~30x slower: the default size only, 3 rounds
        bench_sae_step(acts, mask, device, cfg.d_sae, cfg.batch_tokens, native_bf16, rounds=3,
                       precisions=[(EMULATED_BF16, True)])
    if not args.skip_steps:
        bench_crossover(acts, mask, device, cfg.d_sae, cfg.batch_tokens, native_bf16)
    bench_sweep(model, tok, cfg, device, acts, mask)
    if not args.skip_guard:
        bench_guard(model, tok, cfg)
    del model
    if not args.skip_e2e:
        bench_e2e()


if __name__ == "__main__":
    main()

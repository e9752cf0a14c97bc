"""Speed and memory benchmarks. Each figure is printed with the configuration it used.

    python bench.py                  # all figures (about 11 minutes on the 2-core CPU machine)
    python bench.py --skip_e2e       # without the end-to-end run of experiment.py
    pip install -r requirements-bench.txt   # optional: the SAELens and dictionary_learning peers

1. harvesting: tokens/s stopping after block `layer` vs the full forward on the same batch;
   target >= (n_blocks / (layer + 1)) * 0.7 times the full forward.
2. SAE training step: tokens/s for window 1 and 4 vs SAELens' standard ReLU training SAE and
   dictionary_learning's StandardTrainer.update on the same activations, batch and threads;
   targets w=1 >= 1.2x and w=4 >= 0.8x the faster peer. Achieved GFLOP/s vs a plain matmul.
3. sweep cost: seconds per sweep point with the cached tail vs full hooked forwards;
   target >= 90% of the ideal n_blocks / (n_blocks - layer - 1).
4. end to end: wall time and stages of the default `python experiment.py`; target <= 10 min.
5. memory: peak resident memory of that run; target <= 4 GiB.
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


def matmul_gflops(n, d, f, dtype, device) -> float:
    a, b = torch.randn(n, d, device=device, dtype=dtype), torch.randn(d, f, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, repeats=5)
    return 2 * n * d * f / t / 1e9


def our_step(acts, mask, window, d_sae, batch_tokens, autocast, device):
    cfg = ex.Config(window=window, d_sae=d_sae, sae_autocast=autocast)
    sae = ex.TemporalSAE(acts.shape[-1], d_sae, window, cfg.d_head).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    rows = max(1, round(batch_tokens / mask.sum(1).float().mean().item()))
    x, m = acts[:rows].to(device), mask[:rows].to(device)
    use = ex.use_autocast(cfg, device)
    t = timed(lambda: ex.train_step(sae, opt, x, m, 1.0, 1e-4, use), device, repeats=5)
    return int(m.sum()) / t


def plain_step(acts_ND, d_sae, device):
    """A hand-written standard ReLU SAE step in fp32: the floor any library should reach."""
    d = acts_ND.shape[1]
    W_enc = torch.randn(d, d_sae, device=device, requires_grad=True)
    W_dec = torch.randn(d_sae, d, device=device, requires_grad=True)
    b_enc = torch.zeros(d_sae, device=device, requires_grad=True)
    b_dec = torch.zeros(d, device=device, requires_grad=True)
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=1e-4)
    x = acts_ND.to(device)

    def step():
        f = torch.relu((x - b_dec) @ W_enc + b_enc)
        loss = (f @ W_dec + b_dec - x).pow(2).sum(-1).mean() + (f * W_dec.norm(dim=1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return len(x) / timed(step, device, repeats=5)


def saelens_step(acts_ND, d_sae, device):
    """SAELens' standard ReLU training SAE through its trainer's public `step` (any tensor iterator works)."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer
    d = acts_ND.shape[1]
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=d_sae, l1_coefficient=1.0, device=str(device)))
    x = acts_ND.to(device)
    trainer_cfg = SAETrainerConfig(total_training_samples=len(x) * 1000, train_batch_size_samples=len(x), lr=1e-4,
                                   lr_end=1e-5, device=str(device), logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(lambda: x, None))

    def step():
        trainer.step(x)
        trainer.n_training_steps += 1
    return len(x) / timed(step, device, repeats=5)


def dictionary_learning_step(acts_ND, d_sae, device):
    from dictionary_learning.trainers.standard import StandardTrainer
    d = acts_ND.shape[1]
    trainer = StandardTrainer(steps=10_000, activation_dim=d, dict_size=d_sae, layer=0, lm_name="bench",
                              lr=1e-4, l1_penalty=1.0, warmup_steps=1, sparsity_warmup_steps=1, device=str(device))
    x = acts_ND.to(device)
    state = {"step": 0}

    def step():
        trainer.update(state["step"], x)
        state["step"] += 1
    return len(x) / timed(step, device, repeats=5)


def bench_sae_step(acts, mask, device, d_sae: int, batch_tokens: int):
    flat = acts[mask][:batch_tokens]
    print(f"\n[2] SAE training step  {acts.shape[-1]} -> {d_sae}, batch {batch_tokens} tokens, "
          f"{torch.get_num_threads()} threads, {device}")
    peers = {}
    for name, fn in (("SAELens StandardTrainingSAE", saelens_step), ("dictionary_learning StandardTrainer", dictionary_learning_step)):
        try:
            peers[name] = fn(flat, d_sae, device)
            print(f"    {name:38s} {peers[name]:9.0f} tokens/s (fp32)")
        except ImportError:
            print(f"    {name:38s} not installed (pip install -r requirements-bench.txt)")
        except Exception as e:  # a peer's API drift must not hide our own figures
            print(f"    {name:38s} failed: {type(e).__name__}: {str(e)[:120]}")
    plain = plain_step(flat, d_sae, device)
    print(f"    {'hand-written plain ReLU step':38s} {plain:9.0f} tokens/s (fp32)")
    best_peer = max(peers.values()) if peers else None
    ours = {}
    for w, target in ((1, 1.2), (4, 0.8)):
        for autocast in (False, True):
            tps = our_step(acts, mask, w, d_sae, batch_tokens, autocast, device)
            ours[(w, autocast)] = tps
            used = ex.use_autocast(ex.Config(sae_autocast=autocast), device)
            flops = (12 if w == 1 else 18) * acts.shape[-1] * d_sae  # fwd+bwd of encoder, decoder (+ W_ctx)
            line = f"    {f'ours window={w} ' + ('bf16 autocast' if used else 'fp32'):38s} {tps:9.0f} tokens/s  " \
                   f"{flops * tps / 1e9:6.1f} GFLOP/s"
            if best_peer and (autocast or not used):
                ratio = tps / best_peer
                line += f"  {ratio:.2f}x faster peer (target >= {target}x: {'MET' if ratio >= target else 'NOT MET'})"
            print(line)
    for dtype in (torch.float32, torch.bfloat16):
        print(f"    plain matmul ({batch_tokens}x{acts.shape[-1]}) @ ({acts.shape[-1]}x{d_sae}) {str(dtype):15s} "
              f"{matmul_gflops(batch_tokens, acts.shape[-1], d_sae, dtype, device):6.1f} GFLOP/s")


def bench_sweep(model, tok, cfg, device, acts, mask):
    """One sweep point (standard clamp, 10 latents) on 40 forget questions, both ways."""
    sae = ex.TemporalSAE(acts.shape[-1], cfg.d_sae, cfg.window, cfg.d_head).to(device)
    with torch.no_grad():
        sae.scale.fill_(ex.math.sqrt(acts.shape[-1] / acts[mask].pow(2).sum(-1).mean().item()))
        sae.b_enc.fill_(-0.5)
    sp = ex.active_fraction(sae, acts, mask)
    lat = torch.argsort(sp, descending=True)[10:20].to(device)  # frequent, not ubiquitous
    fn = ex.clamp_fn(sae, ex.Clamp(lat, 25.0, "standard", None, None))
    qs = ex.load_questions("embedded", "forget")[:40]
    qa = ex.prepare_qa(model, tok, cfg.layer, qs, "cloze", cfg.batch_rows)
    n_blocks = len(ex.blocks_of(model))

    def slow():  # no reuse: a full hooked forward per batch, LM head at the scored positions
        with torch.no_grad(), ex.intervene(model, cfg.layer, fn):
            for tb, sc in zip(qa.tails, qa.score_BT):
                h = model.base_model(input_ids=tb.tokens, attention_mask=tb.attn.long(), use_cache=False).last_hidden_state
                ex.logits_at(model, h, sc)

    def slow_all_positions():
        with torch.no_grad(), ex.intervene(model, cfg.layer, fn):
            for tb in qa.tails:
                model(input_ids=tb.tokens, attention_mask=tb.attn.long(), use_cache=False)

    t_fast = timed(lambda: ex.qa_correct(model, tok, cfg.layer, qa, fn), device)
    t_slow = timed(slow, device)
    t_naive = timed(slow_all_positions, device)
    ideal = n_blocks / (n_blocks - cfg.layer - 1)
    changed = sum(int((fn(tb.resid) != tb.resid).flatten(1).any(1).sum()) for tb in qa.tails)
    print(f"\n[3] sweep cost  40 questions x 4 choices = {sum(len(t.attn) for t in qa.tails)} sequences "
          f"({changed} changed by the clamp), layer {cfg.layer} of {n_blocks}")
    print(f"    cached tail (blocks {cfg.layer}..{n_blocks - 1}, changed rows, head at choice tokens): {t_fast:.2f} s/point")
    print(f"    full hooked forward, head at choice tokens:                 {t_slow:.2f} s/point")
    print(f"    full hooked forward, head at every position:                {t_naive:.2f} s/point")
    print(f"    ratio {t_slow / t_fast:.2f}x vs ideal {ideal:.2f}x = {t_slow / t_fast / ideal:.0%} of ideal "
          f"(target >= 90%: {'MET' if t_slow / t_fast >= 0.9 * ideal else 'NOT MET'})")


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
    print(f"\n[4] end to end  `python experiment.py` (defaults), device {meta['device']}")
    print(f"    wall {wall:.0f} s ({wall / 60:.1f} min)   target <= 10 min: {'MET' if wall <= 600 else 'NOT MET'}")
    print("    stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in meta["stage_times_s"].items()))
    print(f"\n[5] memory  peak resident {peak_gib:.2f} GiB   target <= 4 GiB: {'MET' if peak_gib <= 4 else 'NOT MET'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip_e2e", action="store_true", help="skip the end-to-end run (figures 4 and 5)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    cfg = ex.Config(device=args.device)
    device = ex.pick_device(cfg)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    model, tok = ex.load_model(cfg, device)
    acts, rows = bench_harvest(model, tok, cfg, device)
    if device.type == "cpu":  # the bf16 figure, for reference: the CPU default stays fp32
        bench_harvest(model.to(torch.bfloat16), tok, cfg, device)
        model.to(torch.float32)
    mask = torch.ones(acts.shape[:2], dtype=torch.bool)
    mask[:, 0] = False
    for d_sae in (cfg.d_sae, 4608):
        for batch in sorted({cfg.batch_tokens, 4096}):
            bench_sae_step(acts, mask, device, d_sae, batch)
    bench_sweep(model, tok, cfg, device, acts, mask)
    del model
    if not args.skip_e2e:
        bench_e2e()


if __name__ == "__main__":
    main()

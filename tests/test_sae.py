"""The temporal SAE, its trainer and checkpoints (fast unit and reference tests)."""
import json

import pytest
import torch
import torch.nn.functional as F

import experiment as ex


def rows(B=3, T=10, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[:, 0] = False
    return x, valid


def test_window_is_causal():
    sae = ex.TemporalSAE(16, 32, window=4, d_head=8)
    x, valid = rows()
    f = sae.encode(x, valid)
    for t in range(x.shape[1] - 1):
        x2 = x.clone()
        x2[:, t + 1:] += torch.randn_like(x2[:, t + 1:]) * 5
        assert torch.equal(sae.encode(x2, valid)[:, :t + 1], f[:, :t + 1]), f"latents at {t} saw the future"


def test_window_reads_the_past():
    sae = ex.TemporalSAE(16, 32, window=4, d_head=8)
    x, valid = rows()
    x2 = x.clone()
    x2[:, 4] += 3.0
    changed = (sae.pre_acts(x2, valid) != sae.pre_acts(x, valid)).any(-1).any(0)
    assert changed[4:8].all() and not changed[8:].any() and not changed[:4].any()


def test_masked_slots_are_skipped():
    """A masked predecessor (BOS, or before the row) contributes nothing, whatever its value."""
    sae = ex.TemporalSAE(16, 32, window=4, d_head=8)
    x, valid = rows()
    x2 = x.clone()
    x2[:, 0] = 1e4
    assert torch.equal(sae.encode(x, valid)[:, 1:], sae.encode(x2, valid)[:, 1:])


def plain_relu_sae(sae, x):
    """A standard ReLU SAE (SAELens / SAEBench 'standard') with the same weights."""
    f = F.relu((x * sae.scale - sae.b_dec) @ sae.W_enc + sae.b_enc)
    return f, (f @ sae.W_dec + sae.b_dec) / sae.scale


def test_window_one_is_exactly_a_plain_sae():
    torch.manual_seed(1)
    sae = ex.TemporalSAE(16, 32, window=1)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.scale.fill_(0.7)
    x, valid = rows()
    out = sae(x, valid)
    f, x_hat = plain_relu_sae(sae, x)
    assert torch.equal(out.f, f) and torch.equal(out.x_hat, x_hat)
    assert not any(n in dict(sae.named_parameters()) for n in ("pos", "W_q", "W_k", "W_ctx"))


def test_position_embeddings_get_gradient_and_change_latents():
    torch.manual_seed(0)
    sae = ex.TemporalSAE(16, 32, window=4, d_head=8)
    x, valid = rows()
    out = sae(x, valid)
    (out.mse + out.l1).backward()
    assert sae.pos.grad is not None and sae.pos.grad[1:].abs().sum() > 0 and sae.pos.grad[0].abs().sum() > 0
    before = sae.encode(x, valid)
    with torch.no_grad():
        sae.pos[2] += 1.0
    assert not torch.allclose(sae.encode(x, valid)[:, 3:], before[:, 3:])


def naive_window_context(sae, xc, valid):
    """The window attention of the class docstring, one position and one lag at a time."""
    B, T, D = xc.shape
    out = torch.zeros_like(xc)
    for b in range(B):
        for t in range(T):
            q = (xc[b, t] + sae.pos[0]) @ sae.W_q
            lags = [s for s in range(1, sae.window) if t - s >= 0 and valid[b, t - s]]
            vals = [xc[b, t - s] + sae.pos[s] for s in lags]
            logits = torch.stack([torch.zeros(())] + [q @ (v @ sae.W_k) / sae.d_head ** 0.5 for v in vals])
            a = torch.softmax(logits, 0)[1:]
            for a_s, v in zip(a, vals):
                out[b, t] += a_s * v
    return out


@pytest.mark.parametrize("window", [2, 4])
def test_window_context_equals_the_formula(window):
    torch.manual_seed(0)
    sae = ex.TemporalSAE(16, 32, window=window, d_head=8)
    x, valid = rows()
    valid[1, 4] = False
    assert torch.allclose(sae.window_context(x, valid), naive_window_context(sae, x, valid), atol=1e-5)


def sparse_sae(window, density):
    """An SAE whose latents fire at about `density` on rows(): b_enc shifted to that quantile."""
    torch.manual_seed(window)
    sae = ex.TemporalSAE(16, 64, window=window, d_head=8)
    x, valid = rows(B=4, T=12)
    valid[2, 5] = False  # a masked token inside a row: skipped as a window slot and in the loss
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.scale.fill_(0.7)
        sae.b_enc.sub_(torch.quantile(sae.pre_acts(x, valid)[valid], 1 - density))
    return sae, x, valid


def losses_and_grads(sae, loss_fn):
    mse, l1 = loss_fn()
    loss = mse + 1.3 * l1
    return loss, mse, l1, torch.autograd.grad(loss, list(sae.parameters()))


@pytest.mark.parametrize("window", [1, 4])
@pytest.mark.parametrize("density", [0.5, 0.04])   # early training / trained
@pytest.mark.parametrize("max_density", [0.0, 1.0])  # the step's dense / sparse backward
def test_fast_step_equals_the_reference(window, density, max_density):
    """The training step's loss terms and every parameter gradient equal those of `forward`."""
    sae, x, valid = sparse_sae(window, density)

    def reference():
        out = sae(x, valid)
        return out.mse, out.l1

    def fast():
        mse, l1, n_active = ex.step_losses(sae, x, valid, autocast=False, max_density=max_density)
        fast.n_active = n_active
        return mse, l1

    *ref, ref_grads = losses_and_grads(sae, reference)
    *got, got_grads = losses_and_grads(sae, fast)
    for a, b in zip(got, ref):  # fp32 throughout: a bf16 matmul anywhere would miss by ~1e-2
        assert torch.allclose(a, b, rtol=1e-5), (a, b)
    for (name, _), a, b in zip(sae.named_parameters(), got_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max()), name
    f = sae.encode(x, valid)[valid]
    assert torch.equal(fast.n_active, (f > 0).sum(0))
    assert abs(fast.n_active.sum() / f.numel() - density) < 0.02


@pytest.mark.parametrize("window", [1, 3])
def test_fast_step_under_autocast_is_close_to_the_reference(window):
    sae, x, valid = sparse_sae(window, 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = sae(x, valid)
    mse, l1, _ = ex.step_losses(sae, x, valid, autocast=True, max_density=1.0)
    assert torch.allclose(mse, ref.mse.float(), rtol=2e-2) and torch.allclose(l1, ref.l1.float(), rtol=2e-2)


def test_autocast_only_with_native_bf16():
    cpu_model, cpu_bf16 = ex.cpu_info()
    assert isinstance(cpu_model, str) and cpu_model
    assert ex.use_autocast(ex.Config(), torch.device("cpu")) == cpu_bf16
    assert not ex.use_autocast(ex.Config(sae_autocast=False), torch.device("cpu"))


def reference_step_losses(sae, x, valid, autocast, max_density=None):
    """`step_losses` through the readable `forward`, dense autograd throughout."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = sae(x, valid)
    return out.mse.float(), out.l1.float(), ((out.f > 0) & valid[..., None]).sum((0, 1))


@pytest.mark.parametrize("window", [1, 3])
def test_training_with_the_fast_step_matches_the_reference(tmp_path, monkeypatch, window):
    """A whole train_sae on sparse data: fast step (sparse backward always) vs dense reference."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(48, 16, generator=g)
    codes = torch.rand(40, 17, 48, generator=g) * (torch.rand(40, 17, 48, generator=g) < 0.08)
    acts = codes @ atoms + 0.05 * torch.randn(40, 17, 16, generator=g)
    mask = torch.ones(40, 17, dtype=torch.bool)
    mask[:, 0] = False
    logs = {}
    for name in ("reference", "fast"):
        out = tmp_path / name
        out.mkdir()
        with monkeypatch.context() as m:
            if name == "reference":
                m.setattr(ex, "step_losses", reference_step_losses)
            else:
                m.setattr(ex, "SPARSE_MAX_DENSITY", 1.0)
            cfg = ex.Config(out_dir=str(out), d_sae=64, window=window, d_head=8, train_tokens=40 * 16 * 10,
                            batch_tokens=128, l1_coeff=0.05, lr=3e-3, sae_autocast=False)
            ex.train_sae(cfg, acts, mask, torch.device("cpu"), out)
        logs[name] = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    ref, fast = logs["reference"][-1], logs["fast"][-1]
    assert ref["step"] == fast["step"] == 49
    assert fast["fve"] == pytest.approx(ref["fve"], abs=2e-3) and fast["l0"] == pytest.approx(ref["l0"], rel=2e-2)


def test_init_learns_and_decoder_rows_stay_unit_norm():
    torch.manual_seed(0)
    sae = ex.TemporalSAE(16, 64, window=2, d_head=8)
    assert torch.allclose(ex.decoder_norms(sae.W_dec, 16), torch.ones(64), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    x, valid = rows(B=8, T=16)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        logs = ex.train_step(sae, opt, x, valid, 0.01, 1e-2, autocast=False)
        first = first or logs["loss"]
    assert logs["loss"] < 0.5 * first
    assert torch.allclose(ex.decoder_norms(sae.W_dec, 16), torch.ones(64), atol=1e-5)


def test_decoder_norm_axis_is_asserted():
    with pytest.raises(AssertionError):
        ex.decoder_norms(torch.ones(16, 64), d_in=64 + 1)


def test_subset_encode_matches_full_encode():
    sae = ex.TemporalSAE(16, 32, window=3, d_head=8)
    x, valid = rows()
    idx = torch.tensor([3, 0, 17])
    assert torch.allclose(sae.encode(x, valid, idx), sae.encode(x, valid)[..., idx], atol=1e-6)


def test_non_finite_loss_stops_with_step(tmp_path):
    cfg = ex.Config(out_dir=str(tmp_path), d_sae=8, train_tokens=64, batch_tokens=16, window=2, d_head=4,
                    sae_autocast=False)
    acts = torch.randn(8, 5, 4)
    acts[3, 2, 1] = float("nan")
    mask = torch.ones(8, 5, dtype=torch.bool)
    with pytest.raises(ex.TrainingDiverged, match="training step"):
        ex.train_sae(cfg, acts, mask, torch.device("cpu"), tmp_path)


def test_save_load_round_trip(tmp_path):
    sae = ex.TemporalSAE(16, 32, window=4, d_head=8)
    with torch.no_grad():
        sae.scale.fill_(0.3)
    ex.save_sae(sae, tmp_path)
    again = ex.load_sae(tmp_path)
    x, valid = rows()
    assert torch.equal(sae(x, valid).x_hat, again(x, valid).x_hat)
    assert json.loads((tmp_path / "cfg.json").read_text())["window"] == 4


def test_resume_gives_the_same_sae(tmp_path):
    """Train 12 steps straight; separately stop after a checkpoint at step 6 and resume."""
    base = dict(d_sae=16, window=2, d_head=4, train_tokens=12 * 40, batch_tokens=40, checkpoint_every=6,
                sae_autocast=False, seed=3)
    acts, mask = torch.randn(20, 9, 8), torch.ones(20, 9, dtype=torch.bool)
    mask[:, 0] = False
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir(), cut_dir.mkdir()
    full = ex.train_sae(ex.Config(out_dir=str(full_dir), **base), acts, mask, torch.device("cpu"), full_dir)

    calls = {"n": 0}
    real_step = ex.train_step

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    ex.train_step = dying_step
    try:
        with pytest.raises(KeyboardInterrupt):
            ex.train_sae(ex.Config(out_dir=str(cut_dir), **base), acts, mask, torch.device("cpu"), cut_dir)
    finally:
        ex.train_step = real_step
    assert (cut_dir / "checkpoint.safetensors").exists()
    resumed = ex.train_sae(ex.Config(out_dir=str(cut_dir), resume=True, **base), acts, mask, torch.device("cpu"), cut_dir)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    log = [json.loads(l) for l in (cut_dir / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in log] == sorted({l["step"] for l in log}), "the resumed log repeats or reorders steps"
    full_log = [json.loads(l) for l in (full_dir / "log.jsonl").read_text().splitlines()]
    assert [l["tokens"] for l in log] == [l["tokens"] for l in full_log], "token counts differ after resume"


def test_checkpoint_holds_no_pickle(tmp_path):
    from safetensors.torch import load_file
    sae = ex.TemporalSAE(8, 16, window=2, d_head=4)
    opt = torch.optim.Adam(sae.parameters())
    x, valid = rows(D=8)
    ex.train_step(sae, opt, x, valid, 0.1, 1e-3, autocast=False)
    ex.save_checkpoint(tmp_path, sae, opt, 1, 100, torch.zeros(16))
    assert "sae.W_enc" in load_file(tmp_path / "checkpoint.safetensors")


def test_window_follows_the_predecessor_tree():
    """In a packed row a choice's first token follows the question's last token, not the previous
    choice's last token: its window must equal the window of the unpacked row."""
    torch.manual_seed(0)
    sae = ex.TemporalSAE(16, 32, window=4, d_head=8)
    q, c1, c2 = torch.randn(1, 5, 16), torch.randn(1, 3, 16), torch.randn(1, 2, 16)
    packed = torch.cat([q, c1, c2], 1)
    prev = torch.tensor([[-1, 0, 1, 2, 3, 4, 5, 6, 4, 8]])  # c2 (positions 8, 9) follows q's last token (4)
    valid = torch.ones(1, 10, dtype=torch.bool)
    valid[:, 0] = False
    f_packed = sae.encode(packed, valid, None, prev)
    unpacked = torch.cat([q, c2], 1)
    f_plain = sae.encode(unpacked, valid[:, :7])
    assert torch.allclose(f_packed[:, 8:], f_plain[:, 5:], atol=1e-5)
    assert torch.allclose(f_packed[:, :8], sae.encode(packed[:, :8], valid[:, :8]), atol=1e-5)

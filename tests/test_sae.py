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
        st = ex.step_losses(sae, x, valid, autocast=False, max_density=max_density)
        fast.n_active = st.n_active
        return st.terms["mse"], st.terms["l1"]

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
    t = ex.step_losses(sae, x, valid, autocast=True, max_density=1.0).terms
    mse, l1 = t["mse"], t["l1"]
    assert torch.allclose(mse, ref.mse.float(), rtol=2e-2) and torch.allclose(l1, ref.l1.float(), rtol=2e-2)


def test_autocast_only_with_native_bf16():
    cpu_model, cpu_bf16 = ex.cpu_info()
    assert isinstance(cpu_model, str) and cpu_model
    assert ex.use_autocast(ex.Config(), torch.device("cpu")) == cpu_bf16
    assert not ex.use_autocast(ex.Config(sae_autocast=False), torch.device("cpu"))


def reference_step_losses(sae, x, valid, autocast, max_density=None, dead_F=None, n_high=0, auxk_relu=False):
    """`step_losses` through the readable `forward`, dense autograd throughout (ReLU, no T-SAE terms)."""
    assert sae.activation == "relu" and not n_high
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = sae(x, valid, train=True)
    return ex.StepLosses({"mse": out.mse.float(), "l1": out.l1.float()},
                         ((out.f > 0) & valid[..., None]).sum((0, 1)), None)


def sparse_rows():
    """(40, 17, 16) activations made of 48 sparse atoms (8% density) plus noise; BOS slot masked."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(48, 16, generator=g)
    codes = torch.rand(40, 17, 48, generator=g) * (torch.rand(40, 17, 48, generator=g) < 0.08)
    acts = codes @ atoms + 0.05 * torch.randn(40, 17, 16, generator=g)
    mask = torch.ones(40, 17, dtype=torch.bool)
    mask[:, 0] = False
    return acts, mask


@pytest.mark.parametrize("window", [1, 3])
def test_training_with_the_fast_step_matches_the_reference(tmp_path, monkeypatch, window):
    """A whole train_sae on sparse data: fast step (sparse backward always) vs dense reference."""
    acts, mask = sparse_rows()
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


@pytest.mark.parametrize("objective", [{}, {"activation": "batchtopk", "k": 3, "contrastive": 0.2}])
def test_resume_gives_the_same_sae(tmp_path, objective):
    """Train 12 steps straight; separately stop after a checkpoint at step 6 and resume (a BatchTopK
    SAE's threshold travels in its state_dict, the dead-latent counts in the checkpoint)."""
    base = dict(d_sae=16, window=2, d_head=4, train_tokens=12 * 40, batch_tokens=40, checkpoint_every=6,
                sae_autocast=False, seed=3, **objective)
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


# ------------------------------------------------------------------------------------------------
# BatchTopK, AuxK and the T-SAE objective
# ------------------------------------------------------------------------------------------------

def topk_sae(window=1, k=5, seed=0):
    torch.manual_seed(seed)
    sae = ex.TemporalSAE(16, 64, window=window, d_head=8, activation="batchtopk", k=k)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_()
        sae.scale.fill_(0.7)
    x, valid = rows(B=4, T=12)
    valid[2, 5:8] = False  # masked tokens inside a row: never kept, never counted
    return sae, x, valid


def reference_batch_topk(sae, x, valid):
    """BatchTopK written out: over the valid tokens only, the k·N largest relu(pre), all else zero."""
    f = F.relu(sae.pre_acts(x, valid))[valid]
    top = f.flatten().topk(sae.k * len(f))
    kept = torch.zeros(f.numel()).scatter(0, top.indices, top.values).view_as(f)
    out = torch.zeros(*valid.shape, sae.d_sae)
    out[valid] = kept
    return out


@pytest.mark.parametrize("window", [1, 3])
def test_batch_topk_keeps_exactly_k_per_valid_token_and_matches_the_reference(window):
    sae, x, valid = topk_sae(window)
    out = sae(x, valid, train=True)
    assert int((out.f > 0).sum()) == sae.k * int(valid.sum())
    assert not out.f[~valid].any()
    assert torch.equal(out.f, reference_batch_topk(sae, x, valid))
    assert torch.allclose(out.x_hat, sae.decode(out.f))
    assert not torch.equal(sae(x, valid).f, out.f), "inference uses the threshold, not the batch"


def test_batch_topk_keeps_ties_in_index_order():
    f = torch.tensor([[3.0, 1.0, 1.0], [1.0, 0.0, 2.0]])  # k=2 over 2 tokens: 4 kept, 3 of the 1.0s tie
    kept = ex.batch_topk(f, 2)
    assert torch.equal(kept, torch.tensor([[3.0, 1.0, 1.0], [0.0, 0.0, 2.0]]))


@pytest.mark.parametrize("window", [1, 3])
def test_inference_is_jumprelu_with_the_one_threshold(window):
    sae, x, valid = topk_sae(window)
    sae.threshold.fill_(0.4)
    pre = sae.pre_acts(x, valid)
    expected = F.relu(pre) * (pre > 0.4)
    assert ((pre > 0) & (pre <= 0.4)).any()
    assert torch.equal(sae.encode(x, valid), expected) and torch.equal(sae(x, valid).f, expected)
    idx = torch.tensor([7, 0, 33])
    assert torch.allclose(sae.encode(x, valid, idx), expected[..., idx], atol=1e-6)
    assert torch.allclose(sae.encode_last(x[:, -window:], valid[:, -window:]), expected[:, -1], atol=1e-5)


def tsae_reference(sae, x, valid, n_high, temperature=ex.CONTRASTIVE_TEMPERATURE):
    """mse_high and the contrastive loss written out, one anchor at a time, from forward's codes."""
    f = sae(x, valid, train=True).f
    xs = x * sae.scale
    hi = f[..., :n_high]
    err = ((hi @ sae.W_dec[:n_high] + sae.b_dec - xs).pow(2).sum(-1) * valid).sum() / valid.sum()
    pairs = [(b, t) for b in range(x.shape[0]) for t in range(1, x.shape[1])
             if valid[b, t] and valid[b, t - 1] and hi[b, t].any() and hi[b, t - 1].any()]
    losses = []
    for b, t in pairs:
        cands = [(b2, t2) for b2, t2 in pairs if b2 != b or t2 == t]  # own positive + other rows' pairs
        sims = torch.stack([F.cosine_similarity(hi[b, t], hi[b2, t2 - 1], dim=0) for b2, t2 in cands]) / temperature
        losses.append(torch.logsumexp(sims, 0) - sims[cands.index((b, t))])
    return err, torch.stack(losses).mean()


@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
@pytest.mark.parametrize("max_density", [0.0, 1.0])
def test_tsae_terms_equal_the_direct_computation_and_their_gradients(activation, max_density):
    if activation == "relu":
        sae, x, valid = sparse_sae(3, 0.3)
    else:
        sae, x, valid = topk_sae(3, k=12)
    n_high = 13
    dead = torch.zeros(64, dtype=torch.bool)
    st = ex.step_losses(sae, x, valid, autocast=False, max_density=max_density, dead_F=dead, n_high=n_high)
    mse_high, contrastive = tsae_reference(sae, x, valid, n_high)
    assert torch.allclose(st.terms["mse_high"], mse_high, rtol=1e-5)
    assert torch.allclose(st.terms["contrastive"], contrastive, rtol=1e-5) and contrastive > 0
    loss = lambda t: t["mse"] + t["mse_high"] + 0.7 * t["contrastive"]
    got = torch.autograd.grad(loss(st.terms), list(sae.parameters()))
    out = sae(x, valid, train=True)
    ref = torch.autograd.grad(out.mse + mse_high + 0.7 * contrastive, list(sae.parameters()))
    for (name, _), a, b in zip(sae.named_parameters(), got, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max()), name


def test_info_nce_on_a_tiny_case_by_hand():
    """Two rows, two pairs each: anchor 0's candidates are its positive and the other row's two."""
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    group = torch.tensor([0, 0, 1, 1])
    got = ex.info_nce(h, g, group, temperature=0.5)
    r = 2 ** -0.5
    cos = [[1, None, 0, r], [None, 0, 1, r], [r, r, r, None], [r, r, None, 0]]  # None: same row, left out
    expected = []
    for i, row in enumerate(cos):
        logits = torch.tensor([c / 0.5 for c in row if c is not None])
        expected.append(torch.logsumexp(logits, 0) - cos[i][i] / 0.5)
    assert torch.allclose(got, torch.stack(expected).mean())


def test_adjacent_pairs_follow_rows_and_skip_masked_tokens():
    valid = torch.tensor([[False, True, True, False, True], [False, True, True, True, False]])
    cur, prev, row = ex.adjacent_pairs(valid)
    # valid tokens in row-major order: (0,1)=0 (0,2)=1 (0,4)=2 (1,1)=3 (1,2)=4 (1,3)=5
    assert cur.tolist() == [1, 4, 5] and prev.tolist() == [0, 3, 4] and row.tolist() == [0, 1, 1]


@pytest.mark.parametrize("relu", [False, True])
def test_auxk_is_zero_without_dead_latents_and_positive_with_them(relu):
    sae, x, valid = topk_sae(3)
    none = torch.zeros(64, dtype=torch.bool)
    st = ex.step_losses(sae, x, valid, autocast=False, dead_F=none, auxk_relu=relu)
    assert st.terms["auxk"] == 0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    st = ex.step_losses(sae, x, valid, autocast=False, dead_F=dead, auxk_relu=relu)
    auxk = st.terms["auxk"]
    assert auxk > 0
    # written out: each token's d_in/2 = 8 dead latents with the largest pre-activation decode the error
    out = sae(x, valid, train=True)
    e = ((x - out.x_hat) * sae.scale)[valid]
    pre = sae.pre_acts(x, valid)[valid][:, dead]
    top = pre.topk(8, dim=-1)
    z = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values) if relu else top.values)
    assert torch.allclose(auxk, (z @ sae.W_dec[dead] - e).pow(2).sum() / e.pow(2).sum(), rtol=1e-4)
    g = torch.autograd.grad(auxk, sae.W_enc)[0]
    assert g[:, dead].abs().sum() > 0 and not g[:, ~dead].any(), "AuxK trains the dead latents' encoders only"


@pytest.mark.parametrize("relu", [False, True])
def test_auxk_reaches_a_latent_whose_pre_activations_are_all_negative_only_without_relu(relu):
    """The footgun behind the w=4 dead latents: a truly dead latent's pre-activation is below 0 on every
    token, so with the ReLU after the auxiliary top-k its encoder gets exactly no gradient."""
    sae, x, valid = topk_sae(3)
    with torch.no_grad():
        sae.b_enc[:8] = -1e3  # latents 0..7: pre-activation far below 0 everywhere
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:8] = True
    assert (sae.pre_acts(x, valid)[valid][:, dead] < 0).all()
    auxk = ex.step_losses(sae, x, valid, autocast=False, dead_F=dead, auxk_relu=relu).terms["auxk"]
    g_W, g_b = torch.autograd.grad(auxk, [sae.W_enc, sae.b_enc], allow_unused=True)
    assert (g_b[:8].abs().sum() > 0) == (not relu) and (g_W[:, :8].abs().sum() > 0) == (not relu)


def test_contrastive_weight_zero_is_exactly_off():
    """contrastive 0 with any n_high is the plain objective, bit for bit, and computes no T-SAE term."""
    states = []
    for n_high in (0, 13):
        sae, x, valid = topk_sae(2)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        logs = ex.train_step(sae, opt, x, valid, 0.0, 1e-2, autocast=False, contrastive=0.0, n_high=n_high)
        assert "contrastive" not in logs and "mse_high" not in logs
        states.append(sae.state_dict())
    for name, a in states[0].items():
        assert torch.equal(a, states[1][name]), name


def test_threshold_is_a_running_average_of_the_smallest_kept_value():
    sae, x, valid = topk_sae()
    ex.track_threshold(sae, 0.5, 0.0)  # the first step
    assert torch.equal(sae.threshold, torch.full((64,), 0.5))
    ex.track_threshold(sae, 1.5, 0.9)
    assert torch.allclose(sae.threshold, torch.full((64,), 0.9 * 0.5 + 0.1 * 1.5))
    ex.track_threshold(sae, float("inf"), 0.9)  # nothing positive kept: unchanged
    assert torch.allclose(sae.threshold, torch.full((64,), 0.9 * 0.5 + 0.1 * 1.5))
    assert ex.threshold_decay(10_000) == 0.99 and ex.threshold_decay(780) == 1 - 1 / 39 and ex.threshold_decay(5) == 0
    st = ex.step_losses(sae, x, valid, autocast=False)
    f = sae(x, valid, train=True).f
    assert st.min_kept == f[f > 0].min()


@pytest.mark.parametrize("window", [1, 3])
def test_batchtopk_training_reaches_l0_k_and_a_threshold_that_keeps_it(tmp_path, window):
    acts, mask = sparse_rows()
    cfg = ex.Config(out_dir=str(tmp_path), d_sae=64, window=window, d_head=8, train_tokens=40 * 16 * 10,
                    batch_tokens=128, lr=3e-3, sae_autocast=False, activation="batchtopk", k=4, contrastive=0.1)
    sae = ex.train_sae(cfg, acts, mask, torch.device("cpu"), tmp_path)
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(l["l0"] == 4 for l in log) and {"auxk", "mse_high", "contrastive", "threshold"} <= set(log[-1])
    assert log[-1]["fve"] > 0.5 and sae.threshold[0] == log[-1]["threshold"] > 0
    l0 = (sae.encode(acts, mask)[mask] > 0).sum(-1).float().mean()
    assert 2 < l0 < 8, l0  # the inference threshold keeps about k per token
    again = ex.load_sae(tmp_path)
    assert again.activation == "batchtopk" and again.k == 4 and torch.equal(again.threshold, sae.threshold)
    assert torch.equal(again.encode(acts[:3], mask[:3]), sae.encode(acts[:3], mask[:3]))
    assert json.loads((tmp_path / "cfg.json").read_text()) == {"d_in": 16, "d_sae": 64, "window": window,
                                                                "d_head": 8, "activation": "batchtopk", "k": 4}


@pytest.mark.parametrize("k", [0, 65, True, "4", None])
def test_a_batchtopk_cfg_needs_a_valid_k(tmp_path, k):
    cfg = {"d_in": 16, "d_sae": 64, "window": 1, "d_head": 8, "activation": "batchtopk"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | ({} if k is None else {"k": k})))
    with pytest.raises(ex.UsageError, match="'k' must be an integer in"):
        ex.read_sae_cfg(tmp_path)

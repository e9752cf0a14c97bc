"""Pure metric functions, each on values computed by hand."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import experiment as ex


def test_stderr_is_sample_std_over_sqrt_n():
    assert ex.stderr([1.0, 2.0, 3.0, 4.0]) == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert ex.stderr([5.0]) == 0.0


def test_fve_perfect_and_mean_only():
    x = torch.randn(50, 4)
    assert ex.frac_variance_explained(x, x) == pytest.approx(1.0)
    assert ex.frac_variance_explained(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-6)


def test_ce_loss_recovered():
    assert ex.ce_loss_recovered(2.0, 2.0, 10.0) == 1.0
    assert ex.ce_loss_recovered(2.0, 10.0, 10.0) == 0.0
    assert ex.ce_loss_recovered(2.0, 4.0, 10.0) == pytest.approx(0.75)


def test_auroc_by_hand():
    assert ex.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert ex.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert ex.auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    # pos {0.4, 0.8} vs neg {0.1, 0.4}: pairs won 1 + 0.5 (tie) + 1 + 1 = 3.5 of 4
    assert ex.auroc([0.4, 0.8, 0.1, 0.4], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)
    assert math.isnan(ex.auroc([1.0, 2.0], [1, 1]))


def test_precision_recall_f1():
    p, r, f = ex.precision_recall_f1([1, 1, 0, 0], [1, 0, 1, 0])
    assert (p, r, f) == (0.5, 0.5, 0.5)
    assert ex.precision_recall_f1([0, 0], [1, 0]) == (0.0, 0.0, 0.0)


def test_detector_on_the_passage_exactly_has_recall_one_and_delay_zero():
    label = np.array([0, 0, 1, 1, 1, 0])
    assert ex.precision_recall_f1(label, label) == (1.0, 1.0, 1.0)
    assert ex.detection_delay(label, label) == 0.0
    assert ex.detection_delay([0, 0, 0, 0, 1, 1], label) == 2.0
    assert ex.detection_delay([1, 0, 0, 0, 0, 1], label) is None


def test_regions_and_precision_auroc_by_hand():
    # one row: BOS, 2 text tokens, a 3-token passage, 2 text tokens, one pad; scored = next token real
    label = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    rows = ex.Rows(torch.zeros(1, 9, dtype=torch.long), attn, attn, torch.zeros(1, dtype=torch.long), label)
    kl = torch.arange(8.0)[None]  # position t's value is t; position 7 predicts the pad: not scored
    r = ex.by_region(kl, rows)
    assert r["inside"].tolist() == [3, 4, 5] and r["before"].tolist() == [0, 1, 2]
    assert r["after"].tolist() == [6] and r["outside"].tolist() == [0, 1, 2, 6]
    assert ex.precision_auroc(r["inside"], r["outside"]) == 0.75  # 9 of 12 pairs ordered, 3 below 6
    assert ex.precision_auroc(torch.ones(3), torch.zeros(4)) == 1.0
    assert ex.precision_auroc(torch.zeros(3), torch.zeros(4)) == 0.5


def test_token_kl_zero_for_same_logits_and_known_value():
    logits = torch.randn(5, 7)
    assert torch.allclose(ex.token_kl(logits, logits), torch.zeros(5), atol=1e-6)
    p, q = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3)]])  # (1/2,1/2) vs (1/4,3/4)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert ex.token_kl(p, q).item() == pytest.approx(expected, rel=1e-5)


def test_fused_ce_kl_equals_log_softmax_reference():
    """ce_kl takes CE and KL from one logsumexp; the textbook forms give the same numbers."""
    g = torch.Generator().manual_seed(0)
    clean, new = torch.randn(6, 50, generator=g) * 4, torch.randn(6, 50, generator=g) * 4
    target = torch.randint(0, 50, (6,), generator=g)
    ce, kl = ex.ce_kl(new, target, ex.clean_dist(clean))
    lp, lq = F.log_softmax(clean, -1), F.log_softmax(new, -1)
    assert torch.allclose(ce, F.cross_entropy(new, target, reduction="none"), atol=1e-5)
    assert torch.allclose(kl, (lp.exp() * (lp - lq)).sum(-1), atol=1e-5)
    assert ex.ce_kl(new, None, None) == (None, None)


def test_kl_from_the_expected_output_embedding_equals_the_probabilities_form():
    """For a linear head z = W h, sum_v p_v z_v = (sum_v p_v W_v) . h: the clean distribution kept as D
    numbers a position gives the KL that its V probabilities give."""
    g = torch.Generator().manual_seed(1)
    W, h_clean, h_new = torch.randn(300, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    clean, new = h_clean @ W.T, h_new @ W.T
    target = torch.randint(0, 300, (8,), generator=g)
    ce_p, kl_p = ex.ce_kl(new, target, ex.clean_dist(clean))
    ref = ex.clean_dist(clean, W)
    assert ref.p is None and ref.e.shape == (8, 16)
    ce_e, kl_e = ex.ce_kl(new, target, ref, h_new)
    assert torch.equal(ce_p, ce_e) and kl_p.gt(0.1).all()
    assert torch.allclose(kl_e, kl_p, atol=1e-4, rtol=1e-5)
    assert torch.allclose(ex.ce_kl(clean, None, ref, h_clean)[1], torch.zeros(8), atol=1e-4)
    with pytest.raises(AssertionError):
        ex.ce_kl(new, target, ref)  # the hidden states are needed


def test_kl_at_a_real_vocabulary_size_is_accurate_near_zero():
    """A retain-KL budget of 1e-3 nats is the difference of sums of 49k terms of size ~30: in fp32 those
    sums carried about 1e-3 nats of error a position. Both forms must stay within 5e-5 of float64."""
    g = torch.Generator().manual_seed(2)
    V, D = 49152, 64
    W = torch.randn(V, D, generator=g) * 0.3
    h = torch.randn(16, D, generator=g) * 3  # logits up to ~50 and spread over tens of nats, like SmolLM2's
    clean = h @ W.T
    assert 30 < float(clean.max()) < 60 and float((clean.max(-1).values - clean.median(-1).values).min()) > 20
    for rel in (1e-4, 1e-2):
        h_new = h + torch.randn(16, D, generator=g) * h.norm(dim=-1, keepdim=True) * rel
        new = h_new @ W.T
        lc, ln = F.log_softmax(clean.double(), -1), F.log_softmax(new.double(), -1)
        ref = (lc.exp() * (lc - ln)).sum(-1)
        kl_p = ex.ce_kl(new, None, ex.clean_dist(clean))[1]
        kl_e = ex.ce_kl(new, None, ex.clean_dist(clean, W), h_new)[1]
        for kl in (kl_p, kl_e):
            assert (kl.double() - ref).abs().max() < 5e-5, (rel, float((kl.double() - ref).abs().max()))


def test_linear_head_only_for_an_exact_fp32_linear_head():
    cfg = SimpleNamespace(final_logit_softcapping=None)
    head = lambda m: SimpleNamespace(get_output_embeddings=lambda: m, config=cfg)
    lin = torch.nn.Linear(4, 10, bias=False)
    assert ex.linear_head(head(lin)) is lin.weight
    assert ex.linear_head(head(torch.nn.Linear(4, 10))) is None                        # a bias
    assert ex.linear_head(head(torch.nn.Linear(4, 10, bias=False).bfloat16())) is None  # rounds each logit
    cfg.final_logit_softcapping = 30.0
    assert ex.linear_head(head(lin)) is None                                            # tanh softcap


def test_mean_pool_averages_unmasked_tokens_only():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 5.0], [7.0, 7.0], [9.0, 9.0]]])
    m = torch.tensor([[True, True, False], [False, False, False]])
    assert torch.equal(ex.mean_pool(x, m), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))


def test_temporal_consistency_in_latent_chunks_equals_all_at_once():
    """More latents than one chunk (256): the chunked float64 sums give the one-shot formulas."""
    g = torch.Generator().manual_seed(0)
    f, valid = torch.relu(torch.randn(5, 20, 600, generator=g)), torch.rand(5, 20, generator=g) > 0.2
    pair = valid[:, 1:] & valid[:, :-1]
    a, b = f[:, :-1][pair].double(), f[:, 1:][pair].double()
    am, bm = a - a.mean(0), b - b.mean(0)
    denom = (am.pow(2).sum(0) * bm.pow(2).sum(0)).sqrt()
    tc = ex.temporal_consistency(f, valid)
    assert tc["smoothness"] == pytest.approx(float((b - a).abs().mean() / a.abs().mean()), rel=1e-9)
    assert tc["lag1_autocorr"] == pytest.approx(float(((am * bm).sum(0)[denom > 0] / denom[denom > 0]).mean()), rel=1e-9)


def test_temporal_consistency_by_hand():
    f = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])  # constant latent 0, dead latent 1
    valid = torch.ones(1, 3, dtype=torch.bool)
    tc = ex.temporal_consistency(f, valid)
    assert tc["smoothness"] == 0.0 and tc["jaccard"] == 1.0
    f = torch.tensor([[[1.0], [0.0], [1.0], [0.0]]])  # alternating
    tc = ex.temporal_consistency(f, torch.ones(1, 4, dtype=torch.bool))
    assert tc["smoothness"] == pytest.approx(1 / (2 / 3)) and tc["jaccard"] == 0.0
    assert tc["lag1_autocorr"] == pytest.approx(-1.0)


def test_sparsity_and_selection_follow_saebench():
    f = torch.zeros(1, 4, 5)
    f[0, :, 0] = 1       # on everywhere
    f[0, :2, 1] = 1      # half
    f[0, :1, 2] = 1      # quarter
    mask = torch.ones(1, 4, dtype=torch.bool)
    sp = ex.sparsity(f, mask)
    assert sp.tolist() == [1.0, 0.5, 0.25, 0.0, 0.0]
    retain = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0])
    assert ex.select_features(sp, retain, 3, 0.01).tolist() == [1, 2]  # 0 dropped, zero-forget ones left out


def test_unlearning_score_uses_only_points_that_keep_retain():
    pts = [dict(forget_acc=0.2, retain_acc=0.95, multiplier=1), dict(forget_acc=0.6, retain_acc=0.99, multiplier=2),
           dict(forget_acc=0.7, retain_acc=1.0, multiplier=3)]
    score, best = ex.unlearning_score(pts, 0.99)
    assert score == pytest.approx(0.4) and best["multiplier"] == 2
    assert ex.unlearning_score(pts[:1], 0.99) == (0.0, None)


def plain(valid):
    return ex.make_time(valid)


def test_gate_rule_and_windows():
    f = torch.zeros(1, 6, 2)
    f[0, 1, 0] = 1.0
    f[0, 5, 1] = 2.0
    valid = torch.ones(1, 6, dtype=torch.bool)
    gate = lambda lags: ex.clamp_where(ex.Clamp("gate", torch.tensor([0, 1]), 1.0, lags, None, None, 0.0),
                                       None, torch.zeros(1, 6, 4), plain(valid), f).any(-1)
    assert gate(4).tolist() == [[False] * 6]  # never 2 active in a 4-window
    f[0, 3, 0] = 1.0
    assert gate(4)[0].tolist() == [False, False, False, True, False, True]  # clamps only where a latent is on
    assert gate(1)[0].tolist() == [False, True, False, True, False, True]
    w = ex.windows_of(f, plain(valid), 2)
    assert w.shape == (1, 6, 4) and torch.equal(w[0, 2], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_dsg_rho_by_hand():
    """DSG: rho = fraction of a row's tokens where any selected latent is on; the whole row is clamped
    (all selected latents, where any is on) when rho > tau. dsg_causal uses the prefix's rho."""
    f = torch.zeros(1, 5, 2)
    f[0, 1, 0] = 1.0  # on at t=1 and t=4: rho = 2/4 over the 4 valid tokens (t=0 is BOS)
    f[0, 4, 1] = 3.0
    valid = torch.tensor([[False, True, True, True, True]])
    where = lambda s, tau: ex.clamp_where(ex.Clamp(s, torch.tensor([0, 1]), 1.0, 4, None, None, tau),
                                          None, torch.zeros(1, 5, 4), plain(valid), f)
    assert where("dsg", 0.49).all(-1)[0].tolist() == [False, True, False, False, True]
    assert not where("dsg", 0.5).any()
    # prefix rho: t=1: 1/1, t=2: 1/2, t=3: 1/3, t=4: 2/4
    assert where("dsg_causal", 0.45).any(-1)[0].tolist() == [False, True, False, False, True]
    assert where("dsg_causal", 0.6).any(-1)[0].tolist() == [False, True, False, False, False]


def test_pattern_clamp_dense_takes_every_selected_latent_where_the_detector_fires():
    """--pattern_clamp all: where the detector fires, all k latents (on or off) are clamped; where it
    does not, pattern clamps nothing and hybrid only its far-above-retain latents. active: only those on."""
    f = torch.zeros(1, 4, 3)
    f[0, 1, 0] = 1.0
    f[0, 3, 2] = 0.9  # off-pattern but above hi (0.5): hybrid's second rule
    fires = torch.tensor([[False, True, True, False]]).unsqueeze(-1)
    active = f > 0
    c = ex.Clamp("pattern", torch.tensor([0, 1, 2]), 1.0, 4, None, torch.full((3,), 0.5), 0.0)
    assert ex.pattern_where(c, active, fires, f).sum().item() == 1  # t=1, latent 0 only
    dense = ex.pattern_where(c._replace(dense=True), active, fires, f)
    assert dense[0].tolist() == [[False] * 3, [True] * 3, [True] * 3, [False] * 3]
    hyb = ex.pattern_where(c._replace(strategy="hybrid", dense=True), active, fires, f)
    assert hyb[0].tolist() == [[False] * 3, [True] * 3, [True] * 3, [False, False, True]]
    assert ex.pattern_where(c._replace(strategy="hybrid"), active, fires, f)[0].tolist() == \
        [[False] * 3, [True, False, False], [False] * 3, [False, False, True]]


def test_a_ramp_scales_the_clamp_with_the_evidence():
    """--pattern_ramp: the gain rises linearly from 0 at the threshold to 1 at threshold + ramp; ramp 0
    is the hard gate (bool); pattern_where and clamp_delta carry the fraction, hybrid's off-pattern rule
    stays whole."""
    det = ex.LagDetector(None, torch.zeros(1, 1), 0.0, 2.0, 1.0, ramp=2.0)
    ev = torch.tensor([[0.0, 1.0, 2.0, 3.0, 5.0, 5.0]])
    valid = torch.tensor([[True] * 5 + [False]])
    is_open = ex.gate_open(det, ev, ex.make_time(valid))
    assert ex.evidence_gain(det, ev, is_open).tolist() == [[0.0, 0.0, 0.5, 1.0, 1.0, 0.0]]
    hard = ex.evidence_gain(det._replace(ramp=0.0), ev, is_open)
    assert hard.dtype == torch.bool and hard.tolist() == [[False, True, True, True, True, False]]
    f = torch.tensor([[[1.0, 0.0], [0.0, 0.9]]])  # (1, 2, 2): latent 0 on at t=0, latent 1 at t=1
    gain = torch.tensor([[0.5, 0.0]]).unsqueeze(-1)
    c = ex.Clamp("pattern", torch.tensor([0, 1]), 3.0, 4, None, torch.tensor([1.5, 0.5]), 0.0)
    assert ex.pattern_where(c, f > 0, gain, f).tolist() == [[[0.5, 0.0], [0.0, 0.0]]]
    assert ex.pattern_where(c._replace(dense=True), f > 0, gain, f).tolist() == [[[0.5, 0.5], [0.0, 0.0]]]
    # hybrid: latent 1 at t=1 is above its hi (0.5) off-pattern, clamped in full; latent 0 is below its 1.5
    assert ex.pattern_where(c._replace(strategy="hybrid"), f > 0, gain, f).tolist() == [[[0.5, 0.0], [0.0, 1.0]]]
    w = ex.pattern_where(c._replace(dense=True), f > 0, gain, f)
    # half the way from the clean value to -3: latent 0 from 1 to -1, latent 1 from 0 to -1.5
    assert ex.clamp_delta(w, f, 3.0).tolist() == [[[-2.0, -1.5], [0.0, 0.0]]]
    assert torch.equal(ex.clamp_delta(w > 0, f, 3.0), torch.where(w > 0, -3.0 - f, torch.zeros_like(f)))


def test_a_steer_adds_the_direction_where_the_clamp_would_act():
    """--pattern_edit steer: resid + u * multiplier / scale * direction, u the position's largest fraction
    of the clamp (1 under a hard gate); positions the clamp spares stay bit-identical."""
    sae = ex.TemporalSAE(4, 6, window=1)
    with torch.no_grad():
        sae.scale.fill_(0.5)
    x = torch.randn(1, 3, 4)
    f = torch.zeros(1, 3, 2)
    v = torch.tensor([0.0, 1.0, 0.0, 0.0])
    hard = torch.tensor([[[True, False], [False, False], [False, True]]])
    y = ex.apply_plan(sae, torch.tensor([0, 1]), ex.Plan(hard, f), 3.0, x, v)
    assert torch.equal(y[0, 1], x[0, 1])
    assert torch.allclose(y[0, 0] - x[0, 0], 6.0 * v) and torch.allclose(y[0, 2] - x[0, 2], 6.0 * v)
    ramp = torch.tensor([[[0.25, 0.5], [0.0, 0.0], [1.0, 0.0]]])
    y = ex.apply_plan(sae, torch.tensor([0, 1]), ex.Plan(ramp, f), 3.0, x, v)
    assert torch.allclose(y[0, 0] - x[0, 0], 3.0 * v) and torch.equal(y[0, 1], x[0, 1])
    assert not torch.equal(ex.apply_plan(sae, torch.tensor([0, 1]), ex.Plan(hard, f), 3.0, x), y)  # the clamp differs


def test_the_steer_direction_points_from_forget_to_retain_fitting_rows():
    """steer_direction: a unit vector along mean(retain) - mean(forget) over the training rows outside the
    calibration documents and over valid tokens only (a padded position or a calibration row moves nothing)."""
    def corpus(value, n=8):
        acts = torch.zeros(n, 3, 2)
        acts[..., 0] = value
        mask = torch.tensor([[False, True, True]] * n)
        acts[:, 0, 1] = 100.0  # BOS: never a token
        cal = ex.calibration_rows(ex.Rows(torch.zeros(n, 3), mask, mask, torch.arange(n), mask))
        acts[cal, :, 1] = -50.0  # calibration rows: held back
        rows = ex.Rows(torch.zeros(n, 3, dtype=torch.long), mask, mask, torch.arange(n), mask)
        return ex.Corpus([], [], rows, rows, acts, acts)
    v = ex.steer_direction(corpus(2.0), corpus(-1.0))
    assert torch.allclose(v, torch.tensor([-1.0, 0.0]))


def test_boundary_tokens_are_the_windows_that_read_both_domains():
    """--detector_boundary fits on the first `window` tokens of a passage and of the text after it
    (their window t-window+1..t reads both domains); BOS and pads never count."""
    label = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
                          [0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    mask = torch.ones_like(label)
    mask[:, 0] = False
    mask[1, 10:] = False  # pads
    got = ex.boundary_tokens(label, mask, window=3)
    assert torch.nonzero(got[0]).flatten().tolist() == [3, 4, 5, 8, 9, 10]
    # row 1: the passage starts at the first token after BOS (no boundary there: BOS is no text)
    assert torch.nonzero(got[1]).flatten().tolist() == [7, 8, 9]
    assert torch.equal(ex.boundary_tokens(label, mask, window=1), got & torch.tensor(
        [[0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool))


def test_weighted_logistic_doubling_every_weight_halves_the_penalty():
    """fit_logistic's row weights multiply the log-loss: weight 2 everywhere at l2 = 1 is the same
    objective, up to a factor 2, as weight 1 at l2 = 0.5; weight 1 is no weight."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=g)
    y = (X[:, 0] + 0.5 * torch.randn(200, generator=g) > 0).float()
    a = ex.fit_logistic(X, y, l2=1.0, weight=torch.full((200,), 2.0))
    b = ex.fit_logistic(X, y, l2=0.5)
    assert torch.allclose(a.w, b.w, atol=1e-6) and torch.allclose(a.b, b.b, atol=1e-6)
    c = ex.fit_logistic(X, y, l2=1.0, weight=torch.ones(200))
    assert torch.equal(c.w, ex.fit_logistic(X, y, l2=1.0).w)
    assert not torch.allclose(a.w, c.w, atol=1e-3)


def test_ema_pools_over_predecessors_only():
    x = torch.tensor([[0.0, 4.0, 0.0, 0.0, 8.0]])
    valid = torch.tensor([[False, True, True, True, True]])
    tm = plain(valid)
    assert torch.equal(ex.ema(x, tm, 1.0), x * valid)
    # horizon 2: weights 1, 1/2, 1/4 ... over valid predecessors, normalised
    e = ex.ema(x, tm, 2.0)[0]
    assert e[1] == pytest.approx(4.0) and e[2] == pytest.approx((0 + 0.5 * 4) / 1.5)
    assert ex.ema(x, tm, math.inf)[0, 4] == pytest.approx(12 / 4)


def test_threshold_keeps_the_false_positive_rate_on_its_data():
    g = torch.Generator().manual_seed(0)
    for fpr in (0.01, 0.05, 0.2):
        v = torch.randn(5000, generator=g)
        v[:300] = 1.5  # ties at the cut must not push the rate over
        thr = ex.threshold_for_fpr(v, fpr)
        assert (v >= thr).float().mean() <= fpr
        assert (v >= thr - 1e-3).float().mean() > fpr * 0.5


def retain_rows(N: int, T: int):
    """(acts, mask, rows) of N plain retain rows of T positions, BOS first, one document per row."""
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[:, 0] = False
    rows = ex.Rows(torch.zeros(N, T, dtype=torch.long), torch.ones(N, T, dtype=torch.bool), mask,
                   torch.arange(N), torch.zeros(N, T, dtype=torch.bool))
    return torch.randn(N, T, 8), mask, rows


def test_row_calibration_bounds_the_rows_that_fire():
    """unit="row": at most `fpr` of the calibration retain rows (every 4th document's) fire anywhere; the
    other rows are never read; the per-token threshold at the same fpr lets more rows fire."""
    torch.manual_seed(0)
    sae = ex.TemporalSAE(8, 16, window=1, d_head=4)
    det = ex.LagDetector(None, torch.randn(8, 2), 0.0, 2.0, 0.0)
    acts, mask, rows = retain_rows(160, 24)
    retain = ex.Corpus([], [], rows, rows, acts, acts)
    cal = ex.calibration_rows(rows)
    s, tm = ex.plain_scores(det, sae, acts[cal], mask[cal])
    ev = ex.pool(det, s, tm).masked_fill(~tm.valid, -math.inf)
    for fpr in (0.05, 0.2):
        thr_row = ex.calibrate(det, sae, retain, fpr, unit="row").threshold
        thr_tok = ex.calibrate(det, sae, retain, fpr).threshold
        rows_firing = (ev >= thr_row).any(1).float().mean()
        assert 0 < rows_firing <= fpr
        assert thr_row > thr_tok and (ev >= thr_tok).any(1).float().mean() > rows_firing
    other = acts.clone()
    other[~cal] = 100.0  # rows outside the calibration documents do not move the threshold
    assert ex.calibrate(det, sae, retain._replace(acts_train=other), 0.05, unit="row") == ex.calibrate(det, sae, retain, 0.05, unit="row")


def test_position_threshold_fires_at_the_rate_in_every_bucket():
    """--detector_fpr_unit position: on the calibration retain rows each position bucket (tokens 1-32,
    33-64, 65+ after BOS) fires on at most fpr of its tokens, and not on none; one threshold for all
    positions would not (the scores here are made to fall with position, as false alarms do); rows
    outside the calibration documents never move it, and pool takes each bucket's offset off."""
    torch.manual_seed(0)
    sae = ex.TemporalSAE(8, 16, window=1, d_head=4)
    det = ex.LagDetector(None, torch.zeros(8, 1).index_fill_(0, torch.tensor([0]), 1.0), 0.0, 1.0, 0.0)  # score = acts[..., 0]
    T = 100
    acts, mask, rows = retain_rows(200, T)
    acts[:, 1:33, 0] += 2.0  # early tokens score higher on retain text
    retain = ex.Corpus([], [], rows, rows, acts, acts)
    cal = ex.calibration_rows(rows)
    fpr = 0.05
    tok, pos = ex.calibrate(det, sae, retain, fpr), ex.calibrate(det, sae, retain, fpr, unit="position")
    assert tok.offsets == () and len(pos.offsets) == 3 and pos.offsets[-1] == 0.0 and pos.offsets[0] > 0
    s, tm = ex.plain_scores(det, sae, acts[cal], mask[cal])
    n = ex.valid_count(tm)
    assert int(n[0, 1]) == 1 and int(n[0, -1]) == T - 1
    for d, per_bucket in ((pos, True), (tok, False)):
        fires = (ex.pool(d, s, tm) >= d.threshold) & tm.valid
        rates = [float(fires[(n >= lo) & (n < hi)].float().mean()) for lo, hi in ((1, 33), (33, 65), (65, T))]
        assert all(0 < r <= fpr + 1e-6 for r in rates) == per_bucket, (d.offsets, rates)
    ev_raw = ex.pool(det, s, tm)
    assert torch.allclose(ex.pool(pos, s, tm)[:, 1:33], ev_raw[:, 1:33] - pos.offsets[0])
    assert torch.equal(ex.pool(pos, s, tm)[:, 65:], ev_raw[:, 65:])
    other = acts.clone()
    other[~cal] = 100.0
    assert ex.calibrate(det, sae, retain._replace(acts_train=other), fpr, unit="position") == pos


def test_lag_detector_is_causal():
    """A detector's score at t never changes when tokens after t change (plain rows and a tree)."""
    torch.manual_seed(0)
    sae = ex.TemporalSAE(8, 16, window=3, d_head=4)
    det = ex.LagDetector(torch.tensor([1, 4, 7]), torch.randn(3, 4), 0.3, 4.0, 0.0)
    res = ex.LagDetector(None, torch.randn(8, 4), -0.1, 8.0, 0.0)
    both = ex.LagDetector(torch.tensor([1, 4, 7]), torch.randn(11, 4), 0.2, 2.0, 0.0, resid=True)
    x = torch.randn(2, 10, 8)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[:, 0] = False
    prev = torch.tensor([[-1, 0, 1, 2, 3, 4, 5, 6, 7, 8], [-1, 0, 1, 2, 3, 3, 5, 3, 7, 8]])  # row 2 branches at 3
    for tm in (ex.make_time(valid), ex.make_time(valid, prev)):
        for d in (det, res, both):
            ev = ex.ema(ex.token_score(d, sae, x, tm), tm, d.horizon)
            for t in range(9):
                later = torch.ones(2, 10, dtype=torch.bool)
                later[:, :t + 1] = False
                x2 = x.clone()
                x2[later] += 5 * torch.randn_like(x2[later])
                ev2 = ex.ema(ex.token_score(d, sae, x2, tm), tm, d.horizon)
                assert torch.allclose(ev2[:, :t + 1], ev[:, :t + 1], atol=1e-5), (t, d.idx)


def test_pareto_front_and_interpolation_by_hand():
    pts = [(0.2, 0.02, 0.002), (0.6, 0.10, 0.01), (0.5, 0.20, 0.0), (1.2, 0.30, 0.03)]  # (0.5, 0.2) is dominated
    front = ex.pareto_front(pts)
    assert front == [(0.0, 0.0, 0.0), (0.2, 0.02, 0.002), (0.6, 0.10, 0.01), (1.2, 0.30, 0.03)]
    y, e = ex.frontier_at(front, 0.4)  # halfway from (0.2, 0.02) to (0.6, 0.10)
    assert y == pytest.approx(0.06) and e == pytest.approx(0.006)
    assert ex.frontier_at(front, 0.1)[0] == pytest.approx(0.01)  # from the clean model (0, 0)
    assert ex.frontier_at(front, 1.2)[0] == pytest.approx(0.30)
    assert ex.frontier_at(front, 1.5) is None  # never reached: no extrapolation
    assert ex.frontier_within(front, 0.06) == pytest.approx(0.4)
    assert ex.frontier_within(front, 0.01) == pytest.approx(0.1)
    assert ex.frontier_within(front, 1.0) == pytest.approx(1.2)  # the whole front fits: its largest x


def test_frontier_when_retain_damage_is_zero():
    front = ex.pareto_front([(0.3, 0.0, 0.0), (0.9, 0.05, 0.0)])
    assert front[0] == (0.3, 0.0, 0.0)  # dominates the clean model
    assert ex.frontier_at(front, 0.25)[0] == 0.0 and ex.frontier_within(front, 0.0) == pytest.approx(0.3)


def test_precision_at_matched_forgetting_breaks_retain_kl_ties_by_forget_ce():
    """A gate that never touches the retain rows has retain KL 0 everywhere: the precision read at
    +0.5 comes from the point nearest that level, not the first in sweep order."""
    pt = lambda ce, kl, prec: {"forget_ce_increase": ce, "retain_kl": kl, "retain_kl_stderr": 0.0,
                               "spliced_kl_after": kl, "spliced_kl_after_stderr": 0.0, "precision_auroc": prec}
    pts = [pt(3.0, 0.0, 0.40), pt(0.2, 0.0, 0.95), pt(0.7, 0.0, 0.80), pt(0.6, 0.1, 0.99)]
    assert ex.frontier_entry(pts, pts)["means"]["precision_auroc_at_ce_0.5"] == 0.80
    assert ex.frontier_entry(pts[1:2], pts)["means"]["precision_auroc_at_ce_0.5"] is None


def test_aggregate_seeds_mean_and_stderr_over_seeds():
    infos = [{"a": {"means": {"x": v, "y": y}, "stderrs": {"x": 9.0, "y": 0.0}}}
             for v, y in ((1.0, 2.0), (2.0, None), (6.0, 1.0))]
    agg = ex.aggregate_seeds(infos)
    assert agg["a"]["means"]["x"] == pytest.approx(3.0)
    assert agg["a"]["stderrs"]["x"] == pytest.approx(np.std([1, 2, 6], ddof=1) / math.sqrt(3))
    assert agg["a"]["means"]["y"] is None and agg["a"]["stderrs"]["y"] is None
    assert agg["seeds"]["means"]["n_seeds"] == 3.0


def test_pearson_and_template_detector_fire_on_template():
    t = torch.tensor([[0.0, 1.0, 0.0, 2.0]])
    assert ex.pearson_rows(t, t).item() == pytest.approx(1.0)
    assert ex.pearson_rows(t, -t).item() == pytest.approx(-1.0)
    det = ex.Templates(t, lags=2, horizon=1.0, threshold=0.95)  # the half-window at t=2 correlates 0.87
    f = torch.zeros(1, 5, 2)
    f[0, 2] = torch.tensor([0.0, 1.0])
    f[0, 3] = torch.tensor([0.0, 2.0])
    tm = plain(torch.ones(1, 5, dtype=torch.bool))
    assert ex.detector_fires(det, None, None, tm, f)[0].tolist() == [False, False, False, True, False]


def test_templates_recover_clusters():
    a, b = torch.tensor([1.0, 0, 0, 2]), torch.tensor([0, 3.0, 1, 0])
    data = torch.cat([a + 0.01 * torch.randn(20, 4), b + 0.01 * torch.randn(20, 4)])
    c = ex.fit_templates(data, 2, seed=0)
    best = ex.pearson_rows(torch.stack([a, b]), c).max(-1).values
    assert (best > 0.99).all()


def test_batched_active_fraction_equals_sparsity():
    sae = ex.TemporalSAE(8, 16, window=3, d_head=4)
    acts, mask = torch.randn(70, 6, 8), torch.rand(70, 6) > 0.2
    full = ex.sparsity(ex.encode_all(sae, acts, mask), mask)
    assert torch.allclose(ex.active_fraction(sae, acts, mask, rows=16), full)


def test_lag_design_gathers_the_shifted_features():
    """Rows of the detector's design = features at t and its predecessors, 0 before the row's start
    and at masked positions; the same as shifting the masked features (the reference)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 7, 5, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.2
    pick = torch.rand(3, 7, generator=g) > 0.5
    ref = torch.cat([ex.lagged(feats * mask.unsqueeze(-1), s)[pick] for s in range(3)], dim=-1)
    assert torch.equal(ex.lag_design(feats, mask, 3, pick), ref)
    out = torch.full((int(pick.sum()), 15), 7.0)
    ex.lag_design(feats, mask, 3, pick, out)
    assert torch.equal(out, ref)


def test_hmm_filter_by_hand():
    """L_t = llr_t + g(L_prev), g(L) = log(((1-q) e^L + q) / (q e^L + 1-q)); BOS and pads pass the
    state on; the state is bounded near log((1-q)/q) plus one token's evidence."""
    q = 0.1
    g = lambda L: math.log(((1 - q) * math.exp(L) + q) / (q * math.exp(L) + 1 - q))
    llr = torch.tensor([[9.0, 1.0, 2.0, -3.0, 7.0]])
    valid = torch.tensor([[False, True, True, True, False]])
    L = ex.hmm_filter(llr, plain(valid), q)[0].tolist()
    assert L[0] == 0.0 and L[1] == pytest.approx(1.0)
    assert L[2] == pytest.approx(2.0 + g(1.0)) and L[3] == pytest.approx(-3.0 + g(L[2]))
    assert L[4] == pytest.approx(L[3])  # a pad keeps the state
    long = ex.hmm_filter(torch.full((1, 60), 2.0), plain(torch.ones(1, 60, dtype=torch.bool)), 0.01)[0]
    assert long[-1] < 2.0 + math.log(0.99 / 0.01) + 1e-4 and long[-1] > long[3]
    # q = 1/2: the domain is memoryless, so the state is the token's own evidence
    memoryless = ex.hmm_filter(llr, plain(valid), 0.5 - 1e-9)
    assert torch.allclose(memoryless[valid], llr[valid], atol=1e-6)


def test_hmm_filter_follows_predecessors_in_a_tree():
    """Two branches after a shared prompt each start from the prompt's state, never each other's."""
    llr = torch.tensor([[0.0, 1.0, 1.0, 5.0, -5.0]])
    valid = torch.tensor([[False, True, True, True, True]])
    prev = torch.tensor([[-1, 0, 1, 2, 2]])  # positions 3 and 4 both follow 2
    L = ex.hmm_filter(llr, ex.make_time(valid, prev), 0.05)[0]
    chain = ex.hmm_filter(llr[:, :4], plain(valid[:, :4]), 0.05)[0]
    assert torch.allclose(L[:4], chain)
    assert L[4] == pytest.approx(-5.0 + (L[3] - 5.0).item(), abs=1e-5)


def test_cusum_by_hand():
    """S_t = min(cap, max(0, S_prev + llr_t)) from 0; BOS and pads pass the state on; in a tree each
    branch starts from its own predecessor's state."""
    llr = torch.tensor([[9.0, 1.0, 2.0, -4.0, 7.0, 5.0, 3.0, -1.0]])
    valid = torch.tensor([[False, True, True, True, False, True, True, True]])
    S = ex.cusum(llr, plain(valid), 6.0)[0].tolist()
    assert S == [0.0, 1.0, 3.0, 0.0, 0.0, 5.0, 6.0, 5.0]  # floor at 0 after -4, cap at 6, a pad keeps 0
    assert ex.cusum(llr, plain(valid), math.inf)[0, -1] == 7.0
    prev = torch.tensor([[-1, 0, 1, 2, 3, 4, 5, 5]])  # positions 6 and 7 both follow 5
    tree = ex.cusum(llr, ex.make_time(valid, prev), 6.0)[0].tolist()
    assert tree[:7] == S[:7] and tree[7] == 4.0  # 5 - 1, not 6 - 1


def test_hysteresis_by_hand():
    """--hold_rows: the gate opens where the evidence reaches hi, holds while it stays >= lo, and closes
    below lo; a pad passes the state on and never fires itself; in a tree each branch holds its own
    predecessor's state."""
    ev = torch.tensor([[0.0, 2.0, 3.5, 2.0, 9.0, 1.5, 0.5, 2.0, 3.0]])
    valid = torch.tensor([[True] * 4 + [False] + [True] * 4])
    det = ex.LagDetector(None, torch.zeros(1, 1), 0.0, 2.0, 1.0, hold=2.0)  # lo 1, hi 3
    opened = ex.gate_open(det, ev, plain(valid))[0].tolist()
    assert opened == [False, False, True, True, False, True, False, False, True]
    assert ex.gate_open(det._replace(hold=0.0), ev, plain(valid))[0].tolist() == [False, True, True, True, False,
                                                                                 True, False, True, True]
    prev = torch.tensor([[-1, 0, 1, 2, 3, 4, 5, 5, 5]])  # positions 6-8 all follow 5 (open): each holds or not
    tree = ex.gate_open(det, ev, ex.make_time(valid, prev))[0].tolist()
    assert tree[:6] == opened[:6] and tree[6:] == [False, True, True]


def test_hold_thresholds_gather_the_false_alarms_into_fewer_rows():
    """Retain rows with one short blip each and a few with a long excursion after a strong start: one
    threshold at the per-token rate fires on every row; the pair fires on at most `rows` of that many,
    on no blip row, at no more than the per-token rate."""
    ev = torch.zeros(24, 50)
    ev[torch.arange(20), torch.arange(20) * 2 + 5] = 2.0  # rows 0-19: one blip each
    ev[20:, 10] = 3.0  # rows 20-23: a strong start, then a long weak excursion
    ev[20:, 11:21] = 1.5
    tm = plain(torch.ones(24, 50, dtype=torch.bool))
    fpr = 0.06
    one = ex.threshold_for_fpr(ev.flatten(), fpr)
    assert ((ev >= one).any(1)).all()
    thr, hold = ex.hold_thresholds(ev, tm, fpr, 0.5)
    det = ex.LagDetector(None, torch.zeros(1, 1), 0.0, 2.0, thr, hold=hold)
    fired = ex.gate_open(det, ev, tm)
    assert hold > 0 and float(fired.float().mean()) <= fpr
    assert not fired[:20].any() and fired[20:, 11:21].all()
    assert float(fired.any(1).float().mean()) <= 0.5


def test_pool_dispatches_on_the_detectors_evidence():
    s = torch.tensor([[0.0, 4.0, -1.0, 2.0]])
    tm = plain(torch.tensor([[False, True, True, True]]))
    ema_det = ex.LagDetector(None, torch.zeros(1, 1), 0.0, 2.0, 0.0)
    hmm_det = ema_det._replace(evidence="hmm", switch=0.02, scale=0.5)
    assert torch.equal(ex.pool(ema_det, s, tm), ex.ema(s, tm, 2.0))
    assert torch.equal(ex.pool(hmm_det, s, tm), ex.hmm_filter(s * 0.5, tm, 0.02))
    cusum_det = ema_det._replace(evidence="cusum", cap=3.0)
    assert torch.equal(ex.pool(cusum_det, s, tm), ex.cusum(s, tm, 3.0))


def test_stop_delay_by_hand():
    label = [0, 1, 1, 0, 0, 0, 0]
    valid = [1, 1, 1, 1, 1, 1, 0]
    assert ex.stop_delay([0, 1, 1, 1, 1, 0, 0], label, valid) == 2.0
    assert ex.stop_delay([0, 1, 0, 0, 1, 1, 0], label, valid) == 0.0
    assert ex.stop_delay([0, 1, 1, 1, 1, 1, 1], label, valid) == 3.0  # on to the last valid token
    assert ex.stop_delay([1, 0, 0, 1, 1, 1, 1], label, valid) is None  # never fired inside


def test_gated_selection_ranks_cover_among_latents_that_spare_gated_retain():
    cover = torch.tensor([0.9, 0.5, 0.7, 0.0, 0.2])
    touch = torch.tensor([0.02, 0.0, 0.0005, 0.0, 0.0009])
    assert ex.select_gated(cover, touch, 2, 0.001).tolist() == [2, 1]
    assert ex.select_gated(cover, touch, 9, 0.001).tolist() == [2, 1, 4]  # cover 0 is never selected


def test_random_control_is_frequency_matched_disjoint_and_seeded():
    """matched_random: one latent per chosen one, never a chosen, dead or repeated latent, each among the
    RANDOM_POOL unchosen latents nearest in log forget frequency; the same generator seed, the same draw."""
    g = torch.Generator().manual_seed(0)
    sp = torch.rand(200, generator=g) ** 4
    sp[::7] = 0.0  # dead on forget text
    chosen = torch.tensor([3, 50, 51, 120, 199])
    draw = lambda seed: ex.matched_random(sp, chosen, torch.Generator().manual_seed(seed), pool=10)
    a = draw(1)
    assert len(a) == len(chosen) and len(set(a.tolist())) == len(a)
    assert not set(a.tolist()) & set(chosen.tolist()) and (sp[a] > 0).all()
    free = (sp > 0) & ~torch.isin(torch.arange(200), chosen)
    taken = set()
    for j, r in zip(chosen.tolist(), a.tolist()):
        cand = [c for c in free.nonzero().squeeze(1).tolist() if c not in taken]
        dist = sorted(abs(math.log(sp[c]) - math.log(sp[j])) for c in cand)
        assert abs(math.log(sp[r]) - math.log(sp[j])) <= dist[9] + 1e-12
        taken.add(r)
    assert torch.equal(a, draw(1)) and not torch.equal(a, draw(2))
    # fewer live latents than asked: as many as there are
    few = torch.zeros(200)
    few[[0, 1, 2]] = 0.5
    assert sorted(ex.matched_random(few, torch.tensor([0]), torch.Generator().manual_seed(0), pool=5).tolist()) in ([1], [2])
    assert len(ex.matched_random(few, torch.tensor([0, 1, 2, 5]), torch.Generator().manual_seed(0))) == 0


def test_front_share_follows_the_interpolation():
    front = ex.pareto_front([(0.4, 0.02, 0.0), (1.0, 0.10, 0.0)])
    flag = {(0.4, 0.02, 0.0): 0.0, (1.0, 0.10, 0.0): 1.0}
    assert ex.front_share(front, flag, 0.4) == 0.0
    assert ex.front_share(front, flag, 0.7) == pytest.approx(0.5)
    assert ex.front_share(front, flag, 1.0) == 1.0 and ex.front_share(front, flag, 1.5) is None
    assert ex.front_share(front, flag, 0.2) == pytest.approx(0.0)  # between the clean model and a 0-flag point


def test_the_gate_is_the_detector_the_run_names():
    """make_clamp and the gated selection read Detectors.gate: the residual detector under --detector
    residual, the learned one otherwise (templates are per selection)."""
    dets = ex.Detectors(learned="L", residual="R", combined="C")
    assert (dets.gate("learned"), dets.gate("residual"), dets.gate("combined"), dets.gate("templates")) == ("L", "R", "C", "L")


def test_combined_detector_reads_the_latents_then_the_residual():
    """--detector combined: one lag detector on log1p(latents) and the raw residual side by side, latents
    first. Its log-odds is linear in its inputs, so with the learned detector's weights on the latent rows
    and the residual detector's on the residual rows it is exactly the sum of the two scores."""
    torch.manual_seed(0)
    sae = ex.TemporalSAE(8, 16, window=3, d_head=4)
    lat = ex.LagDetector(torch.tensor([2, 5, 9]), torch.randn(3, 4), 0.3, 2.0, 0.0)
    res = ex.LagDetector(None, torch.randn(8, 4), -0.1, 2.0, 0.0)
    both = ex.LagDetector(lat.idx, torch.cat([lat.weight, res.weight]), 0.2, 2.0, 0.0, resid=True)
    x, valid = torch.randn(2, 7, 8), torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False  # left padding: no input there
    tm = ex.make_time(valid)
    g = ex.detector_inputs(sae, lat.idx, x, tm, resid=True)
    assert g.shape == (2, 7, 11) and torch.equal(g[..., 3:], x * valid.unsqueeze(-1))
    assert torch.equal(g[..., :3], ex.detector_inputs(sae, lat.idx, x, tm))
    s = ex.token_score(both, sae, x, tm)
    assert torch.allclose(s, ex.token_score(lat, sae, x, tm) + ex.token_score(res, sae, x, tm), atol=1e-5)
    assert not torch.allclose(s, ex.token_score(lat, sae, x, tm) + 0.1, atol=1e-2)  # the residual rows count

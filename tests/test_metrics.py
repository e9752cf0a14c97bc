"""Pure metric functions, each on values computed by hand."""
import math

import numpy as np
import pytest
import torch

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


def test_token_kl_zero_for_same_logits_and_known_value():
    logits = torch.randn(5, 7)
    assert torch.allclose(ex.token_kl(logits, logits), torch.zeros(5), atol=1e-6)
    p, q = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3)]])  # (1/2,1/2) vs (1/4,3/4)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert ex.token_kl(p, q).item() == pytest.approx(expected, rel=1e-5)


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


def test_gate_and_windows():
    f = torch.zeros(1, 6, 2)
    f[0, 1, 0] = 1.0
    f[0, 5, 1] = 2.0
    valid = torch.ones(1, 6, dtype=torch.bool)
    assert ex.gate_fires(f, valid, 4).tolist() == [[False] * 6]  # never 2 active in a 4-window
    f[0, 3, 0] = 1.0
    assert ex.gate_fires(f, valid, 4)[0].tolist() == [False, False, False, True, True, True]
    assert ex.gate_fires(f, valid, 1)[0].tolist() == [False, True, False, True, False, True]
    w = ex.windows_of(f, valid, 2)
    assert w.shape == (1, 6, 4) and torch.equal(w[0, 2], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_pearson_and_detector_fire_on_template():
    t = torch.tensor([[0.0, 1.0, 0.0, 2.0]])
    assert ex.pearson_rows(t, t).item() == pytest.approx(1.0)
    assert ex.pearson_rows(t, -t).item() == pytest.approx(-1.0)
    det = ex.Detector(t, window=2, tau=0.95)  # the half-window at t=2 correlates 0.87
    f = torch.zeros(1, 5, 2)
    f[0, 2] = torch.tensor([0.0, 1.0])
    f[0, 3] = torch.tensor([0.0, 2.0])
    valid = torch.ones(1, 5, dtype=torch.bool)
    assert det.fires(f, valid)[0].tolist() == [False, False, False, True, False]


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

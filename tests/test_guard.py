"""The streaming guard: generate() with the KV cache under a guard gives, position by position, the
logits of one guarded forward over the final sequence and of the harness's own clamp (clamp_fn) on
it; one SAE encode per new position; bad input is one line."""
import json
import math

import pytest
import torch

import experiment as ex
from conftest import tiny_flags

LAYER = 1


def prompts(tok, texts, pad_id):
    """BOS + text, left-padded to one length: (ids, mask)."""
    rows = [[ex.bos_id(tok)] + tok(t, add_special_tokens=False).input_ids for t in texts]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return ids, mask


def tiny_guard(model, strategy, evidence="ema", dense=False, ramp=0.0, reads="latents"):
    """A w=4 SAE and a lag detector on random weights, with latents that fire and a detector that fires
    on part of the text, so every rule clamps somewhere and spares somewhere. The detector reads SAE
    latents (the learned one), the raw residual (--detector residual) or both (--detector combined)."""
    torch.manual_seed(0)
    d = model.config.hidden_size
    sae = ex.TemporalSAE(d, 48, window=4, d_head=8)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    n_in = {"latents": 16, "residual": d, "both": 16 + d}[reads]
    idx = None if reads == "residual" else torch.arange(20, 36)
    det = ex.LagDetector(idx, 0.5 * torch.randn(n_in, 3) / math.sqrt(n_in / 16), 0.0, 2.0, 0.0, evidence, 0.05, 0.5,
                         resid=reads == "both")
    if evidence == "cusum":  # the statistic is >= 0: a threshold above 0 and a cap above that
        det = det._replace(threshold=0.5, cap=2.0)
    det = det._replace(ramp=ramp)
    c = ex.Clamp(strategy, torch.tensor([1, 5, 9, 17]), 8.0, 3, det, torch.full((4,), 0.3), 0.3, dense)
    return ex.Guard(sae, LAYER, c)


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def harness_logits(model, guard, seq, mask):
    """The sweep's own clamp on the whole sequence: clamp_fn with the Time of left-padded rows."""
    valid = mask.bool() & (positions(mask) > 0)
    fn = ex.clamp_fn(guard.sae, guard.clamp)
    with torch.no_grad(), ex.intervene(model, LAYER, lambda r: fn(r, ex.make_time(valid))):
        return model(input_ids=seq, attention_mask=mask, position_ids=positions(mask)).logits


PADDED = ["Cells divide by mitosis and the", "The river"]
UNPADDED = ["Cells divide by mitosis and the", "Cells divide by mitosis and a"]  # one length: generate() drops the mask


@pytest.mark.parametrize("strategy,evidence,texts,dense,ramp,reads", [(s, "ema", PADDED, False, 0.0, "latents")
                                                                      for s in ex.CAUSAL_STRATEGIES] +
                         [("pattern", "hmm", PADDED, False, 0.0, "latents"), ("pattern", "cusum", PADDED, False, 0.0, "latents"),
                          ("pattern", "ema", UNPADDED, False, 0.0, "latents"), ("standard", "ema", UNPADDED, False, 0.0, "latents"),
                          ("pattern", "ema", PADDED, True, 0.0, "latents"), ("hybrid", "ema", PADDED, True, 0.0, "latents"),
                          ("pattern", "ema", PADDED, True, 1.0, "latents"), ("hybrid", "ema", PADDED, False, 1.0, "latents"),
                          ("pattern", "ema", PADDED, False, 0.0, "residual"), ("pattern", "ema", PADDED, True, 1.0, "residual"),
                          ("hybrid", "hmm", PADDED, False, 0.0, "both"), ("pattern", "ema", PADDED, True, 1.0, "both")])
def test_generation_with_the_cache_equals_one_guarded_forward(model, tok, monkeypatch, strategy, evidence, texts, dense,
                                                             ramp, reads):
    check_cache_equivalence(model, tok, monkeypatch, tiny_guard(model, strategy, evidence, dense, ramp, reads), texts, ramp)


@pytest.mark.parametrize("evidence,ramp", [("ema", 0.0), ("hmm", 1.0)])
def test_a_threshold_per_position_streams_too(model, tok, monkeypatch, evidence, ramp):
    """--detector_fpr_unit position: the guard counts each sequence's valid tokens itself (left padding
    puts the two prompts' buckets at different columns), so its offsets equal pool's on the whole row.
    The buckets are moved inside these short sequences."""
    monkeypatch.setattr(ex, "POSITION_BUCKETS", (4, 9))
    guard = tiny_guard(model, "pattern", evidence, False, ramp)
    guard.clamp = guard.clamp._replace(detector=guard.clamp.detector._replace(offsets=(0.4, -0.3, 0.0)))
    guard.det = guard.clamp.detector
    check_cache_equivalence(model, tok, monkeypatch, guard, PADDED, ramp)


@pytest.mark.parametrize("strategy,dense,ramp", [("pattern", False, 0.0), ("hybrid", True, 1.0)])
def test_a_steering_guard_streams_too(model, tok, monkeypatch, strategy, dense, ramp):
    """--pattern_edit steer: the guard adds the steer direction where the clamp would act, as the sweep's
    clamp_fn does on the whole sequence."""
    guard = tiny_guard(model, strategy, "ema", dense, ramp)
    steer = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    guard.clamp = guard.clamp._replace(steer=steer / steer.norm())
    check_cache_equivalence(model, tok, monkeypatch, guard, PADDED, ramp)


@pytest.mark.parametrize("evidence,ramp", [("ema", 0.0), ("hmm", 1.0)])
def test_a_two_threshold_gate_streams_too(model, tok, monkeypatch, evidence, ramp):
    """--hold_rows: the guard carries whether each sequence's gate is open (schmitt_step), as hysteresis
    does over the whole row; some position must be held open below the upper threshold."""
    guard = tiny_guard(model, "pattern", evidence, False, ramp)
    guard.clamp = guard.clamp._replace(detector=guard.clamp.detector._replace(threshold=-0.1, hold=0.2))
    guard.det = guard.clamp.detector
    held, step = [], ex.schmitt_step
    monkeypatch.setattr(ex, "schmitt_step", lambda o, e, lo, hi: held.append(bool(((o > 0) & (e < hi) & (e >= lo)).any()))
                        or step(o, e, lo, hi))
    check_cache_equivalence(model, tok, monkeypatch, guard, PADDED, ramp)
    assert any(held), "no position was held open: the test would pass for a one-threshold gate"


def check_cache_equivalence(model, tok, monkeypatch, guard, texts, ramp):
    gains, gain = [], ex.evidence_gain  # under a ramp, some positions must get a fraction of the clamp
    monkeypatch.setattr(ex, "evidence_gain", lambda *a: gains.append(gain(*a)) or gains[-1])
    ids, mask = prompts(tok, texts, pad_id=1)
    new = 10
    with guard.attached(model):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=1)
    assert guard.encodes == ids.shape[1] + new - 1  # the prompt once, then one position per generated token
    gen = torch.stack(out.logits, 1)  # (B, new, V)
    seq = out.sequences
    full = torch.cat([mask, torch.ones(len(seq), seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    with torch.no_grad(), guard.attached(model):
        tf = model(input_ids=seq, attention_mask=full, position_ids=positions(full)).logits
    at = slice(ids.shape[1] - 1, seq.shape[1] - 1)  # the positions whose logits chose each new token
    assert (gen - tf[:, at]).abs().max() <= 1e-4
    ref = harness_logits(model, guard, seq, full)
    real = full.bool()
    assert (tf - ref)[real].abs().max() <= 1e-4
    with torch.no_grad():
        clean = model(input_ids=seq, attention_mask=full, position_ids=positions(full)).logits
    changed = ((tf - clean).abs().amax(-1) > 1e-3) & real
    assert changed.any(), "the guard never clamped: the test would pass for any guard"
    if ramp:
        g = torch.cat([x.flatten() for x in gains])
        assert ((g > 0) & (g < 1)).any(), "no position between the threshold and full strength"


def test_state_is_per_sequence_and_bounded(model, tok):
    """Batch elements never share state; the state does not grow with the sequence."""
    guard = tiny_guard(model, "pattern")
    ids, mask = prompts(tok, ["The river ran past the old mill and", "Antibodies bind antigens"], pad_id=1)
    with torch.no_grad(), guard.attached(model):
        both = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        sizes = {k: tuple(v.shape) for k, v in guard.state.items() if isinstance(v, torch.Tensor)}
        one = model(input_ids=ids[1:], attention_mask=mask[1:], position_ids=positions(mask[1:])).logits
    assert (both[1:] - one).abs().max() <= 1e-4
    D = model.config.hidden_size
    assert sizes["x"] == (2, 3, D) and sizes["z"] == (2, 2, 3) and sizes["on"] == (2, 2)


def test_a_cusum_run_folder_gives_a_cusum_guard(tmp_path, model, tok):
    """guard.json carries the accumulator and its cap (an infinite cap is stored as null)."""
    flags = [f for f in tiny_flags(tmp_path / "run", "unused", "--strategies=standard,pattern", "--evidence=cusum",
                                   "--cusum_cap=1000") if not f.startswith("--model")]
    ex.run(ex.parse_config(flags), model=model, tok=tok)
    det = ex.load_guard(tmp_path / "run", "pattern", level=0.0).clamp.detector
    assert det.evidence == "cusum" and det.cap == 1000.0 and 0.0 <= det.threshold < 1000.0
    meta = json.loads((tmp_path / "run" / "guard.json").read_text())
    meta["learned"]["cap"] = None
    assert ex.guard_detector(meta, {"detector.idx": det.idx, "detector.weight": det.weight}).cap == math.inf
    # a cap below what the calibration rows reach leaves no threshold under it: refused, no results
    low = [f for f in tiny_flags(tmp_path / "low", "unused", "--strategies=standard,pattern", "--evidence=cusum",
                                 "--cusum_cap=1e-6") if not f.startswith("--model")]
    with pytest.raises(ex.UsageError, match="raise --cusum_cap"):
        ex.run(ex.parse_config(low), model=model, tok=tok)
    assert not list((tmp_path / "low").rglob("final_info.json"))


def test_a_tiny_run_folder_gives_a_guard(tmp_path, model, tok):
    flags = [f for f in tiny_flags(tmp_path / "run", "unused", "--strategies=standard,dsg,pattern")
             if not f.startswith("--model")]
    ex.run(ex.parse_config(flags), model=model, tok=tok)
    run = tmp_path / "run"
    guard = ex.load_guard(run, "pattern", level=0.0)
    points = json.loads((run / "sweep.json").read_text())["points"]
    assert guard.point in points and guard.point["strategy"] == "pattern"
    assert guard.clamp.multiplier == guard.point["multiplier"] and guard.layer == 1
    assert not guard.clamp.dense
    at = points.index(next(p for p in points if p["strategy"] == "standard"))
    assert ex.load_guard(run, "standard", point=at).clamp.strategy == "standard"
    with pytest.raises(ex.UsageError, match="dsg reads the whole sequence"):
        ex.load_guard(run, "dsg")
    with pytest.raises(ex.UsageError, match="unknown strategy"):
        ex.load_guard(run, "clamp_all")
    with pytest.raises(ex.UsageError, match="no sweep point reaching"):
        ex.load_guard(run, "pattern", level=1e9)
    with pytest.raises(ex.UsageError, match="has points 0.."):
        ex.load_guard(run, "pattern", point=10**6)
    wrong = ex.load_guard(run, "pattern", level=0.0)
    wrong.layer = 99
    with pytest.raises(ex.UsageError, match="the model has blocks"), wrong.attached(model):
        pass
    (run / "guard.json").unlink()
    with pytest.raises(ex.UsageError, match="no guard.json"):
        ex.load_guard(run, "pattern")


def test_a_pattern_clamp_all_run_gives_a_dense_guard(tmp_path, model, tok):
    """guard.json carries --pattern_clamp, so the guard clamps what the sweep clamped."""
    flags = [f for f in tiny_flags(tmp_path / "run", "unused", "--strategies=standard,pattern,hybrid",
                                   "--pattern_clamp=all") if not f.startswith("--model")]
    ex.run(ex.parse_config(flags), model=model, tok=tok)
    for s in ("pattern", "hybrid"):
        assert ex.load_guard(tmp_path / "run", s, level=0.0).clamp.dense


def test_a_pattern_ramp_run_gives_a_guard_with_the_ramp(tmp_path, model, tok):
    """guard.json carries the ramp's scale (evidence units, set on calibration forget rows) and the
    guard reads it back."""
    flags = [f for f in tiny_flags(tmp_path / "run", "unused", "--strategies=standard,pattern",
                                   "--pattern_ramp=1") if not f.startswith("--model")]
    ex.run(ex.parse_config(flags), model=model, tok=tok)
    meta = json.loads((tmp_path / "run" / "guard.json").read_text())
    det = ex.load_guard(tmp_path / "run", "pattern", level=0.0).clamp.detector
    assert det.ramp == meta["learned"]["ramp"] > 0


def test_refine_guard_measures_on_the_evaluation_rows(tmp_path, model, tok):
    """refine_guard's point carries the forget-CE increase and retain KL that level_at measures at the
    multiplier it keeps, which reaches the level and is no larger than the sweep point's."""
    cfg = ex.parse_config([f for f in tiny_flags(tmp_path / "run", "unused") if not f.startswith("--model")])
    corpora, questions = ex.load_inputs(cfg)
    d = ex.prepare_data(cfg, model, tok, corpora, questions, ex.Stages(), False)
    g = tiny_guard(model, "standard")
    fn = lambda m: ex.clamp_fn(g.sae, g.clamp._replace(multiplier=m))
    ce8, kl8 = ex.level_at(model, LAYER, fn(8.0), d)
    assert kl8 > 0, "the clamp must change the retain rows for this check"
    g.point = {"strategy": "standard", "multiplier": 8.0, "forget_ce_increase": ce8, "retain_kl": kl8,
               "selection": "saebench", "retain_threshold": 0.01, "n_features": 4}
    level = ce8 - 0.5 * abs(ce8)
    fine = ex.refine_guard(model, g, [g.point], d, 3, level)
    m = fine.point["multiplier"]
    assert m < 8.0 and fine.clamp.multiplier == m and fine.point["sweep_multiplier"] == 8.0  # it moved
    ce, kl = ex.level_at(model, LAYER, fn(m), d)
    assert fine.point["forget_ce_increase"] == pytest.approx(ce, abs=1e-6) and ce >= level
    assert fine.point["retain_kl"] == pytest.approx(kl, abs=1e-6)


def test_first_difference_and_repeated_ngrams_by_hand():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    b = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [0, 6, 7, 8]])
    assert ex.first_difference(a, b).tolist() == [4.0, 1.0, 0.0]
    assert ex.repeated_ngram_rate([1, 2, 3, 4, 1, 2, 3, 4, 1], n=4) == pytest.approx(2 / 6)  # (1234)(2341)(3412)(4123)(1234)(2341)
    assert ex.repeated_ngram_rate([1, 2, 3, 4, 5, 6], n=4) == 0.0 and ex.repeated_ngram_rate([7, 7, 7], n=4) == 0.0


def test_refine_point_bisects_toward_the_least_multiplier_that_reaches_the_level():
    """Between the largest swept multiplier below the level (same strategy and selection) and the
    point's own: geometric steps, the least that reaches the level kept with what was measured there."""
    sel = {"selection": "saebench", "retain_threshold": 0.01, "n_features": 10}
    pt = lambda m, ce, s="pattern", **k: {"strategy": s, "multiplier": m, "forget_ce_increase": ce, "retain_kl": 0.5,
                                          **sel, **k}
    points = [pt(10.0, 0.4), pt(30.0, 0.8), pt(100.0, 2.0), pt(50.0, 0.1, "standard"), pt(60.0, 0.1, n_features=20)]
    seen = []
    forget_ce = lambda m: seen.append(m) or m / 50.0  # reaches 1.0 from m = 50
    q = ex.refine_point(points[2], points, 3, forget_ce, level=1.0)
    m1 = math.sqrt(30 * 100)     # 54.8 reaches 1.0: the new upper end
    m2 = math.sqrt(30 * m1)      # 40.5 does not: the new lower end
    assert seen == pytest.approx([m1, m2, math.sqrt(m2 * m1)])
    assert q["multiplier"] == pytest.approx(m1) and q["forget_ce_increase"] == pytest.approx(m1 / 50)
    assert q["retain_kl"] is None and q["sweep_multiplier"] == 100.0  # moved: its retain KL is measured by the caller
    same = ex.refine_point(points[2], points, 0, forget_ce, level=1.0)
    assert same["multiplier"] == 100.0 and same["retain_kl"] == 0.5
    # the smallest swept multiplier already reaches the level: halve toward 0
    seen.clear()
    assert ex.refine_point(pt(10.0, 3.0), [pt(10.0, 3.0)], 2, forget_ce, level=0.1)["multiplier"] == 5.0  # 2.5 falls short
    assert seen == [5.0, 2.5]


def test_generation_stage_on_the_tiny_model(tmp_path, model, tok):
    """run_generation on held-out prefixes and spliced documents: clean and guarded continuations,
    their measures and records; a guard that clamps nowhere leaves every continuation identical."""
    flags = [f for f in tiny_flags(tmp_path / "run", "unused") if not f.startswith("--model")]
    cfg = ex.parse_config(flags)
    corpora, questions = ex.load_inputs(cfg)
    d = ex.prepare_data(cfg, model, tok, corpora, questions, ex.Stages(), False)
    active, idle = tiny_guard(model, "standard"), tiny_guard(model, "pattern")
    idle.clamp = idle.clamp._replace(detector=idle.clamp.detector._replace(threshold=1e9))
    idle.det = idle.clamp.detector
    point = {"multiplier": 8.0, "forget_ce_increase": 1.5, "retain_kl": 0.1}
    active.point = idle.point = point
    entries, records = ex.run_generation(cfg, model, tok, active.sae, {"standard": active, "pattern": idle},
                                         active.clamp.detector, d)
    m_idle, m_active = entries["generation_pattern"]["means"], entries["generation_standard"]["means"]
    for name in ("forget", "retain", "spliced"):
        assert m_idle[f"{name}_identical"] == 1.0 and m_idle[f"{name}_first_difference"] == cfg.generate_tokens
    assert min(m_active[f"{n}_identical"] for n in ("forget", "retain", "spliced")) < 1.0
    assert entries["generation_clean"]["means"]["retain_ce_true"] > 0
    variants = {r["variant"] for r in records}
    assert variants == {"clean", "true", "standard", "pattern"}
    assert len([r for r in records if r["variant"] == "clean"]) == 3 * cfg.generate_prompts
    # the sets run as one left-padded batch: each set's continuations are those it gets on its own
    sets = ex.generation_sets(cfg, d)
    merged, where = ex.merge_prompts(sets)
    assert len({pr.ids.shape[1] for pr in sets.values()}) > 1, "the sets must differ in length for this check"
    for guard in (None, active):
        together, _ = ex.greedy(model, merged, cfg.generate_tokens, 1, guard)
        for name, pr in sets.items():
            alone, _ = ex.greedy(model, pr, cfg.generate_tokens, 1, guard)
            assert torch.equal(together[where[name]], alone), name


def test_continuation_stats_on_the_prompt_cache_equal_one_forward_over_the_sequence(model, tok):
    """The stage scores every continuation on a copy of the prompts' cache; that must give the clean
    model's CE and the detector's fires of one forward over prompt + continuation (left padding)."""
    guard = tiny_guard(model, "pattern")
    det, sae = guard.det, guard.sae
    ids, mask = prompts(tok, PADDED, pad_id=1)
    torch.manual_seed(1)
    cont = torch.randint(5, model.config.vocab_size, (2, 7))
    seq, full = torch.cat([ids, cont], 1), torch.cat([mask, torch.ones_like(cont)], 1)
    with torch.no_grad():
        out = model(input_ids=seq, attention_mask=full, position_ids=positions(full), output_hidden_states=True)
    P = ids.shape[1]
    ce = torch.nn.functional.cross_entropy(out.logits[:, P - 1:-1].flatten(0, 1), cont.flatten(), reduction="none")
    valid, resid = full.bool() & (positions(full) > 0), out.hidden_states[LAYER + 1]
    with torch.no_grad():
        _, ev = ex.detector_fire_score(det, sae, resid, ex.make_time(valid))
    v = ev[:, P:].flatten().sort().values
    assert v[7] - v[6] > 1e-3, "the threshold must sit clear of every score"
    det = det._replace(threshold=float(v[6] + v[7]) / 2)  # fires on half the continuation
    fires, _ = ex.detector_fire_score(det, sae, resid, ex.make_time(valid))
    pr = ex.Prompts(ids, mask, cont)
    ps = ex.prompt_state(model, LAYER, pr)
    got = [ex.continuation_stats(model, LAYER, sae, det, pr, ps, c) for c in (cont, cont.flip(1), cont)]
    assert torch.allclose(got[0]["ce"], ce.view(2, -1), atol=1e-4)
    assert torch.equal(got[0]["fires"], fires[:, P:]) and fires[:, P:].any() and not fires[:, P:].all()
    assert torch.equal(got[2]["ce"], got[0]["ce"]), "scoring must leave the shared prompt cache as it was"
    assert not torch.allclose(got[1]["ce"], got[0]["ce"])


def test_spliced_prompts_end_inside_the_passage_after_at_most_prompt_tokens_of_context():
    """BOS, at most prompt_tokens tokens before the passage, `inside` tokens of it; the true
    continuation is what follows in the document; rows without a passage or room are skipped."""
    T = 40
    tokens = torch.arange(T).repeat(3, 1) + 100 * torch.arange(1, 4)[:, None]
    label = torch.zeros(3, T, dtype=torch.bool)
    label[0, 20:30], label[1, 3:30] = True, True  # row 2 holds no passage
    real = torch.ones(3, T, dtype=torch.bool)
    rows = ex.Rows(tokens, real, real, torch.arange(3), label)
    pr = ex.make_prompts(rows, 5, prompt_tokens=8, new_tokens=6, inside=4)
    assert pr.ids.shape == (2, 1 + 8 + 4)
    assert pr.ids[0].tolist() == [100] + list(range(112, 124))  # BOS, 8 before the passage at 20, 4 in it
    assert pr.ids[1, -7:].tolist() == [200] + list(range(201, 207)) and pr.mask[1].sum() == 7  # passage at 3
    assert pr.true[0].tolist() == list(range(124, 130)) and pr.true[1].tolist() == list(range(207, 213))
    assert pr.mask[0].all() and not pr.mask[1, :6].any()

"""Activations, the intervention hook, the re-run of later blocks, packed questions, and a whole run
on a tiny model."""
import json
import shutil
import math

import pytest
import torch

import experiment as ex
from conftest import tiny_flags


def n_hooks(model) -> int:
    """Hooks on the blocks (transformers adds its own once, so tests compare before and after)."""
    return sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in ex.blocks_of(model)) + \
        len(ex.final_norm_of(model)._forward_pre_hooks)


def some_rows(tok, n=3, ctx=24):
    docs = ex.load_corpus("embedded", "retain")[:n]
    return ex.make_rows(tok, docs, ctx, 10**6, forget=False)


def test_harvest_is_the_residual_after_the_block(model, tok):
    rows = some_rows(tok)
    before = n_hooks(model)
    acts = ex.harvest(model, 1, rows, batch_rows=2)
    assert n_hooks(model) == before
    with torch.no_grad():
        hs = model.base_model(input_ids=rows.tokens, attention_mask=rows.attn.long(), output_hidden_states=True).hidden_states
    assert torch.allclose(acts, hs[2], atol=1e-5)  # hidden_states[0] is the embedding output
    b = ex.clean_forward(model, 1, rows.tokens, rows.attn)
    assert torch.allclose(b.resid, acts, atol=1e-5)


def test_hook_is_removed_even_on_error(model):
    before = n_hooks(model)
    with pytest.raises(RuntimeError):
        with ex.intervene(model, 1, lambda x: x):
            raise RuntimeError("boom")
    assert n_hooks(model) == before
    with ex.intervene(model, 3, lambda x: x):  # the last block: the hook sits on the final norm
        assert n_hooks(model) == before + 1
    assert n_hooks(model) == before


def full_logits(model, tokens, attn):
    return model(input_ids=tokens, attention_mask=attn.long()).logits


def test_identity_intervention_leaves_logits_unchanged(model, tok):
    rows = some_rows(tok)
    with torch.no_grad():
        clean = full_logits(model, rows.tokens, rows.attn)
        with ex.intervene(model, 2, lambda x: x.clone()):
            hooked = full_logits(model, rows.tokens, rows.attn)
    assert torch.equal(clean, hooked)


def test_rerun_equals_full_hooked_forward(model, tok):
    """The fast path (cached block output, later blocks only, changed rows only) equals a full forward
    with the hook; positions the edit cannot reach are reported as such."""
    rows = some_rows(tok, n=4)
    b = ex.clean_forward(model, 1, rows.tokens, rows.attn)
    c = b.resid[:, 5, 0].median()

    def fn(x, tm):  # changes some rows from position 5 on, leaves the others bit-identical
        out = x.clone()
        out[:, 5:] = torch.where(x[:, 5:6, :1] > c, x[:, 5:] * 0.5 + 1.0, x[:, 5:])
        return out

    before = n_hooks(model)
    new = fn(b.resid, b.time)
    rr = ex.rerun_many(model, 1, b, {"a": new, "same": new.clone(), "none": b.resid.clone()})
    with torch.no_grad(), ex.intervene(model, 1, lambda x: fn(x, b.time)):
        slow = model.base_model(input_ids=rows.tokens, attention_mask=rows.attn.long()).last_hidden_state
    assert n_hooks(model) == before
    changed = torch.zeros(len(rows.tokens), dtype=torch.bool)
    changed[rr.rows] = True
    assert changed.any() and not changed.all()
    assert torch.equal(rr.use["a"], rr.use["same"]) and len(rr.use["none"]) == 0  # identical edits run once
    assert len(rr.rows) == int(changed.sum())
    assert torch.allclose(rr.h, slow[rr.rows], atol=1e-5)
    assert torch.allclose(b.final[~changed], slow[~changed], atol=1e-5)
    assert not rr.hit[:, :5].any() and rr.hit[:, 5:].all()
    assert torch.allclose(rr.h[:, :5], b.final[rr.rows][:, :5], atol=1e-5)


def tail_lengths(model, layer: int) -> list:
    """A pre-hook on the first block after `layer` that records how many positions each call runs."""
    seen = []
    block = ex.blocks_of(model)[layer + 1]
    h = block.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[1]),
                                        with_kwargs=True)
    return seen, h


def test_rerun_starts_at_the_first_edit_with_cached_keys_and_values(model, tok):
    """With the clean keys and values kept, a re-run computes only the positions from a row's first
    edit on, and gives what the whole-row re-run gives; edits at different positions per row."""
    rows = some_rows(tok, n=4)
    whole, part = ex.clean_forward(model, 1, rows.tokens, rows.attn), ex.clean_forward(model, 1, rows.tokens, rows.attn, keep_kv=True)
    assert whole.kv is None and len(part.kv) == len(ex.blocks_of(model)) - 2
    assert part.kv[0][0].shape[:1] + part.kv[0][0].shape[2:3] == rows.tokens.shape
    new = part.resid.clone()
    new[0, 9:] += 0.5
    new[2, 14:] *= 0.5
    news = {"a": new, "b": torch.where(torch.arange(len(new))[:, None, None] == 2, part.resid, new)}
    seen, h = tail_lengths(model, 1)
    try:
        fast = ex.rerun_many(model, 1, part, news)
    finally:
        h.remove()
    slow = ex.rerun_many(model, 1, whole, news)
    assert torch.equal(fast.rows, slow.rows) and all(torch.equal(fast.use[k], slow.use[k]) for k in news)
    assert torch.equal(fast.hit, slow.hit)
    assert torch.allclose(fast.h, slow.h, atol=1e-5)
    T = rows.tokens.shape[1]
    assert seen == [T - 9]  # both distinct rows in one forward, from the earlier first edit
    assert ex.prefix_reuse_agrees(model, 1, rows.tokens, rows.attn)


def test_rerun_from_mid_row_keeps_the_tree_mask_of_packed_questions(model, tok):
    """Packed answer choices re-run from their first edit score as whole rows do."""
    qs = ex.load_questions("embedded", "forget")[:5]
    whole, part = (ex.prepare_qa(model, tok, 1, qs, "cloze", 2, keep_kv=k) for k in (False, True))
    sae = ex.TemporalSAE(model.config.hidden_size, 16, window=3, d_head=4)
    torch.manual_seed(0)
    sae.b_enc.data.normal_()
    fn = ex.clamp_fn(sae, ex.Clamp("standard", torch.tensor([0, 3, 5]), 4.0, 4, None, None, 0.0))

    def late(x, tm):  # the clamp from the fifth token on: re-runs start mid-row
        out = fn(x, tm)
        out[:, :5] = x[:, :5]
        return out
    under = lambda qa: ex.qa_scores(model, 1, qa, ex.edits_of(late, qa.batches))[0]
    assert torch.allclose(under(part), under(whole), atol=1e-5)
    assert not torch.allclose(under(part), ex.clean_scores(part), atol=1e-4)


def test_a_block_argument_that_cannot_be_cut_is_refused():
    """from_position cuts only what it knows; anything else with a tensor makes it refuse, so
    prefix_reuse_agrees falls back to whole rows."""
    kv = (torch.zeros(1, 1, 6, 2), torch.zeros(1, 1, 6, 2))
    ok = ex.from_position((), {"attention_mask": None, "position_ids": torch.arange(6)[None], "cache": None,
                               "use_cache": False}, kv, 2, 6)
    assert ok["position_ids"].tolist() == [[2, 3, 4, 5]] and ok["attention_mask"].shape == (1, 1, 4, 6)
    assert ok["attention_mask"][0, 0].sum(1).tolist() == [3, 4, 5, 6] and isinstance(ok["cache"], ex.PrefixKV)
    with pytest.raises(ValueError):
        ex.from_position((), {"sliding_window_mask": torch.ones(1, 1, 6, 6)}, kv, 2, 6)
    with pytest.raises(ValueError):
        ex.from_position((torch.ones(1),), {}, kv, 2, 6)


def test_batches_by_length_bound_the_padding_each_row_adds():
    """A row joins a batch only if the padding it adds (rows so far times its extra length) is at
    most `slack`; batches cover every row once, in order, at most `size` rows each."""
    lengths = [1, 8, 28, 60, 87, 88, 95, 100, 127, 127, 127, 127, 127]
    parts = list(ex.length_batches(lengths, 4, slack=32))
    assert [i for s in parts for i in range(len(lengths))[s]] == list(range(len(lengths)))
    assert [lengths[s] for s in parts] == [[1, 8], [28, 60], [87, 88, 95, 100], [127] * 4, [127]]
    for s in parts:
        got = lengths[s]
        assert len(got) <= 4 and all(k * (got[k] - got[k - 1]) <= 32 for k in range(1, len(got)))
    assert [len(range(13)[s]) for s in ex.length_batches(lengths, 4, slack=0)] == [1] * 8 + [4, 1]


def test_packed_choices_score_like_one_row_per_choice(model, tok):
    """Four choices behind one question in one row (tree mask, explicit positions) give the same
    choice scores as one row per choice, clean and under a causal clamp."""
    qs = ex.load_questions("embedded", "forget")[:5]
    packed = ex.prepare_qa(model, tok, 1, qs, "cloze", 2, pack=True)
    plain = ex.prepare_qa(model, tok, 1, qs, "cloze", 2, pack=False)
    assert sum(int(b.attn.sum()) for b in packed.batches) < 0.6 * sum(int(b.attn.sum()) for b in plain.batches)
    assert torch.allclose(ex.clean_scores(packed), ex.clean_scores(plain), atol=1e-4)
    sae = ex.TemporalSAE(model.config.hidden_size, 16, window=3, d_head=4)
    fn = ex.clamp_fn(sae, ex.Clamp("standard", torch.tensor([0, 3, 5]), 4.0, 4, None, None, 0.0))
    under = lambda qa: ex.qa_scores(model, 1, qa, ex.edits_of(fn, qa.batches))[0]
    assert torch.allclose(under(packed), under(plain), atol=1e-4)
    assert not torch.allclose(under(packed), ex.clean_scores(packed), atol=1e-4)
    assert ex.packing_agrees(model, tok, 1, qs, 2)


def test_zero_multiplier_without_clamping_gives_exact_clean_results(model, tok):
    rows = some_rows(tok)
    d = model.config.hidden_size
    sae = ex.TemporalSAE(d, 16, window=4, d_head=4)
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)  # no latent ever fires: nothing to clamp
    ts = ex.prepare_text(model, 1, rows, 2)
    det = ex.LagDetector(None, torch.zeros(d, 4), 1.0, 4.0, 0.0)  # fires everywhere
    for strategy in ex.STRATEGIES:
        c = ex.Clamp(strategy, torch.tensor([0, 3]), 0.0, 4, det, torch.zeros(2), 0.0)
        ce, kl = ex.text_stats(model, 1, ts, ex.edits_of(ex.clamp_fn(sae, c), ts.batches))[0]
        assert torch.equal(ce, ts.clean_ce) and not kl.any(), strategy


def test_cached_clean_log_probs_give_the_same_ce_and_kl(model, tok):
    """KL sets keep the clean log-probs so a sweep point runs one LM head, not two: same numbers."""
    rows = some_rows(tok)
    sae = ex.TemporalSAE(model.config.hidden_size, 16, window=2, d_head=4)
    fn = ex.clamp_fn(sae, ex.Clamp("standard", torch.tensor([0, 3, 5]), 4.0, 4, None, None, 0.0))
    plain, cached = ex.prepare_text(model, 1, rows, 2), ex.prepare_text(model, 1, rows, 2, keep_clean=True)
    assert plain.clean is None and cached.clean is not None
    # the tiny model's tied head is linear: the clean side is kept as D numbers a position, not V
    assert cached.clean.p is None and cached.clean.e.shape[1] == model.config.hidden_size
    (ce_p, kl_p), (ce_c, kl_c) = (ex.text_stats(model, 1, ts, ex.edits_of(fn, ts.batches))[0] for ts in (plain, cached))
    assert kl_p.gt(0).any() and torch.equal(ce_p, ce_c)
    assert torch.allclose(kl_p, kl_c, atol=1e-6, rtol=1e-4)
    ce_only, kl_none = ex.text_stats(model, 1, plain, ex.edits_of(fn, plain.batches), kl=False)[0]
    assert torch.equal(ce_only, ce_p) and not kl_none.any()


def test_clamp_sets_selected_latents_and_keeps_the_error_term():
    torch.manual_seed(0)
    sae = ex.TemporalSAE(8, 12, window=1)
    x = torch.randn(2, 5, 8) * 3
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[:, 0] = False
    tm = ex.make_time(valid)
    lat = torch.tensor([1, 4])
    new = ex.clamp_fn(sae, ex.Clamp("standard", lat, 7.0, 4, None, None, 0.0))(x, tm)
    f_old = sae.encode(x, valid)
    assert (f_old[:, 1:, lat] > 0).any()
    expected = f_old.clone()
    expected[..., lat] = torch.where(f_old[..., lat] > 0, -7.0, f_old[..., lat])
    # resid' - decode(f') == resid - decode(f): the SAE's error term is untouched
    v = valid.unsqueeze(-1).expand_as(x)
    assert torch.allclose((new - sae.decode(expected))[v], (x - sae.decode(f_old))[v], atol=1e-4)
    assert torch.equal(new[:, 0], x[:, 0])  # BOS is never clamped
    dsg = ex.clamp_fn(sae, ex.Clamp("dsg", lat, 7.0, 4, None, None, 0.0))(x, tm)
    on = (f_old[..., lat] > 0).any(-1) & valid  # DSG sets *all* selected latents where any is on
    all_set = f_old.clone()
    all_set[..., lat] = torch.where(on.unsqueeze(-1), torch.full_like(f_old[..., lat], -7.0), f_old[..., lat])
    assert torch.allclose((dsg - sae.decode(all_set))[v], (x - sae.decode(f_old))[v], atol=1e-4)


def test_qa_subset_keeps_answers(model, tok):
    qs = ex.load_questions("embedded", "retain")[:6]
    qa = ex.prepare_qa(model, tok, 1, qs, "cloze", 2)
    scores = ex.clean_scores(qa)
    keep = torch.tensor([True, False, True, True, False, True])
    sub = ex.subset_qa(qa, keep)
    assert torch.equal(ex.clean_scores(sub), scores[keep])
    direct = ex.prepare_qa(model, tok, 1, [q for q, k in zip(qs, keep) if k], "cloze", 2)
    assert torch.allclose(ex.clean_scores(direct), scores[keep], atol=1e-5)


def test_letter_scoring_runs(model, tok):
    qs = ex.load_questions("embedded", "forget")[:3]
    qa = ex.prepare_qa(model, tok, 1, qs, "letter", 4)
    s = ex.clean_scores(qa)
    assert s.shape == (3, 4) and torch.isfinite(s).all()


def assert_contract(results: dict):
    for key, value in results.items():
        assert set(value) == {"means", "stderrs"}, key
        assert value["means"], key
        for metric, v in value["means"].items():
            e = value["stderrs"][metric]
            if v is None:  # a frontier level the sweep never reached
                assert e is None and key.startswith("frontier_"), (key, metric)
                continue
            assert isinstance(v, float) and math.isfinite(v), (key, metric, v)
            assert isinstance(e, float) and e >= 0, (key, metric, e)


def test_tiny_model_end_to_end_meets_the_results_contract(tmp_path, model, tok):
    flags = [f for f in tiny_flags(tmp_path / "run", "unused") if not f.startswith("--model")]
    cfg = ex.parse_config(flags)
    results = ex.run(cfg, model=model, tok=tok)
    out = tmp_path / "run"
    assert_contract(json.loads((out / "final_info.json").read_text()))
    for s in ex.STRATEGIES:
        m = results[f"unlearning_{s}"]["means"]
        assert 0 <= m["forget_acc"] <= 1 and 0 <= m["retain_acc"] <= 1 and 0 <= m["unlearning_score"] <= 1
        assert 0 <= results[f"detection_{s}"]["means"]["token_f1"] <= 1
        assert "retain_kl_at_ce_0.5" in results[f"frontier_{s}"]["means"]
    for name in ("learned", "residual", "templates"):
        assert 0 <= results[f"detection_{name}"]["means"]["token_auroc"] <= 1
    sweep = json.loads((out / "sweep.json").read_text())
    # two multipliers: SAEBench's selection for every strategy, the gated one for the gated strategies
    assert len(sweep["points"]) == 2 * (len(ex.STRATEGIES) + len(ex.GATED_STRATEGIES))
    gated = [p for p in sweep["points"] if p["selection"] == "gated"]
    assert {p["strategy"] for p in gated} == set(ex.GATED_STRATEGIES)
    for s in ex.STRATEGIES:
        f = results[f"frontier_{s}"]["means"]
        assert f["precision_point_gated"] in (0.0, 1.0, None)
        assert s in ex.GATED_STRATEGIES or f["retain_kl_gated_share_at_ce_0.25"] in (0.0, None)
    assert results["detection_pattern"]["means"]["fire_rows_retain"] >= results["detection_pattern"]["means"]["fire_rate_retain"]
    for key in ("forget_ce_increase", "retain_kl", "spliced_kl_inside", "spliced_kl_after", "forget_prob_drop",
                "retain_prob_drop", "forget_acc", "retain_acc"):
        assert all(math.isfinite(p[key]) for p in sweep["points"]), key
    assert json.loads((out / "metadata.json").read_text())["status"] == "complete"
    assert ex.load_sae(out).window == cfg.window
    probing = json.loads((out / "sparse_probing.json").read_text())
    assert "domain_forget_vs_retain" in {d["dataset_name"] for d in probing["eval_result_details"]}
    unl = json.loads((out / "unlearning.json").read_text())
    assert unl["eval_type_id"] == "unlearning" and "unlearning_score" in unl["eval_result_metrics"]["unlearning"]
    assert {d["strategy"] for d in unl["eval_result_details"]} == set(ex.STRATEGIES)
    hz = json.loads((out / "detection_horizon.json").read_text())
    assert hz["horizons"] == list(ex.HORIZONS) and set(hz["detectors"]) == {"learned", "residual", "dsg_causal", "templates"}
    gen = [json.loads(l) for l in (out / "generations.jsonl").read_text().splitlines()]
    assert {g["set"] for g in gen} == {"forget", "retain", "spliced"} and {"clean", "true"} <= {g["variant"] for g in gen}
    guarded = [k[len("generation_"):] for k in results if k.startswith("generation_") and k != "generation_clean"]
    assert set(guarded) <= set(ex.CAUSAL_STRATEGIES)
    for s in guarded:
        m = results[f"generation_{s}"]["means"]
        assert 0 <= m["retain_identical"] <= 1 and 0 <= m["forget_first_difference"] <= 6
        assert m["point_forget_ce_increase"] >= ex.GUARD_LEVEL
    assert results["generation_clean"]["means"]["tokens_per_s"] > 0
    lines = (out / "log.jsonl").read_text().splitlines()
    assert lines and all("loss" in json.loads(l) for l in lines)


def test_batchtopk_tsae_run_end_to_end(tmp_path, model, tok):
    """--activation batchtopk --contrastive 0.1 through the whole pipeline: training keeps exactly k per
    token, the inference threshold about k, and the SAE reloads and exports as what it is."""
    out = tmp_path / "run"
    flags = [f for f in tiny_flags(out, "unused", "--activation=batchtopk", "--k=8", "--contrastive=0.1",
                                   "--window=1", "--strategies=standard,pattern") if not f.startswith("--model")]
    results = ex.run(ex.parse_config(flags), model=model, tok=tok)
    assert_contract(json.loads((out / "final_info.json").read_text()))
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert all(l["l0"] == 8 for l in log) and all(math.isfinite(l["contrastive"]) for l in log)
    assert 4 < results["sae"]["means"]["l0"] < 16, results["sae"]["means"]["l0"]
    sae = ex.load_sae(out)
    assert (sae.activation, sae.k) == ("batchtopk", 8) and sae.threshold[0] == log[-1]["threshold"] > 0
    core = json.loads((out / "core.json").read_text())
    assert core["sae_cfg_dict"]["architecture"] == "jumprelu" and core["sae_cfg_dict"]["k"] == 8
    ex.export_saelens(out, tmp_path / "export")
    again = ex.load_sae_folder(tmp_path / "export").sae
    x = torch.randn(2, 6, model.config.hidden_size) * 0.05
    valid = torch.ones(2, 6, dtype=torch.bool)
    assert torch.allclose(again.encode(x, valid), sae.encode(x, valid), atol=1e-5)


def test_row_threshold_run_bounds_the_calibration_rows_that_fire(tmp_path, model, tok):
    """--detector_fpr_unit row through the whole pipeline: at most --detector_fpr of the calibration retain
    rows fire (per token far fewer), the horizon study says which unit it used, the guard's threshold is
    the stricter one."""
    out = tmp_path / "run"
    flags = [f for f in tiny_flags(out, "unused", "--detector_fpr_unit=row", "--detector_fpr=0.25",
                                   "--strategies=standard,pattern", "--no-generate") if not f.startswith("--model")]
    results = ex.run(ex.parse_config(flags), model=model, tok=tok)
    det = results["detection_learned"]["means"]
    assert 0 < det["cal_fire_rows_retain"] <= 0.25 and det["cal_fire_rate_retain"] < det["cal_fire_rows_retain"]
    assert json.loads((out / "detection_horizon.json").read_text())["fpr_unit"] == "row"
    assert json.loads((out / "config.json").read_text())["detector_fpr_unit"] == "row"
    # the same run per token: same SAE and detector weights, a lower threshold, more calibration rows firing
    flags_tok = [f"--out_dir={tmp_path / 'tok'}" if f.startswith("--out_dir") else f
                 for f in flags if not f.startswith("--detector_fpr_unit")]
    tok_det = ex.run(ex.parse_config(flags_tok), model=model, tok=tok)["detection_learned"]["means"]
    row_thr, tok_thr = (json.loads((d / "guard.json").read_text())["learned"]["threshold"] for d in (out, tmp_path / "tok"))
    assert row_thr > tok_thr and tok_det["cal_fire_rows_retain"] > det["cal_fire_rows_retain"]


def test_boundary_splices_come_from_fitting_documents_and_change_the_detector(tmp_path, model, tok):
    """--detector_boundary: the spliced training documents are built from the documents the detector is
    fitted on (never calibration or held-out ones), their boundary tokens enter the fit, the threshold is
    still set on the calibration retain tokens, and a run carries the detector into its guard."""
    out = tmp_path / "run"
    flags = [f for f in tiny_flags(out, "unused", "--strategies=standard,pattern", "--no-generate",
                                   "--detector_boundary=4") if not f.startswith("--model")]
    cfg = ex.parse_config(flags)
    corpora, questions = ex.load_inputs(cfg)
    d = ex.prepare_data(cfg, model, tok, corpora, questions, ex.Stages(), False)
    assert d.boundary is not None and len(d.boundary.rows.mask) == ex.BOUNDARY_SPLICES
    for c in (d.forget, d.retain):
        fit = ex.fitting_docs(c)
        cal = {c.train_docs[i].text for i in set(c.train.doc[ex.calibration_rows(c.train)].tolist())}
        assert fit and not cal & {x.text for x in fit} and not {x.text for x in c.held_docs} & {x.text for x in fit}
    assert ex.boundary_tokens(d.boundary.rows.label, d.boundary.rows.mask, cfg.detector_window).sum() > 0
    sae = ex.TemporalSAE(d.forget.acts_train.shape[-1], 32, 4)
    sp_f, sp_r = (ex.active_fraction(sae, c.acts_train, c.train.mask) for c in (d.forget, d.retain))
    with_b = ex.fit_detectors(cfg, sae, d.forget, d.retain, sp_f, sp_r, d.boundary)
    without = ex.fit_detectors(ex.dataclasses.replace(cfg, detector_boundary=0.0), sae, d.forget, d.retain, sp_f, sp_r)
    assert not torch.allclose(with_b.learned.weight, without.learned.weight)
    assert not torch.allclose(with_b.residual.weight, without.residual.weight)
    with pytest.raises(ex.UsageError, match="--detector_boundary needs"):
        ex.fit_detectors(cfg, sae, d.forget, d.retain, sp_f, sp_r)
    results = ex.run(cfg, model=model, tok=tok)
    assert results["detection_learned"]["means"]["cal_fire_rate_retain"] <= cfg.detector_fpr + 1e-9
    assert json.loads((out / "config.json").read_text())["detector_boundary"] == 4.0
    run_sae = ex.load_sae(out)
    sp_f, sp_r = (ex.active_fraction(run_sae, c.acts_train, c.train.mask) for c in (d.forget, d.retain))
    refit = ex.fit_detectors(cfg, run_sae, d.forget, d.retain, sp_f, sp_r, d.boundary).learned
    assert torch.allclose(ex.load_guard(out, "pattern", level=0.0).clamp.detector.weight, refit.weight, atol=1e-6)


def paired_runs(tmp_path, model, tok, flag: str, *extra: str) -> tuple[dict, dict]:
    """A tiny in-process run with `flag` (in tmp_path/with) and the same run without it (tmp_path/without)."""
    def one(name, *more):
        flags = [f for f in tiny_flags(tmp_path / name, "unused", *extra, *more) if not f.startswith("--model")]
        return ex.run(ex.parse_config(flags), model=model, tok=tok)
    return one("with", flag), one("without")


def test_random_control_is_swept_beside_each_selection_and_kept_off_the_frontiers(tmp_path, model, tok):
    """--random_control: a twin of each selection, the same size, swept by the same strategies as
    <strategy>_random points with entries of their own; the strategies' own points, frontiers and guard
    are those of the same run without it."""
    res, plain = paired_runs(tmp_path, model, tok, "--random_control", "--strategies=standard,pattern", "--no-generate")
    pts = json.loads((tmp_path / "with" / "sweep.json").read_text())["points"]
    own = [p for p in pts if not p["strategy"].endswith("_random")]
    assert own == json.loads((tmp_path / "without" / "sweep.json").read_text())["points"]
    ctrl = [p for p in pts if p["strategy"].endswith("_random")]
    assert {(p["strategy"], p["selection"]) for p in ctrl} == {
        ("standard_random", "random_saebench"), ("pattern_random", "random_saebench"), ("pattern_random", "random_gated")}
    size = {(p["selection"], p["n_features"]): p["n_selected"] for p in own}
    assert all(p["n_selected"] == size[(p["selection"][len("random_"):], p["n_features"])] for p in ctrl)
    meta = json.loads((tmp_path / "with" / "guard.json").read_text())
    tensors = ex._read_tensors(tmp_path / "with" / "guard.safetensors")
    lat = {x["rule"]: set(tensors[f"selection.{i}.latents"].tolist()) for i, x in enumerate(meta["selections"])}
    assert not lat["saebench"] & lat["random_saebench"] and not lat["gated"] & lat["random_gated"]
    for s in ("standard", "pattern"):
        assert res[f"frontier_{s}"] == plain[f"frontier_{s}"] and res[f"unlearning_{s}"] == plain[f"unlearning_{s}"]
        assert "forget_ce_within_retain_kl_0.01" in res[f"frontier_{s}_random"]["means"]
        assert 0 <= res[f"unlearning_{s}_random"]["means"]["unlearning_score"] <= 1
    assert "frontier_pattern_random" not in plain
    assert ex.load_guard(tmp_path / "with", "pattern", level=0.0).point == ex.load_guard(tmp_path / "without", "pattern", level=0.0).point


@pytest.mark.parametrize("gate", ["residual", "combined"])
def test_other_gate_clamps_where_its_detector_fires(tmp_path, model, tok, gate):
    """--detector residual (the lag detector over raw residuals, no SAE) or combined (over latents and
    residual side by side): pattern gates on it and the gated selection is made where it fires; standard
    reads no detector, so its points equal the learned run's. With --pattern_clamp all and a hard gate,
    pattern clamps exactly where its gate fires."""
    res, lrn = paired_runs(tmp_path, model, tok, f"--detector={gate}", "--strategies=standard,pattern", "--pattern_clamp=all")
    for r, g in ((res, gate), (lrn, "learned")):
        for k in ("fire_rate_forget", "fire_rate_retain", "spliced_recall", "fire_rows_retain"):
            assert r["detection_pattern"]["means"][k] == r[f"detection_{g}"]["means"][k], (g, k)
    assert res[f"detection_{gate}"]["means"]["fire_rate_forget"] != res["detection_learned"]["means"]["fire_rate_forget"]
    assert res["detection_learned"] == lrn["detection_learned"] and res["detection_residual"] == lrn["detection_residual"]
    assert ("detection_combined" in res) == (gate == "combined") and "detection_combined" not in lrn
    pts = {x: json.loads((tmp_path / x / "sweep.json").read_text())["points"] for x in ("with", "without")}
    assert [p for p in pts["with"] if p["strategy"] == "standard"] == [p for p in pts["without"] if p["strategy"] == "standard"]
    assert [p for p in pts["with"] if p["strategy"] == "pattern"] != [p for p in pts["without"] if p["strategy"] == "pattern"]
    # the guard carries the gate (and the learned detector, the generation stage's reference), so the run's
    # generation stage runs pattern with it (where pattern reaches the guard's level: not in a tiny run)
    meta = json.loads((tmp_path / "with" / "guard.json").read_text())
    assert meta["detector"] == gate and meta["gate"]["reads"] == {"residual": "residual", "combined": "both"}[gate]
    det = ex.load_guard(tmp_path / "with", "pattern", level=0.0).clamp.detector
    assert (det.idx is None, det.resid) == {"residual": (True, False), "combined": (False, True)}[gate]
    assert det.threshold == meta["gate"]["threshold"] != meta["learned"]["threshold"]
    assert ex.run_detector(tmp_path / "with").threshold == meta["learned"]["threshold"]
    assert ex.guard_carries_gate(gate, "pattern") and not ex.guard_carries_gate("templates", "pattern")
    # guard state written before guards carried the gate: refused, not silently gated on the learned detector
    del meta["gate"]
    (tmp_path / "with" / "guard.json").write_text(json.dumps(meta))
    with pytest.raises(ex.UsageError, match="predates"):
        ex.load_guard(tmp_path / "with", "pattern", level=0.0)
    first = next(i for i, p in enumerate(pts["with"]) if p["strategy"] == "standard")
    assert ex.load_guard(tmp_path / "with", "standard", point=first).point == pts["with"][first]


def test_steer_edit_run_moves_pattern_only_and_the_guard_carries_the_direction(tmp_path, model, tok):
    """--pattern_edit steer: pattern's points change and standard's equal the clamp run's; the direction
    is a unit vector saved with the guard state, which pattern's guard reads back (standard's stays a
    clamp), and state without it is refused."""
    res, plain = paired_runs(tmp_path, model, tok, "--pattern_edit=steer", "--strategies=standard,pattern",
                              "--pattern_clamp=all", "--no-generate")  # all: in a tiny run the hard gate seldom acts
    pts = {x: json.loads((tmp_path / x / "sweep.json").read_text())["points"] for x in ("with", "without")}
    mine = lambda x, s: [p for p in pts[x] if p["strategy"] == s]
    assert mine("with", "standard") == mine("without", "standard") and res["frontier_standard"] == plain["frontier_standard"]
    assert mine("with", "pattern") != mine("without", "pattern")
    assert res["detection_learned"] == plain["detection_learned"]
    meta = json.loads((tmp_path / "with" / "guard.json").read_text())
    assert meta["pattern_edit"] == "steer"
    at = lambda x, s: next(i for i, p in enumerate(pts[x]) if p["strategy"] == s)
    g = ex.load_guard(tmp_path / "with", "pattern", point=at("with", "pattern"))
    assert g.clamp.steer is not None and abs(float(g.clamp.steer.norm()) - 1.0) < 1e-5
    assert ex.load_guard(tmp_path / "with", "standard", point=at("with", "standard")).clamp.steer is None
    assert ex.load_guard(tmp_path / "without", "pattern", point=at("without", "pattern")).clamp.steer is None
    tensors = ex._read_tensors(tmp_path / "with" / "guard.safetensors")
    del tensors["steer"]
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "with" / "guard.safetensors"))
    with pytest.raises(ex.UsageError, match="no steer direction"):
        ex.load_guard(tmp_path / "with", "pattern", point=at("with", "pattern"))


def test_hold_run_fires_on_fewer_calibration_rows_and_the_guard_carries_the_hold(tmp_path, model, tok):
    """--hold_rows: standard reads no detector, so its points equal the one-threshold run's; the learned
    detector's calibration retain rows with a fire are at most hold_rows of the one-threshold run's at no
    more than its per-token rate; the guard state carries the hold and pattern's guard reads it back."""
    res, plain = paired_runs(tmp_path, model, tok, "--hold_rows=0.5", "--strategies=standard,pattern", "--no-generate")
    pts = {x: json.loads((tmp_path / x / "sweep.json").read_text())["points"] for x in ("with", "without")}
    mine = lambda x, s: [p for p in pts[x] if p["strategy"] == s]
    assert mine("with", "standard") == mine("without", "standard")
    m, m0 = res["detection_learned"]["means"], plain["detection_learned"]["means"]
    assert 0 < m0["cal_fire_rows_retain"] and m["cal_fire_rows_retain"] <= 0.5 * m0["cal_fire_rows_retain"] + 1e-9
    assert m["cal_fire_rate_retain"] <= 0.01 + 1e-9 and m["token_auroc"] == m0["token_auroc"]
    meta = json.loads((tmp_path / "with" / "guard.json").read_text())
    assert meta["learned"]["hold"] > 0 and json.loads((tmp_path / "without" / "guard.json").read_text())["learned"]["hold"] == 0
    at = next(i for i, p in enumerate(pts["with"]) if p["strategy"] == "pattern")
    assert ex.load_guard(tmp_path / "with", "pattern", point=at).clamp.detector.hold == meta["learned"]["hold"]


def test_seeds_run_once_each_and_aggregate(tmp_path, model, tok):
    flags = [f for f in tiny_flags(tmp_path / "run", "unused", "--seeds=0,1", "--strategies=standard,pattern")
             if not f.startswith("--model")]
    results = ex.run(ex.parse_config(flags), model=model, tok=tok)
    per = [json.loads((tmp_path / "run" / f"seed_{k}" / "final_info.json").read_text()) for k in (0, 1)]
    v = [p["sae"]["means"]["fve"] for p in per]
    assert v[0] != v[1], "the seeds trained the same SAE"
    assert results["sae"]["means"]["fve"] == pytest.approx(sum(v) / 2)
    assert results["sae"]["stderrs"]["fve"] == pytest.approx(abs(v[0] - v[1]) / 2)
    assert results["seeds"]["means"]["n_seeds"] == 2.0
    assert json.loads((tmp_path / "run" / "final_info.json").read_text()) == results
    # killed after seed 0 finished: --resume reuses seed 0's results and runs seed 1 again
    (tmp_path / "run" / "final_info.json").unlink()
    shutil.rmtree(tmp_path / "run" / "seed_1")
    again = ex.run(ex.parse_config(flags + ["--resume"]), model=model, tok=tok)
    assert again["sae"] == results["sae"]


def sweep_inputs(tmp_path, model, tok, *extra):
    """What run_sweep takes, for a tiny run with these flags: (cfg, data, SAE, SAEBench selections, detectors)."""
    cfg = ex.parse_config([f for f in tiny_flags(tmp_path / "run", "unused", *extra) if not f.startswith("--model")])
    corpora, questions = ex.load_inputs(cfg)
    d = ex.prepare_data(cfg, model, tok, corpora, questions, ex.Stages(), False)
    acts = torch.cat([d.forget.acts_train, d.retain.acts_train])
    mask = torch.cat([d.forget.train.mask, d.retain.train.mask])
    sae = ex.train_sae(cfg, acts, mask, torch.device("cpu"), tmp_path)
    sp_f = ex.active_fraction(sae, d.forget.acts_train, d.forget.train.mask)
    sp_r = ex.active_fraction(sae, d.retain.acts_train, d.retain.train.mask)
    sels = ex.make_selections(cfg, sae, d.forget, d.retain, sp_f, sp_r)
    return cfg, d, sae, sels, ex.fit_detectors(cfg, sae, d.forget, d.retain, sp_f, sp_r)


def test_grouped_sweep_measures_equal_one_point_at_a_time(tmp_path, model, tok):
    """The sweep measures all strategies of a selection and multiplier together (identical row edits
    run once); each must equal measuring that strategy's intervention alone."""
    cfg, d, sae, sels, dets = sweep_inputs(tmp_path, model, tok)
    points, _ = ex.run_sweep(cfg, model, sae, sels[:1], dets, d, False)
    for p in points[:len(ex.STRATEGIES)]:
        alone, _ = ex.point_measures(model, cfg.layer, ex.clamp_fn(sae, ex.make_clamp(cfg, sels[0], dets, p["strategy"],
                                                                                     p["multiplier"])), d)
        for k, (v, e) in alone.items():
            assert p[k] == pytest.approx(v, abs=1e-6, nan_ok=True), (p["strategy"], k)
        # what refine_guard measures at a multiplier is the sweep's own figure there
        fn = ex.clamp_fn(sae, ex.make_clamp(cfg, sels[0], dets, p["strategy"], p["multiplier"]))
        assert ex.level_at(model, cfg.layer, fn, d) == pytest.approx((p["forget_ce_increase"], p["retain_kl"]), abs=1e-6)
        assert ex.level_at(model, cfg.layer, fn, d, retain=False)[0] == pytest.approx(p["forget_ce_increase"], abs=1e-6)
    # in shares, as ranks sharing a seed under torchrun measure it (3 shares of 2 groups: one is empty),
    # then concatenated: the same points and spliced KL, bit for bit
    _, kl = ex.run_sweep(cfg, model, sae, sels[:1], dets, d, False)
    parts = [ex.run_sweep(cfg, model, sae, sels[:1], dets, d, False, (i, 3)) for i in range(3)]
    assert [len(pts) for pts, _ in parts] == [0, len(points) // 2, len(points) // 2]
    assert json.dumps([x for pts, _ in parts for x in pts]) == json.dumps(points)
    assert all(torch.equal(a, b) for a, b in zip([x for _, ks in parts for x in ks], kl, strict=True))


def test_sweep_measures_an_edit_that_ignores_the_selection_once(tmp_path, model, tok, monkeypatch):
    """Under --pattern_clamp all --pattern_edit steer, pattern's edit does not read the selected latents: the
    sweep measures it under the first selection only and reuses the measures, which equal measuring again."""
    cfg, d, sae, sels, dets = sweep_inputs(tmp_path, model, tok, "--strategies=standard,pattern", "--pattern_clamp=all",
                                           "--pattern_edit=steer", "--multipliers=3,30", "--n_features=3,6",
                                           "--detector_fpr=0.3")  # a loose threshold: the tiny model's gate opens
    sels = sels[:2]
    assert len(sels) == 2 and not torch.equal(sels[0].latents, sels[1].latents)
    asked, measure = [], ex.measure_edits
    monkeypatch.setattr(ex, "measure_edits",
                        lambda m, l, dd, e, reach=None: asked.extend(e["forget"][0]) or measure(m, l, dd, e, reach))
    points, kl = ex.run_sweep(cfg, model, sae, sels, dets, d, False)
    assert asked.count("pattern") == len(cfg.multipliers) and asked.count("standard") == 2 * len(cfg.multipliers)
    # every fingerprint distinct: each point measured in its own group, as before the reuse
    monkeypatch.setattr(ex, "edit_fingerprint", lambda e, s, n=iter(range(10 ** 6)): str(next(n)))
    again, kl_again = ex.run_sweep(cfg, model, sae, sels, dets, d, False)
    assert len(points) == len(again) == 4 * len(cfg.multipliers)
    for p, q in zip(points, again, strict=True):
        assert p.keys() == q.keys() and all(p[k] == pytest.approx(q[k], abs=1e-6, nan_ok=True) for k in p), p["strategy"]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(kl, kl_again, strict=True))
    pat = [p for p in points if p["strategy"] == "pattern"]
    assert pat[0]["n_selected"] != pat[len(cfg.multipliers)]["n_selected"], "each point keeps its own selection"
    assert pat[0]["forget_ce_increase"] == pat[len(cfg.multipliers)]["forget_ce_increase"]
    assert abs(pat[-1]["forget_ce_increase"]) > 1e-3, "the steer never acted: nothing was reused but 'no edit'"


def test_position_threshold_run_carries_its_offsets_to_the_guard(tmp_path, model, tok, monkeypatch):
    """--detector_fpr_unit position through the whole pipeline (the buckets moved inside the tiny model's
    32-token rows): every bucket has its own threshold, the guard reads the same offsets back, held-out
    retain false alarms are reported per bucket, and the horizon study says which unit it used."""
    monkeypatch.setattr(ex, "POSITION_BUCKETS", (9, 17))
    out = tmp_path / "run"
    flags = [f for f in tiny_flags(out, "unused", "--detector_fpr_unit=position", "--detector_fpr=0.05",
                                   "--strategies=standard,pattern", "--no-generate") if not f.startswith("--model")]
    results = ex.run(ex.parse_config(flags), model=model, tok=tok)
    offsets = json.loads((out / "guard.json").read_text())["learned"]["offsets"]
    assert len(offsets) == 3 and offsets[-1] == 0.0 and any(o != 0.0 for o in offsets)
    assert ex.load_guard(out, "pattern", level=0.0).clamp.detector.offsets == tuple(offsets)
    by_pos = {k: v for k, v in results["detection_learned"]["means"].items() if k.startswith("fire_rate_retain_tokens_")}
    assert list(by_pos) == ["fire_rate_retain_tokens_1_8", "fire_rate_retain_tokens_9_16", "fire_rate_retain_tokens_17_on"]
    assert json.loads((out / "detection_horizon.json").read_text())["fpr_unit"] == "position"


def test_reach_zero_and_one_read_an_edit_at_the_edited_token_and_the_next_only(model, tok):
    """--pattern_reach on single edited positions: with reach 0 only the edited position changes, and with
    reach 1 also the next; each of those equals the full hooked forward there (it reads the edited keys and
    values of that one position and clean ones before it), every later position keeps its clean value, and
    `hit` marks exactly the positions reached. Reach -1 stays the full forward everywhere."""
    rows = some_rows(tok, n=3)
    b = ex.clean_forward(model, 1, rows.tokens, rows.attn, keep_kv=True)
    at = [6, 11, 9]  # one edited position per row
    new = b.resid.clone()
    for r, p in enumerate(at):
        new[r, p] = new[r, p] * 0.3 + 2.0
    with torch.no_grad(), ex.intervene(model, 1, lambda x: new):
        full = model.base_model(input_ids=rows.tokens, attention_mask=rows.attn.long()).last_hidden_state
    for k in (0, 1):
        rr = ex.rerun_many(model, 1, b, {"p": new}, reach={"p": k})
        assert torch.equal(rr.rows, torch.arange(3))
        for r, p in enumerate(at):
            assert torch.allclose(rr.h[r, p:p + k + 1], full[r, p:p + k + 1], atol=1e-5)
            assert not torch.allclose(rr.h[r, p + k], b.final[r, p + k], atol=1e-3)
            assert torch.allclose(rr.h[r, p + k + 1:], b.final[r, p + k + 1:], atol=1e-5)
            assert torch.allclose(rr.h[r, :p], b.final[r, :p], atol=1e-5)
            want = torch.zeros(rr.hit.shape[1], dtype=torch.bool)
            want[p:p + k + 1] = True
            assert torch.equal(rr.hit[r], want)
    everywhere = ex.rerun_many(model, 1, b, {"p": new}, reach={"p": -1})
    assert torch.allclose(everywhere.h, full[everywhere.rows], atol=1e-5)


def test_reach_rerun_from_mid_row_equals_whole_row_and_keeps_edits_of_two_reaches_apart(model, tok):
    """A reach re-run that starts at a row's first edit gives what run_tail gives from position 0 with
    the same mask; the same edited rows at two reaches are two re-runs, not one."""
    rows = some_rows(tok, n=3)
    b = ex.clean_forward(model, 1, rows.tokens, rows.attn, keep_kv=True)
    new = b.resid.clone()
    new[0, 7:10] += 0.7
    new[2, 12:] *= 0.4
    rr = ex.rerun_many(model, 1, b, {"a": new, "b": new.clone()}, reach={"a": 2, "b": 5})
    assert len(rr.rows) == 4 and not set(rr.use["a"].tolist()) & set(rr.use["b"].tolist())
    changed = (new != b.resid).any(-1)
    for key, k in (("a", 2), ("b", 5)):
        with torch.no_grad(), ex.intervene(model, 1, lambda x: new):
            whole = ex.run_tail(model, 1, b, 0, k, changed)
        for j, r in zip(rr.use[key].tolist(), (0, 2)):
            assert torch.allclose(rr.h[j], whole[r], atol=1e-4)
    assert not torch.allclose(rr.h[rr.use["a"][1]], rr.h[rr.use["b"][1]], atol=1e-3)
    plain = ex.clean_forward(model, 1, rows.tokens, rows.attn)
    with pytest.raises(ex.UsageError, match="pattern_reach"):
        ex.rerun_many(model, 1, plain, {"a": new}, reach={"a": 1})


def test_reach_run_changes_pattern_only_and_its_guard_is_refused(tmp_path, model, tok):
    """--pattern_reach 1: standard's points equal the plain run's, pattern's differ; the generation stage
    is refused with it (one line), and so is pattern's guard from the folder, while standard's loads."""
    res, plain = paired_runs(tmp_path, model, tok, "--pattern_reach=1", "--strategies=standard,pattern",
                             "--pattern_clamp=all", "--no-generate")
    pts = {x: json.loads((tmp_path / x / "sweep.json").read_text())["points"] for x in ("with", "without")}
    mine = lambda x, s: [p for p in pts[x] if p["strategy"] == s]
    assert mine("with", "standard") == mine("without", "standard")
    assert mine("with", "pattern") != mine("without", "pattern")
    assert json.loads((tmp_path / "with" / "guard.json").read_text())["pattern_reach"] == 1
    at = lambda s: next(i for i, p in enumerate(pts["with"]) if p["strategy"] == s)
    with pytest.raises(ex.UsageError, match="pattern_reach 1"):
        ex.load_guard(tmp_path / "with", "pattern", point=at("pattern"))
    assert ex.load_guard(tmp_path / "with", "standard", point=at("standard")).point == pts["with"][at("standard")]
    with pytest.raises(ex.UsageError, match="no-generate"):
        ex.parse_config(["--pattern_reach=1"])
    with pytest.raises(ex.UsageError, match="pattern_reach"):
        ex.parse_config(["--pattern_reach=-2", "--no-generate"])

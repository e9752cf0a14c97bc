"""Activations, the intervention hook, the re-run of later blocks, and a whole run on a tiny model."""
import json
import math

import pytest
import torch

import experiment as ex
from conftest import tiny_flags


def n_hooks(model) -> int:
    """Hooks on the blocks (transformers adds its own once, so tests compare before and after)."""
    return sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in ex.blocks_of(model))


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


def test_hook_is_removed_even_on_error(model):
    before = n_hooks(model)
    with pytest.raises(RuntimeError):
        with ex.intervene(model, 1, lambda x: x):
            raise RuntimeError("boom")
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


def test_tail_rerun_equals_full_forward_under_an_intervention(model, tok):
    """The fast path (cached input of block `layer`, later blocks only) equals the slow path."""
    rows = some_rows(tok)
    fn = lambda x: x * 0.5 + 1.0
    before = n_hooks(model)
    with torch.no_grad():
        with ex.intervene(model, 1, fn):
            slow = full_logits(model, rows.tokens, rows.attn)
        tb = ex.clean_forward(model, 1, rows.tokens, rows.attn)
        fast = ex.logits_at(model, ex.tail_hidden(model, 1, tb, fn))
        clean = ex.logits_at(model, ex.tail_hidden(model, 1, tb, None))
    assert torch.allclose(fast, slow, atol=1e-5)
    assert torch.allclose(clean, full_logits(model, rows.tokens, rows.attn), atol=1e-5)
    assert n_hooks(model) == before


def test_row_subset_rerun_matches_whole_batch(model, tok):
    rows = some_rows(tok, n=4)
    tb = ex.clean_forward(model, 1, rows.tokens, rows.attn)
    c = tb.resid[:, 1, 0].median()  # a row-wise rule that changes some rows and leaves the others
    some_rows_fn = lambda x: torch.where(x[:, 1:2, :1] > c, x * 2, x)
    changed = tb.resid[:, 1, 0] > c
    assert changed.any() and not changed.all()
    h = ex.tail_hidden(model, 1, tb, some_rows_fn)
    with torch.no_grad(), ex.intervene(model, 1, some_rows_fn):
        whole = ex.run_tail(model, 1, tb)
    assert torch.allclose(h, whole, atol=1e-5)
    assert torch.equal(h[~changed], tb.final_BTD[~changed])


def test_zero_multiplier_without_clamping_gives_exact_clean_logits(model, tok):
    rows = some_rows(tok)
    d = model.config.hidden_size
    sae = ex.TemporalSAE(d, 16, window=4, d_head=4)
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)  # no latent ever fires: nothing to clamp
    tb = ex.clean_forward(model, 1, rows.tokens, rows.attn)
    for strategy in ex.STRATEGIES:
        c = ex.Clamp(torch.tensor([0, 3]), 0.0, strategy, ex.Detector(torch.ones(1, 8), 4, 0.8), torch.zeros(2))
        fn = ex.clamp_fn(sae, c)
        with torch.no_grad(), ex.intervene(model, 1, fn):
            hooked = full_logits(model, rows.tokens, rows.attn)
        assert torch.equal(hooked, full_logits(model, rows.tokens, rows.attn)), strategy
        assert torch.equal(ex.tail_hidden(model, 1, tb, fn), tb.final_BTD)


def test_clamp_sets_selected_latents_and_keeps_the_error_term():
    torch.manual_seed(0)
    sae = ex.TemporalSAE(8, 12, window=1)
    x = torch.randn(2, 5, 8) * 3
    valid = ex.row_valid(x)
    lat = torch.tensor([1, 4])
    fn = ex.clamp_fn(sae, ex.Clamp(lat, 7.0, "standard", None, None))
    new = fn(x)
    f_old = sae.encode(x, valid)
    assert (f_old[:, 1:, lat] > 0).any()
    expected = f_old.clone()
    expected[..., lat] = torch.where(f_old[..., lat] > 0, -7.0, f_old[..., lat])
    # resid' - decode(f') == resid - decode(f): the SAE's error term is untouched
    v = valid.unsqueeze(-1).expand_as(x)
    assert torch.allclose((new - sae.decode(expected))[v], (x - sae.decode(f_old))[v], atol=1e-4)
    assert torch.equal(new[:, 0], x[:, 0])  # BOS is never clamped


def test_qa_subset_keeps_answers(model, tok):
    qs = ex.load_questions("embedded", "retain")[:6]
    qa = ex.prepare_qa(model, tok, 1, qs, "cloze", 2)
    correct = ex.qa_correct(model, tok, 1, qa, None)
    keep = torch.tensor([True, False, True, True, False, True])
    sub = ex.subset_qa(qa, keep)
    assert torch.equal(ex.qa_correct(model, tok, 1, sub, None), correct[keep])
    direct = ex.prepare_qa(model, tok, 1, [q for q, k in zip(qs, keep) if k], "cloze", 2)
    assert torch.equal(ex.qa_correct(model, tok, 1, direct, None), correct[keep])


def test_letter_scoring_runs(model, tok):
    qs = ex.load_questions("embedded", "forget")[:3]
    qa = ex.prepare_qa(model, tok, 1, qs, "letter", 4)
    assert ex.qa_correct(model, tok, 1, qa, None).shape == (3,)


def assert_contract(results: dict):
    for key, value in results.items():
        assert set(value) == {"means", "stderrs"}, key
        assert value["means"], key
        for metric, v in value["means"].items():
            assert isinstance(v, float) and math.isfinite(v), (key, metric, v)
            assert isinstance(value["stderrs"][metric], float) and value["stderrs"][metric] >= 0


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
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["points"]) == 2 * 1 * 1 * len(ex.STRATEGIES)
    assert json.loads((out / "metadata.json").read_text())["status"] == "complete"
    assert ex.load_sae(out).window == cfg.window
    probing = json.loads((out / "sparse_probing.json").read_text())
    assert "domain_forget_vs_retain" in probing["eval_result_details"]
    lines = (out / "log.jsonl").read_text().splitlines()
    assert lines and all("loss" in json.loads(l) for l in lines)

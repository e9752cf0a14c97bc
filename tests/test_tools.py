"""tools/budget_curve.py on hand-made sweeps: the curve it reads off the Pareto front, and its errors."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import budget_curve  # noqa: E402


def point(strategy, ce, kl):
    return {"strategy": strategy, "forget_ce_increase": ce, "retain_kl": kl, "retain_kl_stderr": 0.0}


def write_seed(folder: Path, points):
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"retain_gate": 0.99, "points": points}))


def test_reach_within_follows_the_front():
    # (ce 1, kl 0.1) and (ce 2, kl 0.3) are on the front; (ce 0.5, kl 0.2) is beaten by (1, 0.1)
    pts = [point("a", 1.0, 0.1), point("a", 2.0, 0.3), point("a", 0.5, 0.2), point("b", 9.0, 0.0)]
    got = budget_curve.reach_within(pts, "a", budgets=(0.05, 0.1, 0.2, 0.3, 1.0))
    assert got == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])  # 0.05: half way from the clean model to (1, 0.1)
    assert budget_curve.reach_within(pts, "b", budgets=(0.0,)) == [9.0]
    assert budget_curve.reach_within(pts, "c") is None


def test_curves_over_seeds_and_wins(tmp_path, capsys):
    write_seed(tmp_path / "run" / "seed_0", [point("pattern", 2.0, 0.01), point("dsg", 1.0, 0.0)])
    write_seed(tmp_path / "run" / "seed_1", [point("pattern", 1.0, 0.01), point("dsg", 3.0, 0.0)])
    c = budget_curve.curves(tmp_path / "run")
    assert c["pattern"].shape == (2, len(budget_curve.BUDGETS))
    assert c["dsg"][:, 0].tolist() == [1.0, 3.0]  # dsg reaches its whole increase at zero retain KL
    assert budget_curve.main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "| dsg | 2.00 ± 1.00 |" in out
    assert "0.01: 1/1" in out  # each strategy reaches further on one seed at budget 0.01


def test_random_control_curves_and_plot(tmp_path, capsys):
    """A --random_control sweep: <strategy>_random is a curve of its own, compared seed by seed, drawn."""
    for k, (a, b) in enumerate(((2.0, 1.0), (3.0, 0.5))):
        write_seed(tmp_path / "run" / f"seed_{k}", [point("pattern", a, 0.001), point("pattern_random", b, 0.001)])
    assert budget_curve.main([str(tmp_path / "run"), "--versus", "pattern,pattern_random",
                              "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "| pattern_random | 0.75 ± 0.25 |" in out and "0.001: 2/0" in out
    assert (tmp_path / "c.png").stat().st_size > 0


def test_missing_sweep_is_one_line_error(tmp_path, capsys):
    (tmp_path / "run" / "seed_0").mkdir(parents=True)
    assert budget_curve.main([str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "sweep.json" in err and "\n" not in err


def test_the_curve_agrees_with_final_infos_two_budgets():
    import experiment as ex
    pts = [dict(point("pattern", ce, kl), spliced_kl_after=kl, spliced_kl_after_stderr=0.0, precision_auroc=0.7)
           for ce, kl in ((0.3, 0.002), (0.8, 0.02), (2.0, 0.04), (3.0, 0.2), (1.0, 0.5))]
    entry = ex.frontier_entry(pts, pts)["means"]
    got = budget_curve.reach_within(pts, "pattern", budgets=ex.FRONTIER_BUDGETS)
    assert got == pytest.approx([entry[f"forget_ce_within_retain_kl_{b}"] for b in ex.FRONTIER_BUDGETS])


def write_evidence_seed(folder: Path, points, fire_rows):
    write_seed(folder, points)
    info = {"detection_learned": {"means": {"fire_rows_retain": fire_rows, "token_auroc": 0.9}, "stderrs": {}},
            "frontier_pattern": {"means": {"precision_auroc_at_ce_0.5": 0.6}, "stderrs": {}}}
    (folder / "final_info.json").write_text(json.dumps(info))


def test_evidence_compare_tables_and_figure(tmp_path, capsys):
    import evidence_compare
    for acc, rows in (("ema", (0.4, 0.2)), ("hmm", (0.1, 0.3))):
        for k, (ce, fr) in enumerate(zip((2.0, 1.0), rows)):
            write_evidence_seed(tmp_path / acc / f"seed_{k}",
                                [point("pattern", ce + (acc == "hmm"), 0.01), point("dsg", 1.5, 0.0)], fr)
    fig = tmp_path / "fig" / "evidence.png"
    pair = "toy=" + ",".join(str(tmp_path / a) for a in ("ema", "hmm"))
    assert evidence_compare.main(["--pair", pair, "--plot", str(fig)]) == 0
    out = capsys.readouterr().out
    # within KL 0.001 each seed's pattern reaches a tenth of its point (ce, 0.01): ema 0.2 and 0.1, hmm 0.3 and 0.2;
    # within 0.01 the point itself
    assert "| pattern, ema | 0.15 ± 0.05 | 0.75 ± 0.25 | 1.50 ± 0.50 | 1.50 ± 0.50 |" in out
    assert "| pattern, hmm | 0.25 ± 0.05 | 1.25 ± 0.25 | 2.50 ± 0.50 | 2.50 ± 0.50 |" in out
    assert "| dsg, hmm | 1.50 ± 0.00 |" in out
    # fire rows: ema 0.3 ± 0.1, hmm 0.2 ± 0.1: within two stderrs, so the seeds are counted (hmm higher on 1, lower on 1)
    assert "| detector retain rows with a fire | 0.300 ± 0.100 | 0.200 ± 0.100 (1/1) |" in out
    assert "| detection spliced AUROC | - | - |" in out  # not in these final_infos: shown as missing, not as 0
    assert fig.is_file() and fig.stat().st_size > 0
    assert evidence_compare.main(["--pair", pair, "--labels", "token,row"]) == 0
    out = capsys.readouterr().out
    assert "| pattern, row | 0.25 ± 0.05 |" in out and "| measure | token | row |" in out


def test_evidence_compare_bad_pair_is_one_line_error(tmp_path, capsys):
    import evidence_compare
    assert evidence_compare.main(["--pair", f"toy={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "NAME=FIRST_RUN,SECOND_RUN" in err and "\n" not in err
    assert evidence_compare.main(["--pair", f"toy={tmp_path},{tmp_path / 'nope'}"]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert evidence_compare.main(["--pair", f"toy={tmp_path},{tmp_path}", "--labels", "row"]) == 1
    assert "expected two different names" in capsys.readouterr().err


def scan_flags(model_dir):
    return [f"--model={model_dir}", "--layer=1", "--d_sae=64", "--d_head=8", "--train_tokens=3000",
            "--batch_tokens=512", "--max_corpus_tokens=8000", "--context_length=32", "--device=cpu",
            "--activation=batchtopk", "--k=4"]


def test_contrastive_scan_trains_one_sae_per_weight(model_dir, capsys):
    import contrastive_scan
    assert contrastive_scan.main(["--weights", "0,1"] + scan_flags(model_dir)) == 0
    rows = [l.split(" | ") for l in capsys.readouterr().out.splitlines() if l[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"]
    for r in rows:
        fve, fve_high, l0 = float(r[1]), float(r[2]), float(r[3])
        assert fve_high <= fve + 1e-6 and 0 < l0 <= 64  # 13 of 64 latents can explain no more than all 64
        nce, chance = (float(x) for x in r[4].replace("(", "").replace(")", "").split())
        assert nce > 0 and chance > 0


def test_contrastive_scan_refuses_a_negative_weight(model_dir, capsys):
    import contrastive_scan
    assert contrastive_scan.main(["--weights", "-1"] + scan_flags(model_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert "--weights" in err and "\n" not in err


def test_selection_scan_attribution_is_the_first_order_ablation_effect(model):
    """tools/selection_scan.attribution_batch: for each latent, the CE change of ablating it where the
    detector fires (resid - f_i d_i there), to first order; checked by central differences on a tiny
    random model and a w=4 SAE, and zero where nothing fires."""
    import copy
    import torch
    import experiment as ex
    import selection_scan
    m = copy.deepcopy(model).double()
    torch.manual_seed(0)
    sae = ex.TemporalSAE(m.config.hidden_size, 48, window=4, d_head=8).double()
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    tokens = torch.randint(3, m.config.vocab_size, (2, 12))
    attn = torch.ones(2, 12, dtype=torch.bool)
    attn[1, 9:] = False  # a padded row
    b = ex.clean_forward(m, 1, tokens, attn)
    b = b._replace(resid=b.resid.double())
    fires = (torch.rand(2, 12) < 0.5) & b.time.valid
    score = selection_scan.attribution_batch(m, 1, sae, b, fires)
    assert score.shape == (48,)

    def ce(resid):
        h = ex.run_tail(m, 1, b._replace(resid=resid))
        # fp64 logits: logits_at rounds to fp32, too coarse for a difference quotient
        lp = torch.log_softmax(m.get_output_embeddings()(h[:, :-1]), -1).gather(-1, b.tokens[:, 1:, None])[..., 0]
        return float(-(lp * ex.scored(b.attn)).sum())
    with torch.no_grad():
        f = sae.encode(b.resid, b.time.valid, None, b.time.prev)
    active = [i for i in range(48) if (f[..., i] * fires).abs().sum() > 0][:5]
    assert active, "no latent active where the detector fires: the check would be empty"
    eps = 1e-3  # smaller steps meet the rounding of the blocks' fp32 parts
    for i in active:
        step = (f[..., i] * fires).unsqueeze(-1) * sae.W_dec[i].detach() / sae.scale  # f_i(t) d_i where it fires
        numeric = (ce(b.resid - eps * step) - ce(b.resid + eps * step)) / (2 * eps)
        assert score[i].item() == pytest.approx(numeric, rel=2e-3, abs=1e-4)
    none = selection_scan.attribution_batch(m, 1, sae, b, torch.zeros_like(fires))
    assert torch.equal(none, torch.zeros(48, dtype=none.dtype))


def test_after_passage_variants_cut_the_clamp_where_they_say():
    """tools/after_passage.py: the distance after a row's last passage token, and pattern's clamp with
    the tokens after the passage switched off, or on the whole passage only (bool and ramp gains)."""
    import torch

    import after_passage as ap
    label = torch.tensor([[False, True, True, False, False], [False] * 5])
    assert ap.distance_after(label).tolist() == [[0, 0, 0, 1, 2], [0] * 5]
    where = torch.tensor([[[True], [False], [True], [True], [False]], [[True], [False], [False], [False], [True]]])
    off = ap.variant_where(where, label, "off after the passage")
    assert off[..., 0].tolist() == [[True, False, True, False, False], [True, False, False, False, True]]
    assert ap.variant_where(where, label, "the whole passage only")[..., 0].tolist() == label.tolist()
    gain = where.float() * 0.5
    assert ap.variant_where(gain, label, "off after the passage")[..., 0].tolist() == [[0.5, 0, 0.5, 0, 0], [0.5, 0, 0, 0, 0.5]]
    assert ap.variant_where(where, label, "as it is") is where


def test_loop_source_phases_split_the_guards_edit_between_prompt_and_written_tokens(model, tok):
    """tools/loop_source.py: kept everywhere, the edit is the guard's; kept on the prompt only, the first
    written token's logits are the guard's and later written positions are left clean; kept on the
    written tokens only, the first written token's logits are the clean model's. Counted: the repeated-4-gram
    excess over clean and the changed fraction."""
    import torch

    import loop_source as ls
    from test_guard import prompts, tiny_guard
    g = tiny_guard(model, "standard")
    ids, mask = prompts(tok, ["Cells divide by mitosis and the", "The river"], pad_id=1)

    def first_logits(guard):
        ctx = guard.attached(model) if guard is not None else torch.no_grad()
        with torch.no_grad(), ctx:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=1)
        return torch.stack(out.logits, 1)

    full, clean = first_logits(g), first_logits(None)
    assert not torch.allclose(full[:, 0], clean[:, 0])  # the guard edits the prompt here
    assert torch.equal(first_logits(ls.PhaseGuard(g, "everywhere")), full)
    assert torch.allclose(first_logits(ls.PhaseGuard(g, "prompt only"))[:, 0], full[:, 0], atol=1e-5)
    assert torch.allclose(first_logits(ls.PhaseGuard(g, "written only"))[:, 0], clean[:, 0], atol=1e-5)
    a = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12]])
    b = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [5, 6, 7, 8, 9, 10, 11, 12]])
    changed, excess = ls.loop_excess(a, b)
    assert changed == 0.5 and excess == pytest.approx((1 / 5) / 2)  # a's first row repeats 1 of its 5 4-grams


def test_edit_kind_edits_and_the_strength_search(model, tok):
    """tools/edit_kind.py: its clamp is the guard's own edit (generate() gives the same logits); project
    at strength 1 removes the residual's component in the selected decoder span where the guard clamps
    and nowhere else; meanproj sets it to the retain mean's; normclamp keeps the clean norm; a streaming
    guard with another kind equals the same edit on the whole sequence; the strength search returns the
    least strength it finds reaching the level, or None."""
    import torch

    import edit_kind as ek
    from test_guard import LAYER, prompts, tiny_guard
    import experiment as ex
    g = tiny_guard(model, "standard")
    sae, lat = g.sae, g.clamp.latents
    torch.manual_seed(1)
    x = torch.randn(3, 5, sae.d_in)
    f = torch.rand(3, 5, len(lat))
    where = torch.zeros(3, 5, len(lat), dtype=torch.bool)
    where[0, 1, 2] = where[2, 4, :] = True
    edited = where.any(-1)
    assert torch.equal(ek.edit("clamp", sae, lat, where, f, 8.0, x), ex.apply_plan(sae, lat, ex.Plan(where, f), 8.0, x))
    Q = torch.linalg.qr(sae.W_dec[lat].T)[0]
    y = ek.edit("project", sae, lat, where, f, 1.0, x)
    assert torch.equal(y[~edited], x[~edited])
    assert (y[edited] @ Q).abs().max() < 1e-5 and not torch.allclose(y[edited], x[edited])
    mu = torch.randn(sae.d_in)
    y = ek.edit("meanproj", sae, lat, where, f, 1.0, x, mu)
    assert torch.allclose(y[edited] @ Q, (mu @ Q).expand(int(edited.sum()), -1), atol=1e-5)
    R = torch.linalg.qr(torch.randn(sae.d_in, len(lat), generator=torch.Generator().manual_seed(0)))[0]
    y = ek.edit("randproj", sae, lat, where, f, 1.0, x)  # the control: a random span of the same size
    assert (y[edited] @ R).abs().max() < 1e-5 and torch.equal(y[~edited], x[~edited])
    y = ek.edit("normclamp", sae, lat, where, f, 8.0, x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-4) and not torch.allclose(y[edited], x[edited])

    ids, mask = prompts(tok, ["Cells divide by mitosis and the", "The river"], pad_id=1)

    def generated(guard):
        with torch.no_grad(), guard.attached(model):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=1)
        return out.sequences, torch.stack(out.logits, 1)

    assert torch.equal(generated(ek.KindGuard(g, "clamp", 8.0))[1], generated(g)[1])
    kg = ek.KindGuard(g, "project", 1.0)
    seq, logits = generated(kg)
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
    valid = full_mask.bool() & (ex.left_positions(full_mask) > 0)
    fn = ek.teacher_forced(g, "project", 1.0)
    with torch.no_grad(), ex.intervene(model, LAYER, lambda r: fn(r, ex.make_time(valid))):
        whole = model(input_ids=seq, attention_mask=full_mask, position_ids=ex.left_positions(full_mask)).logits
    P = ids.shape[1]
    assert (logits - whole[:, P - 1:-1]).abs().max() < 1e-4
    assert not torch.allclose(logits, generated(g)[1])  # the kind changes what is written

    calls = []

    def ce(m):
        calls.append(m)
        return m / 10  # reaches the level (1.0) from strength 10
    m, got = ek.least_strength(ce, 2.0)
    assert 10 <= m < 10 * 1.1 and got >= 1.0 and calls[:3] == [2.0, 6.0, 18.0]
    assert ek.least_strength(lambda m: 0.0, 1.0) is None
    m = {"forget_ce_increase": (1.234, 0.1), "retain_kl": (0.00012, 0.0), "precision_auroc": (0.9, 0.0),
         "spliced_kl_after": (0.05, 0.0), "forget_acc": (0.5, 0.1), "retain_acc": (0.96, 0.01)}
    assert ek.heldout_line(m) == ("forget CE +1.23  retain KL 0.0001  precision 0.900  after-passage KL 0.0500  "
                                  "forget acc 0.500  retain acc 0.960")
    assert ek.main(["--run_dir", "nowhere", "--kinds", "clamp,rotate"]) == 1  # one line, before any model loads
    assert ek.main(["--run_dir", "nowhere"]) == 1  # no sweep.json there

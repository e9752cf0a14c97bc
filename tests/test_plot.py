"""plot.py on synthetic run folders: every figure, clear errors, tolerant of failed or old runs."""
import json

import plot
from experiment import HORIZONS, STRATEGIES


def entry(**means):
    return {"means": means, "stderrs": {k: (None if v is None else 0.01) for k, v in means.items()}}


def seed_files(folder, k):
    pts = [dict(strategy=s, multiplier=m, n_features=20, retain_threshold=0.01, forget_acc=0.9 - 0.001 * m,
                retain_acc=0.995 - 0.0005 * m, forget_ce_increase=0.01 * m * (1 + i) + 0.01 * k,
                retain_kl=0.001 * m * (6 - i), spliced_kl_after=0.0005 * m, forget_prob_drop=0.002 * m,
                retain_prob_drop=0.0005 * m) for i, s in enumerate(STRATEGIES) for m in (1, 3, 10, 30, 100)]
    (folder / "sweep.json").write_text(json.dumps({"retain_gate": 0.99, "points": pts}))
    (folder / "log.jsonl").write_text("".join(json.dumps(dict(step=i, tokens=1000 * i, loss=10 / (i + 1), l0=50,
                                                               fve=0.5 + 0.01 * i)) + "\n" for i in range(10)))
    (folder / "spliced_kl.json").write_text(json.dumps({"docs": [
        {"id": f"spliced-{d}", "label": [0] * 5 + [1] * 5 + [0] * 5, "kl": {s: [0.01 * t for t in range(15)] for s in STRATEGIES}}
        for d in range(3)]}))
    curves = {key: [0.5 + 0.01 * i + 0.01 * k for i in range(len(HORIZONS))]
              for key in ("token_auroc", "spliced_auroc", "passages_detected", "fire_rate_retain", "fire_rate_forget")}
    curves["delay_median"] = [2.0 * h for h in HORIZONS[:-1]] + [None]
    (folder / "detection_horizon.json").write_text(json.dumps({"horizons": list(HORIZONS), "fpr": 0.01, "detectors": {
        name: curves for name in ("learned", "residual", "dsg_causal", "templates")}}))


def fake_run(folder, window, with_extras=True, seeds=0):
    folder.mkdir()
    info = {"sae": entry(fve=0.8), "temporal_consistency": entry(
        all_smoothness=1.5, all_lag1_autocorr=0.1, all_jaccard=0.2, selected_smoothness=1.8,
        selected_lag1_autocorr=0.05, selected_jaccard=0.02)}
    for i, s in enumerate(STRATEGIES):
        info[f"unlearning_{s}"] = entry(unlearning_score=0.1 * i, retain_kl=0.2, precision_auroc=0.7)
        info[f"detection_{s}"] = entry(token_f1=0.1 + 0.05 * i, token_auroc=0.6)
        info[f"frontier_{s}"] = entry(**{"retain_kl_at_ce_0.25": 0.01 * (i + 1), "retain_kl_at_ce_0.5": 0.02,
                                         "retain_kl_at_ce_1.0": None, "retain_kl_ratio_at_ce_0.5": 1.0 / (i + 1)})
    info["generation_clean"] = entry(forget_ce=1.5, forget_ce_true=2.5, forget_rep4=0.1)
    for i, s in enumerate(plot.GUARDED):
        info[f"generation_{s}"] = entry(retain_identical=1 - 0.1 * i, forget_identical=0.2 * i, forget_ce=2.0 + 0.1 * i)
    (folder / "final_info.json").write_text(json.dumps(info))
    (folder / "config.json").write_text(json.dumps({"window": window}))
    if not with_extras:
        return
    if not seeds:
        seed_files(folder, 0)
    for k in range(seeds):
        (folder / f"seed_{k}").mkdir()
        (folder / f"seed_{k}" / "final_info.json").write_text(json.dumps(info))
        seed_files(folder / f"seed_{k}", k)


FIGS = ("headline", "frontier", "frontier_summary", "horizon", "tradeoff", "strategies", "precision", "consistency",
        "training", "generation")


def test_every_figure_from_two_runs_one_with_seeds(tmp_path):
    fake_run(tmp_path / "run_0", 1)
    fake_run(tmp_path / "run_1", 4, seeds=3)
    out = tmp_path / "figs"
    assert plot.main([str(tmp_path / "run_0"), str(tmp_path / "run_1"), f"--out_dir={out}"]) == 0
    for name in FIGS:
        assert (out / f"{name}.png").stat().st_size > 10_000, name


def test_generation_figure_names_every_causal_strategy():
    from experiment import CAUSAL_STRATEGIES
    assert plot.GUARDED == CAUSAL_STRATEGIES


def test_front_of_keeps_only_undominated_points():
    pts = [dict(forget_ce_increase=x, retain_kl=y, forget_prob_drop=0.0, retain_prob_drop=0.0)
           for x, y in ((0.2, 0.1), (0.3, 0.05), (0.5, 0.2), (0.4, 0.3))]
    front = plot.front_of(pts, "retain_kl")
    assert [(p["forget_ce_increase"], p["retain_kl"]) for p in front] == [(0.0, 0.0), (0.3, 0.05), (0.5, 0.2)]


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert plot.main([str(tmp_path / "nope"), f"--out_dir={tmp_path / 'f'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_malformed_results_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "run_bad"
    bad.mkdir()
    (bad / "final_info.json").write_text("{not json")
    assert plot.main([str(bad), f"--out_dir={tmp_path / 'f'}"]) == 2
    err = capsys.readouterr().err
    assert "malformed" in err and "run_bad" in err and "Traceback" not in err


def test_failed_and_old_runs_are_skipped_with_a_warning(tmp_path, capsys):
    fake_run(tmp_path / "run_0", 1)
    failed = tmp_path / "run_1"
    failed.mkdir()
    (failed / "metadata.json").write_text(json.dumps({"status": "failed"}))
    fake_run(tmp_path / "run_2", 4, with_extras=False)  # an older layout: no sweep, log or spliced KL
    out = tmp_path / "figs"
    assert plot.main([str(tmp_path / r) for r in ("run_0", "run_1", "run_2")] + [f"--out_dir={out}"]) == 0
    err = capsys.readouterr().err
    assert "skipping" in err and "run_1" in err and "failed" in err
    assert (out / "frontier.png").exists() and (out / "headline.png").exists() and (out / "strategies.png").exists()


def test_a_sensitivity_folder_is_named_with_its_run(tmp_path):
    fake_run(tmp_path / "run_1", 4, seeds=2)
    fake_run(tmp_path / "run_1" / "eval_24", 4, seeds=2)
    fake_run(tmp_path / "run_2", 1)
    names = [plot.load_run(tmp_path / r)["name"] for r in ("run_1", "run_1/eval_24", "run_2")]
    assert names == ["run_1", "run_1/eval_24", "run_2"]


def test_headline_reaches_what_final_info_reports_at_its_budgets(tmp_path):
    """The headline curve at final_info's budgets is frontier_within on the run's own Pareto front."""
    from experiment import FRONTIER_BUDGETS, frontier_within, sweep_front
    fake_run(tmp_path / "run_0", 1)
    pts = [dict(p, retain_kl_stderr=0.0) for p in json.loads((tmp_path / "run_0" / "sweep.json").read_text())["points"]
           if p["strategy"] == "pattern"]
    want = [frontier_within(sweep_front(pts, "retain_kl"), b) for b in FRONTIER_BUDGETS]
    assert list(plot.reach_within(pts, FRONTIER_BUDGETS)) == want


def test_sae_recipe_figure_only_when_a_run_is_batchtopk_or_contrastive(tmp_path):
    fake_run(tmp_path / "run_0", 1, with_extras=False)
    out = tmp_path / "figs"
    assert plot.main([str(tmp_path / "run_0"), f"--out_dir={out}"]) == 0
    assert not (out / "saes.png").exists()  # the default recipe alone: nothing to compare
    fake_run(tmp_path / "run_btk", 4, with_extras=False)
    (tmp_path / "run_btk" / "config.json").write_text(json.dumps({"window": 4, "activation": "batchtopk", "k": 48,
                                                                   "contrastive": 0.1}))
    assert plot.main([str(tmp_path / "run_0"), str(tmp_path / "run_btk"), f"--out_dir={out}"]) == 0
    assert (out / "saes.png").stat().st_size > 10_000
    assert plot.label(plot.load_run(tmp_path / "run_btk")) == "run_btk (w=4, batchtopk k=48, contrastive 0.1)"


def test_only_draws_the_named_figures_and_refuses_an_unknown_one(tmp_path, capsys):
    fake_run(tmp_path / "run_0", 1)
    out = tmp_path / "figs"
    assert plot.main([str(tmp_path / "run_0"), f"--out_dir={out}", "--only=consistency"]) == 0
    assert [p.name for p in out.iterdir()] == ["consistency.png"]
    assert plot.main([str(tmp_path / "run_0"), f"--out_dir={out}", "--only=nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown figure 'nope'" in err and "Traceback" not in err

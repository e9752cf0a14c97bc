"""SAEBench-layout result files: every one a run writes, fresh or committed, validates against the JSON
schemas published in the sae-bench release the harness follows (installed --no-deps from
requirements-test.txt; read from the package folder, never imported); and the core eval's measures on
values computed by hand."""
import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import experiment as ex
from conftest import ROOT, tiny_flags

jsonschema = pytest.importorskip("jsonschema", reason="pip install --no-deps -r requirements-test.txt")
SAEBENCH = importlib.util.find_spec("sae_bench")  # locates the package without running its __init__
needs_saebench = pytest.mark.skipif(SAEBENCH is None, reason="pip install --no-deps -r requirements-test.txt")
EVALS = ("unlearning", "sparse_probing", "core")


def schema(eval_type: str) -> dict:
    folder = Path(list(SAEBENCH.submodule_search_locations)[0])
    return json.loads((folder / "evals" / eval_type / f"eval_output_schema_{eval_type}.json").read_text())


def schema_errors(doc: dict, eval_type: str) -> list[str]:
    v = jsonschema.Draft202012Validator(schema(eval_type))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:120]}" for e in v.iter_errors(doc)]


def test_the_pinned_release_is_the_one_installed():
    from importlib.metadata import version
    if SAEBENCH is None:
        pytest.skip("sae-bench not installed")
    assert version("sae-bench") == ex.SAEBENCH_RELEASE
    pins = (ROOT / "requirements-test.txt").read_text()
    assert f"sae-bench=={ex.SAEBENCH_RELEASE}" in pins


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory, model, tok):
    out = tmp_path_factory.mktemp("saebench") / "run"
    flags = [f for f in tiny_flags(out, "unused", "--strategies=standard,pattern") if not f.startswith("--model")]
    ex.run(ex.parse_config(flags), model=model, tok=tok)
    return out


@needs_saebench
def test_a_fresh_run_writes_files_saebench_accepts(fresh_run):
    for eval_type in EVALS:
        doc = json.loads((fresh_run / f"{eval_type}.json").read_text())
        assert doc["eval_type_id"] == eval_type
        assert schema_errors(doc, eval_type) == [], eval_type
        assert doc["sae_lens_id"] == "custom_sae" and doc["sae_bench_commit_hash"] == "Unknown"
        assert doc["sae_cfg_dict"]["architecture"] == "temporal_window"  # the tiny run's default w=4
        assert doc["sae_cfg_dict"]["metadata"]["hook_name"] == "blocks.1.hook_resid_post"


@needs_saebench
def test_core_json_holds_the_runs_own_measures(fresh_run):
    core = json.loads((fresh_run / "core.json").read_text())
    sae = json.loads((fresh_run / "final_info.json").read_text())["sae"]["means"]
    m = core["eval_result_metrics"]
    assert core["eval_result_unstructured"]["not_measured"] == []
    assert all(core["eval_config"][k] for k in core["eval_config"] if k.startswith("compute_"))
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(sae["fve"])
    assert m["sparsity"]["l0"] == pytest.approx(sae["l0"])
    assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(sae["ce_loss_recovered"])
    assert m["model_behavior_preservation"]["kl_div_with_sae"] > 0
    assert m["misc_metrics"]["frac_alive"] == pytest.approx(1 - sae["dead_frac"])
    details = core["eval_result_details"]
    assert [d["index"] for d in details] == list(range(64))  # --d_sae=64
    density = torch.tensor([d["feature_density"] for d in details])
    assert (density > 0).float().mean().item() == pytest.approx(m["misc_metrics"]["frac_alive"], abs=1e-6)
    assert all(d["consistent_activation_heuristic"] == -1 for d in details if d["feature_density"] == 0)


@needs_saebench
def test_removing_a_required_field_fails_validation(fresh_run):
    """The check can fail: a file missing any required top-level or metric field is rejected."""
    for eval_type in EVALS:
        doc = json.loads((fresh_run / f"{eval_type}.json").read_text())
        required = schema(eval_type)["required"]
        assert "sae_bench_commit_hash" in required
        for key in required:
            broken = {k: v for k, v in doc.items() if k != key}
            assert schema_errors(broken, eval_type), (eval_type, key)
    core = json.loads((fresh_run / "core.json").read_text())
    broken = copy.deepcopy(core)
    del broken["eval_result_metrics"]["sparsity"]["l0"]
    assert schema_errors(broken, "core")
    sp = json.loads((fresh_run / "sparse_probing.json").read_text())
    sp["eval_result_details"] = {d["dataset_name"]: d for d in sp["eval_result_details"]}  # the old layout
    assert schema_errors(sp, "sparse_probing")


def committed_folders() -> list[Path]:
    return sorted(p.parent for p in ROOT.glob("run_*/**/unlearning.json"))


@needs_saebench
def test_every_committed_saebench_file_validates():
    folders = committed_folders()
    assert folders, "no committed run folder"
    bad = {}
    for folder in folders:
        for eval_type in EVALS:
            path = folder / f"{eval_type}.json"
            assert path.is_file(), f"{path.relative_to(ROOT)} missing: run python tools/saebench_files.py"
            errs = schema_errors(json.loads(path.read_text()), eval_type)
            if errs:
                bad[str(path.relative_to(ROOT))] = errs[:3]
    assert not bad, bad


def test_regenerating_a_folder_keeps_its_numbers(tmp_path, fresh_run):
    """tools/saebench_files.py rewrites from what a folder holds: same scores, same accuracies, same
    core measures; the eval's id and time kept."""
    import shutil
    import sys
    sys.path.insert(0, str(ROOT / "tools"))
    import saebench_files
    folder = tmp_path / "seed_0"
    shutil.copytree(fresh_run, folder)
    before = {e: json.loads((folder / f"{e}.json").read_text()) for e in EVALS}
    assert saebench_files.main([str(folder)]) == 0
    after = {e: json.loads((folder / f"{e}.json").read_text()) for e in EVALS}
    for e in EVALS:
        assert after[e]["eval_id"] == before[e]["eval_id"]
        assert after[e]["eval_result_metrics"] == before[e]["eval_result_metrics"], e
        assert after[e]["eval_result_details"] == before[e]["eval_result_details"], e
    (folder / "cfg.json").unlink()
    assert saebench_files.main([str(folder)]) == 2


def test_core_record_writes_minus_one_for_what_a_folder_lacks():
    run_cfg = ex.asdict(ex.Config(out_dir="run_9/seed_0"))
    sae_cfg = ex.saelens_cfg({"d_in": 4, "d_sae": 8, "window": 1, "d_head": 2}, 6, "m")
    rec = ex.core_record(run_cfg, sae_cfg, {"fve": 0.8, "l0": 12.0, "dead_frac": 0.25, "mse": 3.0}, [])
    m = rec["eval_result_metrics"]
    assert m["reconstruction_quality"]["explained_variance"] == 0.8 and m["misc_metrics"]["frac_alive"] == 0.75
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == -1 and m["sparsity"]["l1"] == -1
    assert "kl_div_with_sae" in rec["eval_result_unstructured"]["not_measured"]
    assert not rec["eval_config"]["compute_kl"] and not rec["eval_config"]["compute_featurewise_density_statistics"]
    assert rec["sae_lens_release_id"] == "smollm2-135m-gguf_layer_6_run_9_seed_0"
    assert sae_cfg["architecture"] == "standard" and "window" not in sae_cfg


def test_recon_stats_by_hand():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    xh = torch.tensor([[3.0, 0.0], [2.0, 0.0]])
    r = ex.recon_stats(x, xh, scale=2.0)
    assert r["mse"][0] == pytest.approx((16 + 1) / 2 * 4)  # squared error summed over dims, scaled units
    assert r["cossim"][0] == pytest.approx((9 / 15 + 1) / 2)
    assert r["l2_norm_in"][0] == pytest.approx(3.0) and r["l2_norm_out"][0] == pytest.approx(2.5)
    assert r["l2_ratio"][0] == pytest.approx((3 / 5 + 2) / 2)
    assert r["relative_reconstruction_bias"][0] == pytest.approx(((9 + 4) / 2) / ((9 + 2) / 2))
    # legacy: per token 1 - |x - xh|^2 / |x - mean x|^2, mean x = (2, 2): token deviations 1+4, 1+4
    assert r["explained_variance_legacy"][0] == pytest.approx(((1 - 16 / 5) + (1 - 1 / 5)) / 2)
    assert r["fve"][0] == pytest.approx(1 - 17 / 10)


def test_feature_stats_by_hand():
    W_enc = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # (D=2, F=3)
    W_dec = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # (F, D)
    weights = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": torch.tensor([0.5, -0.5, 0.0])}
    rows, misc = ex.feature_stats(weights, torch.tensor([20.0, 1.0, 0.0]), torch.tensor([4.0, 1.0, 0.0]), n_tokens=100)
    assert [r["feature_density"] for r in rows] == [0.2, 0.01, 0.0]
    assert rows[0]["consistent_activation_heuristic"] == 5.0 and math.isnan(rows[2]["consistent_activation_heuristic"])
    assert rows[2]["encoder_norm"] == pytest.approx(math.sqrt(2), rel=1e-5)  # written to 6 significant digits
    assert rows[2]["encoder_decoder_cosine_sim"] == pytest.approx(-1 / math.sqrt(2), rel=1e-5)
    assert rows[0]["max_decoder_cosine_sim"] == pytest.approx(0.0) and rows[1]["max_decoder_cosine_sim"] == pytest.approx(0.0)
    assert rows[0]["max_encoder_cosine_sim"] == pytest.approx(1 / math.sqrt(2), rel=1e-5)
    assert misc["freq_over_1_percent"] == pytest.approx(1 / 3) and misc["freq_over_10_percent"] == pytest.approx(1 / 3)
    assert misc["normalized_freq_over_1_percent"] == pytest.approx(0.2 / 0.21)

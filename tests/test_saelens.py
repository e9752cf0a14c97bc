"""SAELens interop: loading SAELens's layout (--sae_path), exporting ours (--export_saelens), and a run
on a loaded SAE. SAELens itself is optional: its test skips when `import sae_lens` fails."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import experiment as ex
from conftest import tiny_flags
from test_pipeline import assert_contract

D, F = 32, 48  # D: the tiny model's hidden size


def saelens_folder(path: Path, arch="standard", apply_b_dec=True, hook="blocks.1.hook_resid_post", d_in=D, seed=0,
                   x_std=1.0, **cfg_extra) -> dict:
    """A SAELens SAE on disk as SAE.save_model writes it (6.x keys), random weights for inputs of about
    `x_std` per dimension (pre-activations then about unit scale); returns the weights."""
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(d_in, F, generator=g) / (d_in ** 0.5 * x_std),
         "b_enc": torch.randn(F, generator=g) * 0.3 - 0.3,
         "W_dec": torch.randn(F, d_in, generator=g) * x_std / d_in ** 0.5,
         "b_dec": torch.randn(d_in, generator=g) * 0.2 * x_std}
    if arch == "jumprelu":
        t["threshold"] = torch.rand(F, generator=g) * 0.6
    cfg = {"d_in": d_in, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12", "hook_name": hook},
           "architecture": arch, **cfg_extra}
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(t, str(path / "sae_weights.safetensors"))
    return t


def reference_latents(t: dict, x: torch.Tensor, arch: str, apply_b_dec: bool) -> torch.Tensor:
    """SAELens's encode, written out: act((x - b_dec·apply) W_enc + b_enc)."""
    pre = (x - t["b_dec"] * apply_b_dec) @ t["W_enc"] + t["b_enc"]
    f = torch.relu(pre)
    return f * (pre > t["threshold"]) if arch == "jumprelu" else f


def inputs(B=4, T=7, d=D, seed=1):
    x = torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed))
    return x, torch.ones(B, T, dtype=torch.bool)


@pytest.mark.parametrize("arch,apply_b_dec", [("standard", True), ("jumprelu", True), ("standard", False),
                                              ("jumprelu", False)])
def test_saelens_layout_loads_to_the_reference_latents(tmp_path, arch, apply_b_dec):
    t = saelens_folder(tmp_path, arch, apply_b_dec)
    loaded = ex.load_sae_folder(tmp_path)
    assert loaded.layer == 1 and loaded.sae.window == 1 and loaded.source["architecture"] == arch
    x, valid = inputs()
    f = loaded.sae.encode(x, valid)
    ref = reference_latents(t, x, arch, apply_b_dec)
    assert torch.allclose(f, ref, atol=1e-5)
    assert torch.allclose(loaded.sae.decode(f), f @ t["W_dec"] + t["b_dec"], atol=1e-5)
    assert torch.allclose(loaded.sae(x, valid).f, f)  # forward (eval_sae_quality) honours the threshold too
    idx = torch.tensor([5, 0, 17])
    assert torch.allclose(loaded.sae.encode(x, valid, idx), ref[..., idx], atol=1e-5)  # the interventions' path
    if arch == "jumprelu":
        pre = (x - t["b_dec"] * apply_b_dec) @ t["W_enc"] + t["b_enc"]
        between = (pre > 0) & (pre <= t["threshold"])
        assert between.any() and (f[between] == 0).all(), "pre-activations under the threshold must be zeroed"


def test_pre_6_config_keys_load(tmp_path):
    """SAELens before 6.0: the hook at the top level (`hook_point`), no architecture, boolean normalisation."""
    t = saelens_folder(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for k in ("metadata", "architecture", "reshape_activations"):
        del cfg[k]
    cfg.update(hook_point="blocks.3.hook_resid_post", normalize_activations=False, activation_fn_str="relu")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file({**t, "scaling_factor": torch.ones(F)}, str(tmp_path / "sae_weights.safetensors"))
    loaded = ex.load_sae_folder(tmp_path)
    assert loaded.layer == 3
    x, valid = inputs()
    assert torch.allclose(loaded.sae.encode(x, valid), reference_latents(t, x, "standard", True), atol=1e-5)


def random_sae(window=1, jumprelu=False, seed=0) -> ex.TemporalSAE:
    torch.manual_seed(seed)
    sae = ex.TemporalSAE(D, F, window=window, d_head=8)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.5)
        sae.scale.fill_(0.37)
    if jumprelu:
        sae.threshold = torch.rand(F) * 0.5
    return sae


def write_run(folder: Path, sae, layer=2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ex.save_sae(sae, folder)
    ex.atomic_write_json(folder / "config.json", {"layer": layer, "model": "tiny"})
    return folder


@pytest.mark.parametrize("jumprelu", [False, True])
def test_export_round_trip_gives_the_same_latents(tmp_path, jumprelu):
    sae = random_sae(jumprelu=jumprelu)
    run = write_run(tmp_path / "run", sae)
    line = ex.export_saelens(run, tmp_path / "export")
    assert ("jumprelu" if jumprelu else "standard") in line
    cfg = json.loads((tmp_path / "export" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post" and cfg["apply_b_dec_to_input"] is True
    again = ex.load_sae_folder(tmp_path / "export")
    assert again.layer == 2 and again.source["format"] == "saelens"
    x, valid = inputs()
    x = x * 3 + 1  # away from the origin, so the scale and b_dec matter
    f, f2 = sae.encode(x, valid), again.sae.encode(x, valid)
    assert (f > 0).any() and torch.allclose(f, f2, atol=1e-5)
    assert torch.allclose(sae.decode(f), again.sae.decode(f2), atol=1e-5)


def random_topk_sae(window=1, seed=0) -> ex.TemporalSAE:
    """A BatchTopK SAE as training leaves it: its one inference threshold on every latent."""
    sae = random_sae(window=window, seed=seed)
    topk = ex.TemporalSAE(D, F, window=window, d_head=8, activation="batchtopk", k=6)
    topk.load_state_dict(sae.state_dict() | {"threshold": torch.full((F,), 0.25)})
    return topk


def test_batchtopk_export_round_trip_is_its_jumprelu_inference_form(tmp_path):
    from safetensors.torch import load_file
    sae = random_topk_sae()
    run = write_run(tmp_path / "run", sae)
    assert "jumprelu" in ex.export_saelens(run, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["training_activation"] == "batchtopk" and cfg["k"] == 6
    t = load_file(tmp_path / "export" / "sae_weights.safetensors")
    assert torch.equal(t["threshold"], torch.full((F,), 0.25))
    again = ex.load_sae_folder(tmp_path / "export")  # what --sae_path reads
    x, valid = inputs()
    x = x * 3 + 1
    pre = sae.pre_acts(x, valid)
    assert ((pre > 0) & (pre <= 0.25)).any(), "the threshold must matter on these inputs"
    f, f2 = sae.encode(x, valid), again.sae.encode(x, valid)
    assert (f > 0).any() and torch.allclose(f, f2, atol=1e-5)
    assert torch.allclose(f2, reference_latents(t, x, "jumprelu", True), atol=1e-5)  # SAELens's formula
    assert torch.allclose(sae.decode(f), again.sae.decode(f2), atol=1e-5)
    assert ex.run_saelens_cfg({"layer": 2, "model": "tiny"}, run) == cfg  # SAEBench's sae_cfg_dict


def test_batchtopk_run_folder_loads_as_batchtopk_and_sets_the_config(tmp_path):
    sae = random_topk_sae(window=3)
    run = write_run(tmp_path / "run", sae, layer=1)
    loaded = ex.load_sae_folder(run)
    assert loaded.sae.activation == "batchtopk" and loaded.sae.k == 6
    x, valid = inputs()
    assert torch.equal(loaded.sae.encode(x, valid), sae.encode(x, valid))
    cfg = ex.fit_sae_to_model(ex.Config(out_dir=str(tmp_path / "out"), sae_path=str(run)), loaded, D)
    assert (cfg.activation, cfg.k, cfg.window) == ("batchtopk", 6, 3)
    sc = ex.saelens_cfg(ex.sae_sizes(loaded.sae), 1, "tiny")
    assert sc["architecture"] == "temporal_window" and sc["training_activation"] == "batchtopk" and sc["k"] == 6


def test_our_run_folder_loads_with_its_layer(tmp_path):
    sae = random_sae(window=4)
    run = write_run(tmp_path / "run", sae, layer=1)
    loaded = ex.load_sae_folder(run)
    assert loaded.layer == 1 and loaded.sae.window == 4 and loaded.source["format"] == "ours"
    x, valid = inputs()
    assert torch.equal(sae.encode(x, valid), loaded.sae.encode(x, valid))
    assert "threshold" not in ex.load_sae(run).state_dict(), "a ReLU SAE's files stay as they were"


def test_saelens_loads_our_export(tmp_path):
    """SAELens's own loader on the export: its encode/decode equal ours on random inputs."""
    try:
        from sae_lens import SAE
    except Exception as e:  # an absent or broken install (sae_lens pulls in transformer_lens) both mean: skip
        pytest.skip(f"sae_lens not importable ({type(e).__name__})")
    for jumprelu in (False, True):
        sae = random_sae(jumprelu=jumprelu, seed=int(jumprelu))
        run = write_run(tmp_path / f"run{int(jumprelu)}", sae)
        ex.export_saelens(run, tmp_path / f"export{int(jumprelu)}")
        theirs = SAE.load_from_disk(tmp_path / f"export{int(jumprelu)}")
        assert theirs.cfg.architecture() == ("jumprelu" if jumprelu else "standard")
        assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
        x, valid = inputs()
        x = x * 3 + 1
        with torch.no_grad():
            f, f_theirs = sae.encode(x, valid), theirs.encode(x)
            assert (f > 0).any() and torch.allclose(f, f_theirs, atol=1e-5)
            assert torch.allclose(sae.decode(f), theirs.decode(f_theirs), atol=1e-5)
        # and the other way: SAELens's own save_model, read by our loader
        theirs.save_model(tmp_path / f"saved{int(jumprelu)}")
        ours = ex.load_sae_folder(tmp_path / f"saved{int(jumprelu)}")
        with torch.no_grad():
            assert torch.allclose(ours.sae.encode(x, valid), theirs.encode(x), atol=1e-5)


def test_run_evaluates_a_saelens_sae_end_to_end(tmp_path, model, tok):
    saelens_folder(tmp_path / "sl", "jumprelu", x_std=0.02)  # the tiny model's residuals: about 0.02 per dimension
    out = tmp_path / "run"
    flags = [f for f in tiny_flags(out, "unused") if not f.startswith(("--model", "--layer"))]
    cfg = ex.parse_config(flags + [f"--sae_path={tmp_path / 'sl'}"])
    results = ex.run(cfg, model=model, tok=tok)
    assert_contract(json.loads((out / "final_info.json").read_text()))
    assert {f"detection_{s}" for s in ex.STRATEGIES} <= set(results) and "temporal_consistency" in results
    assert not (out / "log.jsonl").exists() and not (out / "checkpoint.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["layer"] == 1 and config["window"] == 1 and config["d_sae"] == F  # taken from the SAE
    saved = json.loads((out / "cfg.json").read_text())
    assert saved["activation"] == "jumprelu" and saved["source"]["format"] == "saelens"
    x, valid = inputs()
    assert torch.allclose(ex.load_sae(out).encode(x, valid), ex.load_sae_folder(tmp_path / "sl").sae.encode(x, valid))
    assert json.loads((out / "metadata.json").read_text())["status"] == "complete"


def one_line_error(capsys, argv, needle):
    assert ex.main(argv) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and "it/s]" not in l]  # model-loading bars
    assert len(err) == 1 and needle in err[0], err


ERRORS = [
    (lambda p: saelens_folder(p, d_in=24), [], "d_in=24 but model"),
    (lambda p: saelens_folder(p), ["--layer=2"], "--layer 2 but the SAE"),
    (lambda p: saelens_folder(p, hook="blocks.1.hook_mlp_out"), [], "not a residual-stream output"),
    (lambda p: saelens_folder(p, architecture="topk"), [], "architecture 'topk' is not supported"),
    (lambda p: saelens_folder(p, normalize_activations="layer_norm"), [], "normalize_activations 'layer_norm'"),
    (lambda p: None, [], "does not exist"),
]


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_bad_sae_path_is_one_line(tmp_path, model_dir, capsys, case):
    make, extra, needle = ERRORS[case]
    make(tmp_path / "sl")
    flags = [f for f in tiny_flags(tmp_path / "run", model_dir) if not f.startswith("--layer")]
    one_line_error(capsys, flags + extra + [f"--sae_path={tmp_path / 'sl'}"], needle)
    assert not (tmp_path / "run" / "final_info.json").exists()


def test_export_refuses_a_temporal_sae_in_one_line(tmp_path, capsys):
    run = write_run(tmp_path / "run", random_sae(window=4))
    one_line_error(capsys, [f"--export_saelens={run}", f"--out_dir={tmp_path / 'export'}"],
                   "window=4 has no SAELens counterpart: its encoder reads 4 positions")
    assert not (tmp_path / "export").exists()


def test_export_cli_writes_one_line_and_refuses_run_folders(tmp_path, capsys):
    run = write_run(tmp_path / "run", random_sae())
    assert ex.main([f"--export_saelens={run}", f"--out_dir={tmp_path / 'export'}"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"cfg.json", "sae_weights.safetensors"}
    one_line_error(capsys, [f"--export_saelens={run}", f"--out_dir={tmp_path / 'export'}"], "pass --overwrite")
    other = write_run(tmp_path / "other", random_sae())
    one_line_error(capsys, [f"--export_saelens={run}", f"--out_dir={other}"], "holds a run")
    one_line_error(capsys, ["--sae_path=x", "--resume"], "--resume continues training")

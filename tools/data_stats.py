"""Numbers for data/README.md, measured with the default model.

    python tools/data_stats.py

Prints, per question set and topic, how many questions the unmodified default model answers
correctly under cloze scoring, and the model's next-token CE on each corpus's held-out part.
"""
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment as ex  # noqa: E402


def main():
    cfg = ex.Config(out_dir="/tmp/data_stats")
    model, tok = ex.load_model(cfg, torch.device("cpu"))
    for domain in ("forget", "retain"):
        qs = ex.load_questions("embedded", domain)
        topics = [r["topic"] for r in ex.read_jsonl(ex.DATA_DIR / f"{domain}_qa.jsonl", "questions")]
        qa = ex.prepare_qa(model, tok, cfg.layer, qs, "cloze", cfg.batch_rows)
        known = ex.clean_scores(qa).argmax(-1) == qa.answer
        total, hit = Counter(topics), Counter(t for t, k in zip(topics, known.tolist()) if k)
        print(f"{domain} questions: {int(known.sum())} of {len(qs)} answered correctly (cloze)")
        for t in sorted(total):
            print(f"    {t:22s} {hit[t]:3d} / {total[t]}")
        docs = ex.load_corpus("embedded", domain)
        train, held = ex.split_docs(docs)
        rows = ex.make_rows(tok, held, cfg.context_length, 10**9, forget=domain == "forget")
        ce = ex.prepare_text(model, cfg.layer, rows, cfg.batch_rows).clean_ce
        sel = ex.scored(rows.attn)
        print(f"{domain} corpus: {len(docs)} documents, {len(train)} train / {len(held)} held-out, "
              f"{sum(len(d.text.split()) for d in docs)} words; held-out CE {ce[sel].mean():.3f} nats/token "
              f"over {int(sel.sum())} tokens (stderr {ex.stderr(ce[sel].numpy()):.3f})")


if __name__ == "__main__":
    main()

"""Which layer carries the forget / retain signal? Token-level linear probes per block.

    python tools/layer_scan.py [--rows 48]

For each block l it fits a logistic probe on single-token residuals (after block l) from training
documents and reports held-out accuracy, plus the residual norm. Used to choose the default --layer.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment as ex  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=48, help="rows per domain and split")
    ap.add_argument("--tokens_per_row", type=int, default=24, help="tokens sampled per row for the probe")
    args = ap.parse_args()
    cfg = ex.Config(out_dir="/tmp/layer_scan")
    model, tok = ex.load_model(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    data = {}
    for split in (0, 1):
        xs, ys = [], []
        for label, dom in ((1, "forget"), (0, "retain")):
            docs = ex.split_docs(ex.load_corpus("embedded", dom))[split]
            rows = ex.head_rows(ex.make_rows(tok, docs, cfg.context_length, 10**9, forget=bool(label)), args.rows)
            with torch.no_grad():
                hs = model.base_model(input_ids=rows.tokens, attention_mask=rows.attn.long(),
                                      output_hidden_states=True).hidden_states[1:]
            pick = torch.stack([torch.randperm(int(m.sum()), generator=g)[:args.tokens_per_row] for m in rows.mask])
            for_layer = [torch.stack([h[r][rows.mask[r]][pick[r]] for r in range(len(h))]).flatten(0, 1) for h in hs]
            xs.append(for_layer)
            ys.append(torch.full((len(for_layer[0]),), bool(label)))
        data[split] = ([torch.cat([xs[0][l], xs[1][l]]) for l in range(len(xs[0]))], torch.cat(ys))
    print(f"{'block':>5} {'probe acc':>9} {'mean |x|':>9}")
    for l in range(len(data[0][0]) - 1):  # the last entry is after the final norm
        acc = ex.probe_accuracy(data[0][0][l], data[0][1], data[1][0][l], data[1][1], None)
        print(f"{l:>5} {acc:>9.3f} {data[0][0][l].norm(dim=-1).mean():>9.1f}")


if __name__ == "__main__":
    main()

"""Sparse probing: a latent equal to the label is found; shuffled labels give chance."""
import torch

import experiment as ex


def data(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = torch.rand(n, generator=g) > 0.5
    return X, y


def test_one_latent_equal_to_label_gives_top1_of_one():
    Xtr, ytr = data(200, 30, 0)
    Xte, yte = data(100, 30, 1)
    Xtr[:, 7], Xte[:, 7] = ytr.float(), yte.float()
    res = ex.sparse_probing({"sae": (Xtr, Xte)}, {"t": ytr.long()}, {"t": yte.long()}, seed=0)
    assert res["means"]["sae_top_1_test_accuracy"] == 1.0
    assert res["means"]["sae_test_accuracy"] >= 0.95


def test_shuffled_labels_give_about_half():
    accs = []
    for s in range(3):
        Xtr, ytr = data(300, 20, 10 + s)
        Xte, yte = data(300, 20, 20 + s)
        res = ex.sparse_probing({"llm": (Xtr, Xte)}, {"t": ytr.long()}, {"t": yte.long()}, seed=s)
        accs.append(res["means"]["llm_test_accuracy"])
    assert abs(sum(accs) / len(accs) - 0.5) < 0.08


def test_rows_not_in_a_task_are_left_out():
    Xtr, ytr = data(100, 5, 0)
    lab = ytr.long()
    lab[:50] = -1
    res = ex.sparse_probing({"sae": (Xtr, Xtr)}, {"t": lab}, {"t": lab}, seed=0)
    assert set(res["details"]) == {"t"}

"""The embedded data (issue: offline corpora and question sets) and every loader."""
import json

import pytest
import torch

import experiment as ex
from conftest import ROOT, SHARED

DATA = ROOT / "data"


def records(name):
    return [json.loads(l) for l in open(DATA / name, encoding="utf-8") if l.strip()]


@pytest.mark.parametrize("domain", ["forget", "retain"])
def test_corpus_sizes_topics_and_words(domain):
    docs = records(f"{domain}_corpus.jsonl")
    words = [len(d["text"].split()) for d in docs]
    assert sum(words) >= 40_000 and min(words) >= 150 and max(words) <= 600
    topics = {}
    for d in docs:
        topics[d["topic"]] = topics.get(d["topic"], 0) + 1
    assert len(topics) >= 5 and min(topics.values()) >= 10
    assert len({d["id"] for d in docs}) == len(docs)


@pytest.mark.parametrize("domain", ["forget", "retain"])
def test_questions_parse_are_unique_and_in_range(domain):
    qs = records(f"{domain}_qa.jsonl")
    assert len(qs) >= 150
    assert len({q["question"].strip().lower() for q in qs}) == len(qs)
    for q in qs:
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
        assert isinstance(q["answer"], int) and 0 <= q["answer"] < 4
    assert len(ex.load_questions("embedded", domain)) == len(qs)


def test_spliced_spans_point_at_the_passage():
    docs = records("spliced.jsonl")
    assert len(docs) >= 40
    retain_text = {d["text"] for d in records("retain_corpus.jsonl")}
    for d in docs:
        s, e = d["span"]
        passage = d["text"][s:e]
        assert 0 < s < e < len(d["text"])
        assert 2 <= passage.count(". ") + 1 <= 6 and passage.endswith((".", "!", "?"))
        assert d["text"] not in retain_text


def test_spliced_token_labels_cover_the_passage():
    from conftest import tiny_tokenizer
    tok = tiny_tokenizer()
    spl = ex.load_spliced(5)
    rows = ex.spliced_rows(tok, spl, 256)
    for r, d in enumerate(spl):
        ids = rows.tokens[r][rows.label[r]].tolist()
        text = tok.decode(ids)
        assert text.strip()[:20] in d.text[d.span[0]:d.span[1]]


@pytest.mark.parametrize("domain", ["forget", "retain"])
def test_split_is_disjoint_deterministic_and_by_document(domain):
    docs = ex.load_corpus("embedded", domain)
    train, held = ex.split_docs(docs)
    assert not {d.id for d in train} & {d.id for d in held}
    assert len(train) + len(held) == len(docs)
    assert ex.split_docs(docs) == (train, held)
    assert {d.topic for d in held} == {d.topic for d in docs}
    assert not {d.text for d in train} & {d.text for d in held}


def test_rows_keep_documents_apart_and_mask_bos(tok):
    docs = ex.load_corpus("embedded", "forget")[:3]
    rows = ex.make_rows(tok, docs, 32, 10**6, forget=True)
    assert (rows.tokens[:, 0] == ex.bos_id(tok)).all()
    assert torch.equal(rows.label, rows.mask), "every real token of a forget row is labelled forget"
    assert not rows.mask[:, 0].any() and rows.attn[:, 0].all()
    first = rows.tokens[rows.doc == 0][0, 1:][rows.mask[rows.doc == 0][0, 1:]]
    assert tok.decode(first.tolist()).strip()[:15] == docs[0].text.strip()[:15]
    assert (rows.mask.long().diff(dim=1) <= 0)[:, 1:].all(), "pads only at the end of a row"


def test_jsonl_txt_and_wikitext_loaders(tmp_path):
    j = tmp_path / "c.jsonl"
    j.write_text('{"text": "alpha beta", "label": "x"}\n\n{"text": "gamma"}\n')
    docs = ex.load_corpus(str(j), "forget")
    assert [d.text for d in docs] == ["alpha beta", "gamma"] and docs[0].topic == "x"
    t = tmp_path / "c.txt"
    t.write_text("First doc line one.\nline two.\n\nSecond doc.\n")
    assert [d.text for d in ex.load_corpus(str(t), "retain")] == ["First doc line one.\nline two.", "Second doc."]
    w = tmp_path / "w.tokens"
    w.write_text(" \n = Alpha = \n \n Some text . \n = = History = = \n More text . \n = Beta = \n Other . \n")
    docs = ex.load_corpus(str(w), "retain")
    assert len(docs) == 2 and "More text" in docs[0].text and "History" in docs[0].text


def test_hf_source_goes_through_load_dataset(monkeypatch):
    import datasets
    calls = {}

    def fake(name, config=None, split=None):
        calls.update(name=name, config=config, split=split)
        return [{"text": " = T = "}, {"text": " body . "}, {"text": " = U = "}, {"text": " more . "}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    docs = ex.load_corpus("hf:wikitext:wikitext-2-raw-v1:test", "retain")
    assert calls == {"name": "wikitext", "config": "wikitext-2-raw-v1", "split": "test"} and len(docs) == 2


def test_hf_source_offline_is_a_usage_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ex.UsageError, match="hub may be unreachable"):
        ex.load_questions("hf:cais/wmdp:wmdp-bio", "forget")


@pytest.mark.skipif(not (SHARED / "data/wikitext-2/wiki.valid.tokens").exists(), reason="no ../shared WikiText")
def test_real_wikitext_file_splits_into_its_60_articles():
    docs = ex.load_corpus(str(SHARED / "data/wikitext-2/wiki.valid.tokens"), "retain")
    assert len(docs) == 60
    assert all(len(d.text.split()) > 100 for d in docs)
    assert not any(ex.WIKITEXT_TITLE.match(l) for d in docs for l in d.text.splitlines())


def test_question_files_all_layouts(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps([{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 2}]))
    (tmp_path / "h.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nQ?,a,b,c,d,1\n")
    (tmp_path / "m.csv").write_text("Q?,a,b,c,d,C\n")
    qs = ex.load_questions(",".join(str(tmp_path / n) for n in ("q.json", "h.csv", "m.csv")), "forget")
    assert [q.answer for q in qs] == [2, 1, 2]


@pytest.mark.parametrize("line,msg", [
    ('{"question": "Q?", "choices": ["a", "b", "c"], "answer": 0}', "exactly 4"),
    ('{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 4}', "out of range"),
    ('{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 1', "line 1 is not valid JSON"),
])
def test_bad_questions_are_named(tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(ex.UsageError, match=msg):
        ex.load_questions(str(p), "forget")


def test_built_spliced_documents_have_true_spans():
    f, r = ex.load_corpus("embedded", "forget")[:6], ex.load_corpus("embedded", "retain")[:6]
    spl = ex.build_spliced(f, r, 6, seed=0)
    for s in spl:
        passage = s.text[s.span[0]:s.span[1]]
        assert any(passage[:40] in d.text.replace("\n", " ") for d in f)
        assert 2 <= len([x for x in passage.split(". ") if x]) <= 5 + 1
    # too few (or no) documents: a one-line error naming which documents, not a division by zero
    with pytest.raises(ex.UsageError, match="^--detector_boundary: fitting corpora too small"):
        ex.build_spliced([], r, 6, seed=1, what="--detector_boundary: fitting")
    with pytest.raises(ex.UsageError, match="^held-out corpora too small"):
        ex.build_spliced(f[:1], r[:1], 1, seed=0)

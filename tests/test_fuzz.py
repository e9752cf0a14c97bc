"""Every loader of user-given files on hostile input (issue 13).

Each case writes one file and loads it. The outcome must be a result that keeps the loader's own
invariants, or a UsageError whose message is one short line naming the file. Any other exception
fails the test. Inputs: random bytes and text, files cut at a random byte, valid JSON of the wrong
shape (lists, numbers, nested objects, nulls, huge strings, escapes of lone surrogates), CSVs with
missing or extra columns and bad answers, and empty files. Seeded (derandomize), about 10 s.
"""
import csv
import io
import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import experiment as ex

CASES = 300  # per input type
FUZZ = settings(max_examples=CASES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

HUGE = ["x" * 200_000, "é" * 70_000]  # over csv's field limit; long enough to show an untruncated message
RAW_JSON = ['"\\ud800"', '"a\\udc80b"', "NaN", "-Infinity", "1" * 5000, "[" * 5000 + "]" * 5000,
            "1e999", '{"a": 1, "a": 2}', '"\u2028"', "{", '{"text": "unterminated']
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10**20), st.floats(),
                    st.text(max_size=20), st.sampled_from(HUGE))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                      max_size=4), max_leaves=6)


def raw_field(keys: list[str]) -> st.SearchStrategy[str]:
    """A one-field JSON object whose value is spelled raw (lone surrogates, NaN, 5000-digit ints)."""
    return st.builds(lambda k, v: '{"%s": %s}' % (k, v), st.sampled_from(keys), st.sampled_from(RAW_JSON))


def lines_of(*kinds) -> st.SearchStrategy[str]:
    return st.lists(st.one_of(st.just(""), *kinds), max_size=6).map("\n".join)


def file_bytes(structured: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """Random bytes, random text, the structured content, or that content cut at a random byte."""
    utf8 = structured.map(lambda s: s.encode("utf-8"))
    cut = st.tuples(utf8, st.floats(0, 1)).map(lambda t: t[0][:int(len(t[0]) * t[1])])
    bom = utf8.map(lambda b: b"\xef\xbb\xbf" + b)
    return st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode), utf8, utf8, cut, bom,
                     st.just(b""))


def fuzz(path, content, load, check) -> Counter:
    """Runs the loader on every generated file; returns the outcomes by kind."""
    seen = Counter()

    @FUZZ
    @given(content)
    def case(data: bytes):
        path.write_bytes(data)
        try:
            result = load()
        except ex.UsageError as e:
            msg = str(e)
            assert len(msg.splitlines()) == 1 and len(msg) < 400, msg[:300]
            assert str(path) in msg, msg[:300]
            seen["usage_error"] += 1
            return
        seen[check(result)] += 1

    case()
    return seen


def utf8_ok(s: str) -> bool:
    s.encode("utf-8")
    return True


def check_docs(docs) -> str:
    assert isinstance(docs, list) and docs
    for d in docs:
        assert isinstance(d, ex.Doc) and all(isinstance(v, str) and utf8_ok(v) for v in d)
        assert d.text.strip() and d.id and d.topic
    return "wikitext" if docs[0].topic == "wikitext" else "parsed"


def check_questions(qs) -> str:
    assert isinstance(qs, list) and qs
    for q in qs:
        assert isinstance(q.question, str) and q.question.strip() == q.question != "" and utf8_ok(q.question)
        assert isinstance(q.choices, tuple) and len(q.choices) == 4
        assert all(isinstance(c, str) and utf8_ok(c) for c in q.choices)
        assert type(q.answer) is int and 0 <= q.answer < 4
    return "parsed"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def assert_both_outcomes(seen: Counter, *kinds: str):
    """Each input type reaches a parsed result and a UsageError, so neither branch passes vacuously."""
    assert sum(seen.values()) >= CASES * 0.9, seen
    for kind in ("usage_error", *kinds):
        assert seen[kind] >= 10, seen


def test_fuzz_jsonl_corpus(folder):
    text = st.one_of(st.text(max_size=40), st.sampled_from(HUGE), json_values)
    record = st.fixed_dictionaries({"text": st.text(min_size=1, max_size=40)},
                                   optional={"topic": scalars, "label": json_values, "id": scalars})
    odd = st.fixed_dictionaries({}, optional={"text": text, "topic": json_values, "id": json_values})
    content = lines_of(record.map(json.dumps)) | lines_of(record.map(json.dumps), odd.map(json.dumps),
                                                          json_values.map(json.dumps), raw_field(["text", "topic", "id"]))
    path = folder / "corpus.jsonl"
    assert_both_outcomes(fuzz(path, file_bytes(content), lambda: ex.load_corpus(str(path), "forget"), check_docs),
                         "parsed")


def test_fuzz_txt_and_wikitext_corpus(folder):
    line = st.one_of(st.sampled_from([" = Alpha = ", " = = History = = ", " = Beta = ", " ", "Some text .",
                                      "\r", "\x0c", "\t"]), st.text(max_size=30))
    path = folder / "corpus.txt"
    seen = fuzz(path, file_bytes(lines_of(line)), lambda: ex.load_corpus(str(path), "retain"), check_docs)
    assert_both_outcomes(seen, "parsed", "wikitext")


QUESTION = st.fixed_dictionaries({"question": st.text(min_size=1, max_size=30).filter(str.strip),
                                  "choices": st.lists(st.text(max_size=10), min_size=4, max_size=4),
                                  "answer": st.one_of(st.integers(0, 3), st.sampled_from("ABCDabcd"))})
ODD_QUESTION = st.fixed_dictionaries({}, optional={
    "question": st.one_of(st.text(max_size=20), json_values),
    "choices": st.one_of(st.lists(st.text(max_size=5), max_size=6), json_values),
    "answer": st.one_of(st.integers(-2, 6), st.sampled_from(["A", " d ", "0", "3", "E", "", "1.0", "AB"]),
                        json_values)})


def test_fuzz_json_questions(folder):
    content = st.one_of(st.lists(QUESTION, min_size=1, max_size=4), st.lists(QUESTION | ODD_QUESTION, max_size=4),
                        st.lists(st.integers(), max_size=4), json_values).map(json.dumps)
    path = folder / "questions.json"
    seen = fuzz(path, file_bytes(content | st.sampled_from(RAW_JSON)),
                lambda: ex.load_questions(str(path), "forget"), check_questions)
    assert_both_outcomes(seen, "parsed")


def test_fuzz_jsonl_questions(folder):
    content = lines_of(QUESTION.map(json.dumps)) | lines_of(QUESTION.map(json.dumps), ODD_QUESTION.map(json.dumps),
                                                            json_values.map(json.dumps),
                                                            raw_field(["question", "choices", "answer"]))
    path = folder / "questions.jsonl"
    seen = fuzz(path, file_bytes(content), lambda: ex.load_questions(str(path), "retain"), check_questions)
    assert_both_outcomes(seen, "parsed")


def csv_text(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def test_fuzz_csv_questions(folder):
    answer = st.sampled_from(["0", "3", "4", "A", "d", " B ", "x", "-1", "1.0", "", "9" * 5000])
    cell = st.one_of(st.text(max_size=15), answer, st.sampled_from(HUGE))
    good = st.tuples(st.text(min_size=1, max_size=15).filter(str.strip), st.lists(st.text(max_size=8),
                     min_size=4, max_size=4), answer).map(lambda t: [t[0], *t[1], t[2]])
    rows = st.lists(good, max_size=5) | st.lists(good | st.lists(cell, max_size=8), max_size=5)
    header = st.sampled_from([[], [["question", "choice0", "choice1", "choice2", "choice3", "answer"]]])
    content = st.tuples(header, rows).map(lambda t: csv_text(t[0] + t[1]))
    path = folder / "questions.csv"
    seen = fuzz(path, file_bytes(content), lambda: ex.load_questions(str(path), "forget"), check_questions)
    assert_both_outcomes(seen, "parsed")


def test_fuzz_sae_cfg(folder):
    size = st.one_of(st.integers(1, 4096), st.integers(1, 4096),
                     st.sampled_from([0, -3, 10**30, True, 1.0, "4", None, [4]]))
    good = st.fixed_dictionaries({k: st.integers(1, 4096) for k in ex.SAE_SIZES}, optional={"extra": json_values})
    odd = st.fixed_dictionaries({}, optional={k: size for k in ex.SAE_SIZES})
    content = st.one_of(good, good, odd, json_values).map(json.dumps) | st.sampled_from(RAW_JSON)

    def check(cfg) -> str:
        assert set(cfg) == set(ex.SAE_SIZES)
        assert all(type(v) is int and v >= 1 for v in cfg.values())
        return "parsed"

    path = folder / "sae" / "cfg.json"
    path.parent.mkdir()
    seen = fuzz(path, file_bytes(content), lambda: ex.read_sae_cfg(path.parent), check)
    assert_both_outcomes(seen, "parsed")


@pytest.mark.parametrize("name,load", [
    ("corpus.txt", lambda p: ex.load_corpus(str(p), "forget")),
    ("questions.json", lambda p: ex.load_questions(str(p), "forget")),
    ("cfg.json", lambda p: ex.read_sae_cfg(p.parent)),
])
def test_unreadable_path_is_a_usage_error(tmp_path, name, load):
    """A folder where a file is expected, as read_text sees it (the CLI's is_file check comes first)."""
    (tmp_path / name).mkdir()
    with pytest.raises(ex.UsageError, match="cannot be read|file not found"):
        load(tmp_path / name)

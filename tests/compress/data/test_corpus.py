from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.data.corpus import (
    BUILTIN,
    Split,
    build_eval_set,
    calibration_windows,
    load_documents,
    token_stream,
    windows_from,
)
from compress.errors import InputError
from compress.models.tiny import byte_tokenizer
from compress.targets import EvalSpec


def test_the_builtin_corpus_is_real_prose_split_disjointly_by_document():
    docs = load_documents(BUILTIN)
    assert len(docs) > 50 and sum(len(d.text) for d in docs) > 300_000
    eval_keys = {d.key for d in docs if d.split() is Split.EVAL}
    calib_keys = {d.key for d in docs if d.split() is Split.CALIBRATION}
    assert eval_keys and calib_keys and not eval_keys & calib_keys
    assert 0.1 < len(eval_keys) / len(docs) < 0.45
    tok = byte_tokenizer()
    eval_text = tok.decode(token_stream(docs, Split.EVAL, tok))
    calib_text = tok.decode(token_stream(docs, Split.CALIBRATION, tok))
    for doc in docs:
        where = eval_text if doc.key in eval_keys else calib_text
        other = calib_text if doc.key in eval_keys else eval_text
        assert doc.text[:200] in where and doc.text[:200] not in other


def test_eval_sets_are_deterministic_and_shaped_by_the_spec():
    tok = byte_tokenizer()
    spec = EvalSpec(windows=5, window_len=100, prefill_len=40, prompts=("Hi", "Bye"))
    a, b = build_eval_set(tok, spec), build_eval_set(tok, spec)
    assert a == b and a.digest() == b.digest()
    assert len(a.windows) == 5 and all(len(w) == 100 for w in a.windows)
    assert len(a.latency_prompt) == 40 and len(a.prompt_ids) == 2
    assert tok.decode(a.prompt_ids[0]).endswith("<|im_start|>assistant\n")  # the chat template is applied
    assert len(set(a.windows)) == 5
    calib = calibration_windows(tok, BUILTIN, 3, 100)
    assert not set(map(tuple, calib)) & set(a.windows)


def test_user_files_txt_and_jsonl(tmp_path: Path):
    tok = byte_tokenizer()
    txt = tmp_path / "notes.txt"
    txt.write_text("\n\n".join(f"Paragraph {i} " + "words " * 60 for i in range(40)))
    assert len(load_documents(str(txt))) == 40
    es = build_eval_set(tok, EvalSpec(windows=2, window_len=64, prefill_len=16), str(txt))
    assert es.source == str(txt) and len(es.windows) == 2
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"row {i}"}) if i % 2 else json.dumps(f"bare {i}")
                               for i in range(6)))
    assert [d.text for d in load_documents(str(jsonl))][:2] == ["bare 0", "row 1"]


@pytest.mark.parametrize("content,name,fragment", [
    ('{"text": "ok"}\n{broken\n', "bad.jsonl", "bad.jsonl:2: not valid JSON"),
    ('{"body": "no text key"}\n', "keys.jsonl", "keys.jsonl:1: expected a string or an object with a 'text'"),
    ("x", "data.csv", "unsupported extension '.csv'"),
])
def test_bad_user_files_name_the_file_and_line(tmp_path: Path, content, name, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        load_documents(str(path))


def test_too_little_text_says_how_much_is_needed(tmp_path: Path):
    with pytest.raises(InputError, match="has 8 tokens; 2 windows of 8 need at least 9"):
        windows_from(list(range(8)), 2, 8, "x")
    assert windows_from(list(range(9)), 2, 8, "x") == [list(range(8)), list(range(1, 9))]
    with pytest.raises(InputError, match="has 5 tokens; 1 windows of 8 need at least 8"):
        windows_from(list(range(5)), 1, 8, "x")
    with pytest.raises(InputError, match="no such file"):
        load_documents(str(tmp_path / "missing.txt"))

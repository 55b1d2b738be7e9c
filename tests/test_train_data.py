"""Training data: alpaca / sharegpt JSON(L) through ``datasets``, templates,
and the loss mask (only the assistant's tokens are labelled)."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from ktmoe.hf.errors import KTAMXConfigError  # noqa: E402
from ktmoe.train.args import DataArguments  # noqa: E402
from ktmoe.train.data import (  # noqa: E402
    IGNORE_INDEX,
    SFTDataCollator,
    encode_example,
    get_dataset,
    get_template,
    load_conversations,
)
from ktmoe.train.tiny import build_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def labelled_text(tok, ids, labels):
    """The labelled tokens, decoded run by run."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


CONV = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "And 4 plus 4?"}, {"role": "assistant", "content": "4 plus 4 is 8."}]


def test_chat_template_masks_everything_but_the_replies(tok):
    t = get_template("auto", tok)
    assert t.name == "tokenizer"
    ids, labels = encode_example(t, CONV, "Be brief.", cutoff_len=1000)
    assert labelled_text(tok, ids, labels) == ["2 plus 3 is 5.<|im_end|>\n", "4 plus 4 is 8.<|im_end|>\n"]
    full = tok.decode(ids)
    assert full.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?")
    # only the last reply with mask_history, everything with train_on_prompt
    ids2, labels2 = encode_example(t, CONV, None, 1000, mask_history=True)
    assert labelled_text(tok, ids2, labels2) == ["4 plus 4 is 8.<|im_end|>\n"]
    ids3, labels3 = encode_example(t, CONV, None, 1000, train_on_prompt=True)
    assert labels3 == ids3


def test_plain_template(tok):
    t = get_template("plain", tok)
    ids, labels = encode_example(t, CONV, "Be brief.", cutoff_len=1000)
    assert tok.decode(ids) == ("Be brief.\n\nUser: What is 2 plus 3?\nAssistant: 2 plus 3 is 5.<|im_end|>\n"
                               "User: And 4 plus 4?\nAssistant: 4 plus 4 is 8.<|im_end|>\n")
    runs = labelled_text(tok, ids, labels)
    assert [r.strip() for r in runs] == ["2 plus 3 is 5.<|im_end|>", "4 plus 4 is 8.<|im_end|>"]
    prompt = t.encode_prompt(CONV[:1], None)
    assert tok.decode(prompt) == "User: What is 2 plus 3?\nAssistant: "


def test_cutoff_len_cuts_and_keeps_the_prefix(tok):
    t = get_template("tokenizer", tok)
    ids, labels = encode_example(t, CONV, None, cutoff_len=1000)
    ids8, labels8 = encode_example(t, CONV, None, cutoff_len=8)
    assert ids8 == ids[:8] and labels8 == labels[:8]
    assert all(x == IGNORE_INDEX for x in labels8)  # the first reply starts later


def test_template_that_is_not_prefix_stable_is_refused(tok):
    import copy

    t2 = copy.deepcopy(tok)
    # renders the last message differently from earlier ones
    t2.chat_template = ("{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}"
                        "{{ m['content'] }}|{% endif %}{% endfor %}")
    with pytest.raises(KTAMXConfigError, match="template: plain"):
        encode_example(get_template("tokenizer", t2), CONV, None, 100)
    t2.chat_template = None
    with pytest.raises(KTAMXConfigError, match="no chat template"):
        get_template("tokenizer", t2)
    assert get_template("auto", t2).name == "plain"


def write(path, data, jsonl=False):
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            for d in data:
                f.write(json.dumps(d) + "\n")
        else:
            json.dump(data, f)
    return str(path)


def test_alpaca_and_sharegpt_files(tmp_path, tok, caplog):
    a = write(tmp_path / "a.json", [
        {"instruction": "Sort these numbers.", "input": "3, 1, 2", "output": "1, 2, 3."},
        {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be nice.",
         "history": [["Hello?", "Hello!"]]},
    ])
    s = write(tmp_path / "s.jsonl", [
        {"messages": [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Q1"},
                      {"role": "assistant", "content": "A1"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},          # invalid: no reply
        {"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]},  # wrong order
    ], jsonl=True)
    with caplog.at_level(logging.WARNING):
        ds = load_conversations(DataArguments(dataset=f"{a},{s}"))
    assert "2 of 3 examples are not valid sharegpt conversations" in caplog.text
    rows = list(ds)
    assert len(rows) == 3
    assert rows[0]["messages"] == [{"role": "user", "content": "Sort these numbers.\n3, 1, 2"},
                                   {"role": "assistant", "content": "1, 2, 3."}]
    assert rows[1]["system"] == "Be nice."
    assert [m["content"] for m in rows[1]["messages"]] == ["Hello?", "Hello!", "Say hi.", "Hi!"]
    assert rows[2]["system"] == "Sys." and rows[2]["messages"][1]["content"] == "A1"
    out = get_dataset(get_template("auto", tok), DataArguments(dataset=f"{a},{s}", cutoff_len=64))
    train = out["train_dataset"]
    assert out["eval_dataset"] is None and len(train) == 3
    r = train[1]
    assert labelled_text(tok, r["input_ids"], r["labels"]) == ["Hello!<|im_end|>\n", "Hi!<|im_end|>\n"]
    assert r["attention_mask"] == [1] * len(r["input_ids"])


def test_dataset_info_with_columns_and_tags(tmp_path, tok):
    write(tmp_path / "d.json", [{"dialog": [{"who": "me", "text": "Hey"}, {"who": "bot", "text": "Yo"}],
                                 "sys": "S"}])
    write(tmp_path / "q.json", [{"q": "Name a color.", "a": "Blue."}])
    write(tmp_path / "dataset_info.json", {
        "chats": {"file_name": "d.json", "formatting": "sharegpt", "columns": {"messages": "dialog", "system": "sys"},
                  "tags": {"role_tag": "who", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}},
        "qa": {"file_name": "q.json", "formatting": "alpaca", "columns": {"prompt": "q", "response": "a"}},
    })
    ds = load_conversations(DataArguments(dataset="chats,qa", dataset_dir=str(tmp_path)))
    rows = list(ds)
    assert rows[0]["messages"] == [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Yo"}]
    assert rows[0]["system"] == "S"
    assert rows[1]["messages"][1]["content"] == "Blue."


def test_bundled_datasets_and_val_size(tok):
    out = get_dataset(get_template("auto", tok), DataArguments(dataset="tiny_alpaca,tiny_sharegpt", cutoff_len=256,
                                                                val_size=0.1))
    n_train, n_eval = len(out["train_dataset"]), len(out["eval_dataset"])
    assert n_train + n_eval == 718 and n_eval == 72
    ds = load_conversations(DataArguments(dataset="tiny_alpaca", max_samples=5))
    assert len(ds) == 5


def test_dataset_errors(tmp_path, tok):
    with pytest.raises(KTAMXConfigError, match="known names: tiny_alpaca, tiny_sharegpt"):
        load_conversations(DataArguments(dataset="nope"))
    odd = write(tmp_path / "odd.json", [{"foo": 1, "bar": 2}])
    with pytest.raises(KTAMXConfigError, match="cannot tell its format"):
        load_conversations(DataArguments(dataset=odd))
    txt = tmp_path / "x.txt"
    txt.write_text("hi")
    with pytest.raises(KTAMXConfigError, match="not a .json or .jsonl"):
        load_conversations(DataArguments(dataset=str(txt)))
    long = write(tmp_path / "long.json", [{"instruction": "word " * 50, "output": "ok"},
                                          {"instruction": "short", "output": "fine"}])
    out = get_dataset(get_template("auto", tok), DataArguments(dataset=long, cutoff_len=20))
    assert len(out["train_dataset"]) == 1  # the long prompt leaves no reply token within 20 tokens
    with pytest.raises(KTAMXConfigError, match="no example keeps a response token"):
        get_dataset(get_template("auto", tok), DataArguments(dataset=long, cutoff_len=3))


def test_collator_pads_on_the_right():
    c = SFTDataCollator(pad_token_id=9, pad_to_multiple_of=4)
    b = c([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert b["input_ids"].tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3, -100], [4, -100, -100, -100]]

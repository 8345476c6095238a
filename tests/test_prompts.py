"""Prompt sets as every command reads them (``vllm_align.data.prompts``: JSONL with
``prompt`` or chat ``messages``, a ``datasets`` directory) and train-mara's prompt order."""

from __future__ import annotations

import importlib.util
import json

import pytest

from vllm_align.data.prompts import DataError, PromptSampler, load_prompts, read_prompts


def test_prompt_sets(tiny_pair, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "the old garden"}) + "\n\n" + json.dumps(
        {"id": "c", "messages": [{"role": "user", "content": "tell me"}]}) + "\n")
    plain, chat = load_prompts(path, tok)
    assert plain.id == 0 and plain.text == "the old garden" and plain.messages is None
    assert list(plain.token_ids) == tok("the old garden").input_ids
    rendered = tok.apply_chat_template([{"role": "user", "content": "tell me"}], tokenize=False,
                                       add_generation_prompt=True)
    assert chat.id == "c" and chat.text == rendered
    assert list(chat.token_ids) == tok(rendered, add_special_tokens=False).input_ids
    assert [(r.id, r.prompt) for r in read_prompts(["a", {"prompt": "b", "id": 7}])] == [
        (0, "a"), (7, "b")]


@pytest.mark.parametrize("content, match", [
    ('{"text": "x"}', "needs 'prompt'"),
    ('{"messages": []}', "non-empty list"),
    ('not json', "not valid JSON"),
    ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}', "duplicate id 1"),
])
def test_bad_prompt_files(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(DataError, match=match):
        read_prompts(path)


def test_datasets_directory(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "dataset_info.json").write_text("{}")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(DataError, match="needs the `datasets` package, which is not "
                                                 "installed"):
            read_prompts(d)
    with pytest.raises(DataError, match="not a `datasets` save_to_disk directory"):
        read_prompts(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        read_prompts(tmp_path / "missing.jsonl")


def test_prompt_sampler_epochs_and_resume():
    s = PromptSampler(5, seed=1)
    first = s.take(7)
    assert sorted(first[:5]) == list(range(5))  # an epoch is a permutation
    resumed = PromptSampler(5, seed=1, position=3)
    assert resumed.take(4) == first[3:7]
    assert PromptSampler(5, seed=2).take(5) != first[:5]

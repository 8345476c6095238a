"""Reward/cost sources and prompt sets as the MARA trainer uses them (the shared
``vllm_align.data.rewards`` / ``vllm_align.data.prompts``)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from vllm_align.data.prompts import DataError as PromptSetError
from vllm_align.data.prompts import Prompt, load_prompts
from vllm_align.data.prompts import read_prompts as read_prompt_records
from vllm_align.data.rewards import CallableReward as CallableScorer
from vllm_align.data.rewards import HFReward as HFScoreModel
from vllm_align.data.rewards import RewardError as RewardSourceError
from vllm_align.train.prompts import PromptSampler
from vllm_align.train.terminal import TerminalReward, load_scorer


def _p(text: str, messages=None) -> Prompt:
    return Prompt(0, text, (1,), messages)


# ---------------------------------------------------------------------------
# Callables
# ---------------------------------------------------------------------------

def test_callable_specs(tmp_path):
    (tmp_path / "rw.py").write_text("def score(prompt, response):\n"
                                    "    return len(response) - len(prompt)\n")
    by_file = load_scorer(f"{tmp_path / 'rw.py'}:score")
    assert by_file([_p("ab"), _p("")], ["abcd", "x"]) == [2.0, 1.0]
    by_module = load_scorer("vllm_align.toy.world:polite_pair_reward")
    assert by_module([_p("q")], ["thank you kindly"]) == [pytest.approx(2 / 3)]
    direct = load_scorer(lambda p, r: 0.5)
    assert isinstance(direct, CallableScorer) and direct([_p("a")], ["b"]) == [0.5]
    assert load_scorer(None) is None


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("vllm_align.toy.world:nothing", "no callable named 'nothing'"),
    ("/nonexistent/rw.py:f", "no such Python file"),
    ("no/such/plainword", "neither a Hugging Face model directory"),  # nor a hub name
])
def test_bad_callable_specs(spec, match):
    with pytest.raises(RewardSourceError, match=match):
        load_scorer(spec)


@pytest.mark.parametrize("value", [float("nan"), "1", None, float("inf")])
def test_callable_must_return_finite_numbers(value):
    with pytest.raises(RewardSourceError, match="must be finite|must be a real number"):
        CallableScorer(lambda p, r: value)([_p("a")], ["b"])


def test_terminal_reward_weights():
    term = TerminalReward(CallableScorer(lambda p, r: 2.0), CallableScorer(lambda p, r: 3.0),
                          alpha_r=1.5, alpha_c=0.5)
    assert term([_p("a")], ["b"]) == ([2.0], [3.0], [1.5 * 2.0 - 0.5 * 3.0])
    assert TerminalReward(None, CallableScorer(lambda p, r: 1.0))([_p("a")], ["b"])[2] == [-1.0]


# ---------------------------------------------------------------------------
# Hugging Face score models
# ---------------------------------------------------------------------------

def _score_model(tiny_pair, out, num_labels=1):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig.from_pretrained(tiny_pair[1])
    cfg.num_labels = num_labels
    cfg.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.normal_(0, 1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_pair[1]).save_pretrained(out)
    return out


def test_hf_score_model_batched_equals_single(tiny_pair, tmp_path):
    path = _score_model(tiny_pair, tmp_path / "rm")
    rm = load_scorer(str(path), batch_size=3)
    assert isinstance(rm, HFScoreModel)
    prompts = [_p("the old garden"), _p("x", [{"role": "user", "content": "a house"}]),
               _p("tell me"), _p("a quiet road by the river")]
    responses = ["it is green", "no", "the teacher saw the bird near the lake", ""]
    batched = rm(prompts, responses)
    single = [load_scorer(str(path), batch_size=1)([p], [r])[0]
              for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(single, abs=1e-4)
    assert len(set(round(s, 4) for s in batched)) == 4 and all(math.isfinite(s) for s in batched)
    # The chat template frames the turns: the chat record's own messages are used.
    text = rm.reward_text(prompts[1], "no")
    assert "a house" in text and "no" in text and "<|assistant|>" in text


def test_hf_score_model_needs_one_label(tiny_pair, tmp_path):
    path = _score_model(tiny_pair, tmp_path / "clf", num_labels=2)
    with pytest.raises(RewardSourceError, match="2 output labels"):
        load_scorer(str(path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardSourceError, match="not a loadable"):
        load_scorer(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------
# Prompt sets
# ---------------------------------------------------------------------------

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
    assert [(r.id, r.prompt) for r in read_prompt_records(["a", {"prompt": "b", "id": 7}])] == [
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
    with pytest.raises(PromptSetError, match=match):
        read_prompt_records(path)


def test_datasets_directory(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "dataset_info.json").write_text("{}")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(PromptSetError, match="needs the `datasets` package, which is not "
                                                 "installed"):
            read_prompt_records(d)
    with pytest.raises(PromptSetError, match="not a `datasets` save_to_disk directory"):
        read_prompt_records(tmp_path)
    with pytest.raises(PromptSetError, match="no such file"):
        read_prompt_records(tmp_path / "missing.jsonl")


def test_prompt_sampler_epochs_and_resume():
    s = PromptSampler(5, seed=1)
    first = s.take(7)
    assert sorted(first[:5]) == list(range(5))  # an epoch is a permutation
    resumed = PromptSampler(5, seed=1, position=3)
    assert resumed.take(4) == first[3:7]
    assert PromptSampler(5, seed=2).take(5) != first[:5]

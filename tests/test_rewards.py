"""Reward sources (vllm_align.data.rewards): Python callables and a tiny local
sequence-classification model, batched scores against one-at-a-time forwards, and
train-mara's terminal reward built from them."""

from __future__ import annotations

import pytest

from tiny_reward import build_reward_model, direct_score
from vllm_align.data.rewards import RewardError, check_reward, load_reward

PROMPTS = ["Tell me about gardens. ", "<s><|user|>\nhi</s>\n<|assistant|>\n", "x",
           "Where did the dog go?", "A much longer prompt about the old bridge and the river "]
RESPONSES = ["They are green and quiet.", "Hello there friend.", "y" * 50, "Near the river.",
             "It was built of stone long ago, and people still cross it every day."]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> str:
    # No chat template: the prompt + response format (the template: test_reward_formats.py).
    return build_reward_model(tmp_path_factory.mktemp("rm"), seed=0, chat_template=False)


@pytest.fixture(scope="module")
def reward_model_no_pad(tmp_path_factory) -> str:
    return build_reward_model(tmp_path_factory.mktemp("rm-nopad"), seed=0, pad_token=False,
                              chat_template=False)


def _expected(path: str, **kw) -> list[float]:
    # Chat-rendered prompts carry their own BOS; the scorer must not add another.
    return [direct_score(path, p + r, add_special_tokens=not (p + r).startswith("<s>"), **kw)
            for p, r in zip(PROMPTS, RESPONSES)]


def test_hf_model_batched_scores_equal_single_forwards(reward_model):
    expected = _expected(reward_model)
    assert len(set(round(x, 3) for x in expected)) == len(expected)   # distinct: a real check
    for batch_size in (1, 2, 16):
        got = load_reward(reward_model, batch_size=batch_size)(PROMPTS, RESPONSES)
        assert got == pytest.approx(expected, abs=1e-4), batch_size


def test_hf_model_truncates_from_the_left(reward_model):
    got = load_reward(reward_model, max_length=8)(PROMPTS, RESPONSES)
    assert got == pytest.approx(_expected(reward_model, last=8), abs=1e-4)


def test_hf_model_without_pad_token_scores_one_at_a_time(reward_model, reward_model_no_pad):
    scorer = load_reward(reward_model_no_pad, batch_size=8)
    assert scorer.batch_size == 1
    # Same weights (same seed) as the padded model: same scores.
    assert scorer(PROMPTS, RESPONSES) == pytest.approx(_expected(reward_model), abs=1e-4)


def test_hf_model_with_several_labels_is_refused(tmp_path, reward_model):
    import json
    import shutil

    bad = tmp_path / "two-labels"
    shutil.copytree(reward_model, bad)
    config = json.loads((bad / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b"}
    config["label2id"] = {"a": 0, "b": 1}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(RewardError, match="num_labels=2; a reward model needs a single score"):
        check_reward(str(bad))
    with pytest.raises(RewardError, match="cannot be loaded"):
        check_reward(str(tmp_path / "missing-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match="not a loadable Hugging Face checkpoint"):
        load_reward(str(tmp_path / "empty"))


def test_callable_from_module_and_file(tmp_path):
    scorer = load_reward("vllm_align.toy.world:polite_pair_reward")
    assert scorer(["p", "q"], ["Thank you.", "The dog."]) == [0.5, 0.0]
    assert load_reward(lambda p, r: len(p) - len(r))(["abc"], ["a"]) == [2.0]

    f = tmp_path / "my_reward.py"
    f.write_text("def words(prompt, response):\n    return len(response.split())\n"
                 "def bad(prompt, response):\n    return 'high'\n"
                 "def inf(prompt, response):\n    return float('inf')\n")
    assert load_reward(f"{f}:words")(["a", "b"], ["one two", ""]) == [2.0, 0.0]
    with pytest.raises(RewardError, match="returned 'high'; a reward must be a real number"):
        load_reward(f"{f}:bad")(["a"], ["b"])
    with pytest.raises(RewardError, match="must be finite"):
        load_reward(f"{f}:inf")(["a"], ["b"])
    with pytest.raises(RewardError, match="must be finite"):
        load_reward(lambda p, r: float("nan"))(["a"], ["b"])
    with pytest.raises(RewardError, match="returned None; a reward must be a real number"):
        load_reward(lambda p, r: None)(["a"], ["b"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        load_reward(f"{f}:words")(["a", "b"], ["c"])


@pytest.mark.parametrize("spec, message", [
    ("vllm_align.no_such_module:f", "cannot import module 'vllm_align.no_such_module'"),
    ("vllm_align.toy.world:no_such_fn", "has no callable named 'no_such_fn'"),
    ("/no/such/file.py:f", "no such Python file"),
    ("vllm_align.toy.world:", "expected 'module:function'"),
    ("", "non-empty string"),
    ("no/such/plainword", "neither a Hugging Face model directory nor a hub model"),
])
def test_bad_callable_specs_are_refused(spec, message):
    with pytest.raises(RewardError, match=message):
        load_reward(spec)


def test_train_mara_terminal_reward_weighs_reward_and_cost():
    """train-mara's episode reward is alpha_r * R - alpha_c * C; an absent scorer counts 0."""
    from vllm_align.train.terminal import TerminalReward, load_scorer

    reward, cost = load_reward(lambda p, r: 2.0), load_reward(lambda p, r: 3.0)
    assert TerminalReward(reward, cost, alpha_r=1.5, alpha_c=0.5)(["a"], ["b"]) == (
        [2.0], [3.0], [1.5 * 2.0 - 0.5 * 3.0])
    assert load_scorer(None) is None
    assert TerminalReward(None, load_reward(lambda p, r: 1.0))(["a"], ["b"])[2] == [-1.0]

"""One reward scorer for sweep, eval and train-mara: the same response of the same
prompt gets the same score on each command's scoring path, and a reward model with
a chat template scores the conversation it renders (``vllm_align.data.rewards``).

No engine: sweep is scored from given generations (``score_and_write``, what
``run_sweep`` does after decoding), eval reads the sweep's responses file, and
train-mara scores through the rollout's terminal reward."""

from __future__ import annotations

import json

import pytest

from tiny_reward import build_reward_model, direct_score
from vllm_align.data.evaluate import EvalConfig, run_eval
from vllm_align.data.prompts import encode_prompt, load_prompts, read_prompts
from vllm_align.data.sweep import Generations, SweepConfig, score_and_write
from vllm_align.train.rollout import RolloutSpec

RECORDS = [
    {"id": "plain", "prompt": "Tell me about gardens. "},
    {"id": "chat", "messages": [{"role": "user", "content": "Where did the dog go?"}]},
    {"id": "chat-2", "messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "Hello."},
                                  {"role": "user", "content": "And the old bridge?"}]},
]
RESPONSES = ["They are green and quiet.", "Near the river.",
             "It was built of stone long ago, and people still cross it."]


@pytest.fixture(scope="module")
def setup(tiny_pair, tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("formats")
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    rm = build_reward_model(d / "rm", seed=3)          # with the toy chat template
    return d, str(prompts), rm, AutoTokenizer.from_pretrained(tiny_pair[0])


def _expected(rm: str) -> list[float]:
    """The model's logit on the conversation its own chat template renders."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm)
    assert tok.chat_template
    out = []
    for rec, response in zip(RECORDS, RESPONSES):
        turns = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]
        text = tok.apply_chat_template(turns + [{"role": "assistant", "content": response}],
                                       tokenize=False)
        assert text.startswith(tok.bos_token)         # the template writes BOS itself
        out.append(direct_score(rm, text, add_special_tokens=False))
    return out


def test_sweep_eval_and_train_give_a_response_the_same_score(setup):
    d, prompts, rm, gen_tok = setup
    expected = _expected(rm)
    assert len(set(round(x, 3) for x in expected)) == len(expected)

    # sweep: the generator's rendered prompts, one grid point.
    items = read_prompts(prompts)
    cfg = SweepConfig(model="m", reference_model="r", prompts=prompts, reward=rm,
                      output=str(d / "sweep.csv"), lambdas=(1.0,),
                      responses_dir=str(d / "resp"))
    texts = [encode_prompt(gen_tok, it).text for it in items]
    score_and_write(cfg, items, Generations(prompts=texts, responses=RESPONSES, tokens=0,
                                            seconds=0.0))
    recs = [json.loads(line) for line in (d / "resp" / "dera_lambda=1.jsonl").read_text()
            .splitlines()]
    sweep_scores = [r["reward"] for r in recs]
    assert sweep_scores == pytest.approx(expected, abs=1e-4)

    # eval: the sweep's responses file, one prompt at a time (the report holds means).
    eval_scores = []
    for rec in recs:
        a, b = d / f"a-{rec['id']}.jsonl", d / f"b-{rec['id']}.jsonl"
        for path in (a, b):
            path.write_text(json.dumps(rec) + "\n")
        report = run_eval(EvalConfig(a=str(a), b=str(b), reward=rm))
        eval_scores.append(report["reward"]["a"]["mean"])
    assert eval_scores == pytest.approx(sweep_scores, abs=1e-5)

    # train-mara: the prompts as the trainer encodes them, through the terminal reward.
    train_scores, _, _ = RolloutSpec(model="unused", reward=rm).terminal()(
        load_prompts(prompts, gen_tok), RESPONSES)
    assert train_scores == pytest.approx(sweep_scores, abs=1e-5)


def test_callables_get_the_rendered_prompt_on_every_path(setup):
    d, prompts, _, gen_tok = setup
    seen = []
    spec = RolloutSpec(model="unused", reward=lambda p, r: seen.append(p) or 0.0)
    spec.terminal()(load_prompts(prompts, gen_tok), RESPONSES)
    assert seen == [encode_prompt(gen_tok, it).text for it in read_prompts(prompts)]
    assert seen[1].startswith("<s><|user|>\nWhere did the dog go?")

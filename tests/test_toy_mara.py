"""A SAC-trained MARA agent beats its base LLM, through the engine.

The agent is the toy one (``vllm_align.toy.agent``: trained on the toy
world's SFT model to write polite words into 16-token responses), as shipped
in ``vllm_align/toy/assets/`` (test_train_learns.py trains one from scratch
and checks that it learns). Here it is loaded into a real ``vllm.LLM`` serving the SFT model, with
the same run's untrained actor as a second agent, and one ``generate`` call
decodes the 64 held-out prompts every way in ``vllm_align.cli.demo_runs.RUNS``
(16 tokens, top-k 40 / top-p 0.95; sampled runs 4 times). Asserted:

* MARA with the trained agent and sampled decisions (the policy SAC
  optimises) earns far more reward than the SFT model decoded plainly, greedy
  or sampled, and than the same decoding with the untrained agent;
* with greedy decisions (the served default) it beats greedy decoding too;
* the engine emits what the HF rollout the agent was trained and evaluated in
  emits (deterministic runs, text for text).

Request seeds are 1000 * repeat + prompt index, so every run is exact and a
fresh clone reproduces the measured values (docs/toy-measurements.md); the
margins asserted, 0.2 polite word per response and 0.035 of the fraction, are
about half the smallest gap there. The untrained agent's high greedy score is
the fallback rule at work, not learning: not asserted.

Costs: one engine start (about a minute on a busy machine) and seconds of
decoding.
"""

from __future__ import annotations

import pytest

from toy_eval import evaluate_agent
from vllm_align.cli import demo_runs as toy_mara
from vllm_align.toy import shipped
from vllm_align.toy import world as toy
from vllm_align.toy.agent import ToySettings
from vllm_align.toy.world import polite_count

MARGIN_WORDS, MARGIN_FRACTION = 0.2, 0.035


@pytest.fixture(scope="module")
def agent():
    return shipped.agent()


@pytest.fixture(scope="module")
def outputs(agent):
    """Run name -> per repeat, one CompletionOutput per held-out prompt (one generate call)."""
    world = shipped.world()
    llm = toy_mara.build_engine(agent, enforce_eager=True)
    try:
        yield toy_mara.decode_runs(llm, world.prompt_token_ids(llm.get_tokenizer()))
    finally:
        del llm


def test_every_run_decodes_every_prompt(outputs):
    assert set(outputs) == set(toy_mara.RUNS)
    for name, reps in outputs.items():
        assert len(reps) == (len(toy_mara.SEEDS) if toy_mara.RUNS[name].sampled else 1), name
        for rep in reps:
            assert len(rep) == 64
            assert all(len(o.token_ids) <= toy_mara.MAX_TOKENS for o in rep)


@pytest.mark.parametrize("reward, margin", [(polite_count, MARGIN_WORDS),
                                            (lambda p, r: toy.polite_reward(r), MARGIN_FRACTION)],
                         ids=["polite words", "polite fraction"])
def test_trained_mara_beats_its_base_llm(outputs, reward, margin):
    r = toy_mara.mean_rewards(outputs, lambda text: reward("", text))
    plain_best = max(*r["plain greedy"], *r["plain sampling"])
    # Every repeat, not just the mean: each is a whole decode of the 64 prompts.
    assert min(r["trained sampled"]) > plain_best + margin, r
    assert min(r["trained sampled"]) > max(r["untrained sampled"]) + margin, r
    assert r["trained greedy"][0] > r["plain greedy"][0] + margin, r


def test_engine_decodes_as_the_training_rollout(agent, outputs):
    """The served agent reads the states it was trained on: deterministic runs agree with HF."""
    hf = evaluate_agent(agent, ToySettings(), seeds=(0,), runs=(
        "plain greedy", "trained greedy", "untrained greedy"))
    for name in ("plain greedy", "trained greedy", "untrained greedy"):
        engine = [o.text for o in outputs[name][0]]
        same = sum(a == b for a, b in zip(engine, hf[name]["responses"]))
        assert same == len(engine), (name, same)

"""MARA rollouts inside the vLLM engine (``train.engine_rollout``) against the HF reference.

One engine serves the toy world's SFT model with the agent being trained,
with a KV cache of 8 blocks for 8 concurrent episodes, so that episodes are
preempted and walk a position again. With seeded decisions the engine
rollout and ``HFRollout`` must give the learner the same transitions: same
tokens and actions, states equal within float tolerance, equal rewards; and
new actor weights must reach the running engine.
"""

from __future__ import annotations

import pytest
import torch

from vllm_align.data.prompts import load_prompts
from vllm_align.toy import shipped
from vllm_align.toy.agent import train_records
from vllm_align.toy.models import random_agent
from vllm_align.train.engine_rollout import EngineRollout
from vllm_align.train.hf_rollout import HFRollout, load_causal_lm
from vllm_align.train.rollout import RolloutSpec

MAX_LEN = 16
ENGINE = {"max_model_len": 128, "block_size": 32,
          "num_gpu_blocks_override": 8, "max_num_seqs": 8}


@pytest.fixture(scope="module")
def spec():
    return RolloutSpec(model=str(shipped.ASSETS_DIR / "sft"),
                       reward="vllm_align.toy.world:polite_count", max_response_len=MAX_LEN,
                       engine_args=ENGINE)


@pytest.fixture(scope="module")
def hf(spec, one_thread):
    model, tokenizer = load_causal_lm(spec.model)
    return HFRollout(model, tokenizer, spec.terminal(), max_response_len=MAX_LEN)


@pytest.fixture(scope="module")
def engine(spec):
    rollout = EngineRollout.from_spec(spec)
    yield rollout
    rollout.close()


@pytest.fixture(scope="module")
def prompts(hf):
    return load_prompts(train_records(0, 24), hf.tokenizer)


def _actor(hf, seed, bias=0.0):
    return random_agent(hf.hidden_size, seed=seed, accept_bias=bias).state_dict()


@pytest.mark.parametrize("seed", [5, 6])
def test_engine_and_hf_rollouts_give_the_same_transitions(hf, engine, prompts, seed):
    actor = _actor(hf, seed=1)
    ref = hf.collect(prompts, actor, seed=seed)
    got = engine.collect(prompts, actor, seed=seed)

    assert [e.token_ids for e in got.episodes] == [e.token_ids for e in ref.episodes]
    assert [e.chosen for e in got.episodes] == [e.chosen for e in ref.episodes]
    assert [e.num_fallbacks for e in got.episodes] == [e.num_fallbacks for e in ref.episodes]
    a, b = got.transitions, ref.transitions
    assert len(got) == len(ref) > 100
    assert torch.equal(a.action, b.action) and torch.equal(a.done, b.done)
    torch.testing.assert_close(a.state, b.state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.next_state, b.next_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.reward, b.reward, rtol=0, atol=1e-5)
    assert [e.reward for e in got.episodes] == [e.reward for e in ref.episodes]
    assert {e.reward for e in ref.episodes} != {0.0}  # the terminal reward is exercised
    # Preempted episodes walked some candidates twice; each is kept once.
    assert got.forwards > ref.forwards


def test_new_actor_weights_change_the_engine_decisions(hf, engine, prompts):
    """Each collect installs its actor in the running engine, replacing the last one."""
    some = prompts[:8]
    first = engine.collect(some, _actor(hf, seed=2), seed=0)
    always = engine.collect(some, _actor(hf, seed=2, bias=100.0), seed=0)
    never = engine.collect(some, _actor(hf, seed=2, bias=-100.0), seed=0)
    again = engine.collect(some, _actor(hf, seed=2), seed=0)

    assert all(set(e.chosen) == {0} for e in always.episodes)  # every first candidate
    assert sum(e.num_accepts for e in never.episodes) == 0
    assert sum(e.num_fallbacks for e in never.episodes) > 0
    assert [e.token_ids for e in again.episodes] == [e.token_ids for e in first.episodes]
    assert [e.token_ids for e in first.episodes] != [e.token_ids for e in always.episodes]
    assert first.transitions.action.float().mean() not in (0.0, 1.0)


def test_greedy_decisions_match_hf(hf, engine, prompts):
    actor = _actor(hf, seed=3)
    ref = hf.collect(prompts[:8], actor, seed=0, decisions="greedy")
    got = engine.collect(prompts[:8], actor, seed=0, decisions="greedy")
    assert [e.token_ids for e in got.episodes] == [e.token_ids for e in ref.episodes]
    assert torch.equal(got.transitions.action, ref.transitions.action)
    with pytest.raises(ValueError, match="'sampled' or 'greedy'"):
        engine.collect(prompts[:1], None, seed=0, decisions="plain")


def test_only_a_recording_engine_keeps_a_trace(hf, engine, prompts):
    """Recording is installed by the worker extension; turned off, the engine's MARA rows
    are a serving engine's again (no trace, no record step) and decode the same tokens."""
    def rows_kind(worker):
        from vllm_align.engine.batch_state import align_state
        mara = align_state(worker.model_runner).mara
        return type(mara).__name__, hasattr(mara, "log_reject") or hasattr(mara, "_steps")

    llm, some, actor = engine.llm, prompts[:4], _actor(hf, seed=4)
    recorded = engine.collect(some, actor, seed=1)
    assert llm.collective_rpc(rows_kind) == [("RecordingMaraRows", True)]
    llm.collective_rpc("vllm_align_record", args=(False,))
    try:
        assert llm.collective_rpc(rows_kind) == [("MaraRows", False)]
        assert llm.collective_rpc("vllm_align_take_records") == [b""]
        from vllm import SamplingParams, TokensPrompt

        from vllm_align.train.engine_rollout import AGENT
        from vllm_align.train.rollout import episode_seeds
        align = {"method": "mara", "agent": AGENT, "top_k": engine.top_k, "top_p": engine.top_p,
                 "threshold": engine.threshold, "fallback": "last", "decisions": "sampled"}
        params = [SamplingParams(max_tokens=MAX_LEN, temperature=0.0, seed=s,
                                 extra_args={"align": align})
                  for s in episode_seeds(1, len(some))]
        outputs = engine._decode([TokensPrompt(prompt_token_ids=list(p.token_ids))
                                  for p in some], params)
        assert llm.collective_rpc("vllm_align_take_records") == [b""]
    finally:
        llm.collective_rpc("vllm_align_record", args=(True,))
    assert [list(o.outputs[0].token_ids) for o in outputs] == [
        e.token_ids for e in recorded.episodes]

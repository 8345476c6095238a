"""The trainer's batched HF rollout against the plain MARA reference decoder.

``HFRollout`` (batched episodes of different prompt lengths, KV cache with
masked rejected columns, finished rows leaving the batch) must, with greedy
decisions, emit what ``tests/hf_mara_reference.py`` emits (one full forward
per candidate, batch 1) and record as states exactly the hidden states the
served agent reads: trained == served. The transitions' rewards are checked
against the paper's formulas computed by hand from the reference's own numbers.
"""

from __future__ import annotations

import math

import pytest
from conftest import peaked_tiny_llama
import torch

import hf_mara_reference
from vllm_align.data.prompts import Prompt
from vllm_align.data.rewards import CallableReward
from vllm_align.train.hf_rollout import HFRollout
from vllm_align.train.terminal import TerminalReward
from vllm_align.toy.models import random_agent

HIDDEN, VOCAB, EOS = 64, 96, 3
PROMPTS = [[1, 17, 42, 8, 64], [1, 5], [1, 9, 33, 2, 7, 7, 80, 12], [1, 60, 61], [1, 22, 90]]
KL = 0.1


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def model():
    return peaked_tiny_llama(HIDDEN, VOCAB)


class Tok:
    """Enough of a tokenizer for the rollout: ids, EOS, pad, decode."""

    eos_token_id, pad_token_id = EOS, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == EOS))


def _length(prompt: str, response: str) -> float:
    return float(len(response.split()))


def _prompts():
    return [Prompt(i, f"p{i}", tuple(p)) for i, p in enumerate(PROMPTS)]


def _rollout(model, top_k=6, top_p=0.9, max_len=16, terminal=None):
    return HFRollout(model, Tok(), terminal, kl_coef=KL, top_k=top_k, top_p=top_p,
                     max_response_len=max_len)


@pytest.mark.parametrize("bias,top_k,top_p", [(0.0, 6, 0.9), (-2.0, 6, 0.9), (1.0, 40, 0.95),
                                              (-1.0, 3, 1.0)])
def test_greedy_rollout_emits_what_the_reference_emits(model, bias, top_k, top_p):
    agent = random_agent(HIDDEN, seed=11, accept_bias=bias)
    out = _rollout(model, top_k, top_p).collect(_prompts(), agent.state_dict(),
                                                decisions="greedy")
    assert out.forwards > 0
    for ep, prompt in zip(out.episodes, PROMPTS):
        steps = hf_mara_reference.mara_greedy_decode(model, agent, prompt, max_new_tokens=16,
                                                     top_k=top_k, top_p=top_p, eos_token_id=EOS)
        assert min(s.margin for s in steps) > 1e-4  # no near-ties to hinge on rounding
        assert ep.token_ids == hf_mara_reference.tokens(steps)
        assert ep.chosen == [s.chosen_index for s in steps]
        assert ep.num_decisions == sum(len(s.accept_probs) for s in steps)
        assert ep.num_fallbacks == sum(s.fallback for s in steps)
        assert ep.num_decisions - ep.num_accepts == sum(ep.chosen)  # rejects before each pick


def test_states_and_rewards_are_the_papers(model):
    """States = hidden state over prompt+prefix+candidate; rewards = eq. 8 with eq. 6."""
    agent = random_agent(HIDDEN, seed=11, accept_bias=-0.5)
    terminal = TerminalReward(CallableReward(_length), CallableReward(lambda p, r: 1.0),
                              alpha_r=0.5, alpha_c=2.0)
    out = _rollout(model, terminal=terminal).collect(_prompts(), agent.state_dict(),
                                                     decisions="greedy")
    t = out.transitions
    start = 0
    for ep, prompt in zip(out.episodes, PROMPTS):
        steps = hf_mara_reference.mara_greedy_decode(model, agent, prompt, max_new_tokens=16,
                                                     top_k=6, top_p=0.9, eos_token_id=EOS)
        seq, states, actions, rewards, kl_total = list(prompt), [], [], [], 0.0
        for s in steps:
            logits, _ = hf_mara_reference.forward_last(model, seq)
            log_ref = torch.log_softmax(logits.double(), -1)[s.token].item()
            log_pi = 0.0
            for j, a in enumerate(s.accept_probs):  # π_θ(t_k) = a_k·Π_{j<k}(1 − a_j)
                accepted = not s.fallback and j == s.chosen_index
                states.append(hf_mara_reference.forward_last(model, seq + [s.candidates[j]])[1])
                actions.append(int(accepted))
                rewards.append(0.0)
                log_pi += math.log(a) if accepted else math.log(1.0 - a)
            token_reward = -KL * (log_pi - log_ref)
            kl_total += log_pi - log_ref
            if rewards:  # folded into the latest decision (lone tokens before any: dropped)
                rewards[-1] += token_reward
            seq.append(s.token)
        expected_terminal = 0.5 * len(ep.response.split()) - 2.0 * 1.0
        assert ep.terminal == pytest.approx(expected_terminal)
        assert ep.reward == len(ep.response.split()) and ep.cost == 1.0
        assert ep.kl == pytest.approx(kl_total, abs=1e-4)
        n = len(states)
        assert n == ep.num_decisions and n > 2
        rewards[-1] += expected_terminal
        sl = slice(start, start + n)
        torch.testing.assert_close(t.state[sl], torch.stack(states), atol=2e-5, rtol=1e-4)
        assert t.action[sl].tolist() == actions
        torch.testing.assert_close(t.reward[sl], torch.tensor(rewards, dtype=torch.float32),
                                   atol=1e-4, rtol=1e-4)
        assert t.done[sl].tolist() == [0.0] * (n - 1) + [1.0]
        assert torch.equal(t.next_state[sl][:-1], t.state[sl][1:])
        assert not t.next_state[start + n - 1].any()
        assert ep.episode_return == pytest.approx(sum(rewards), abs=1e-4)
        start += n
    assert start == len(out)


def test_sampled_decisions_are_seeded(model):
    agent = random_agent(HIDDEN, seed=3, logit_scale=0.5)  # a ≈ 0.5: many different walks
    ro = _rollout(model)
    a = ro.collect(_prompts(), agent.state_dict(), seed=5)
    b = ro.collect(_prompts(), agent.state_dict(), seed=5)
    c = ro.collect(_prompts(), agent.state_dict(), seed=6)
    for x, y in zip(a.transitions, b.transitions):
        assert torch.equal(x, y)
    assert [e.token_ids for e in a.episodes] == [e.token_ids for e in b.episodes]
    assert [e.token_ids for e in a.episodes] != [e.token_ids for e in c.episodes]
    for ep in a.episodes:
        assert ep.num_decisions - ep.num_accepts == sum(ep.chosen)
    assert 0 < int(a.transitions.action.sum()) < len(a)


def test_plain_decisions_are_greedy_decoding(model):
    out = _rollout(model, max_len=12).collect(_prompts(), None, decisions="plain")
    assert len(out) == 0
    for ep, prompt in zip(out.episodes, PROMPTS):
        seq = list(prompt)
        while len(seq) - len(prompt) < 12:
            logits, _ = hf_mara_reference.forward_last(model, seq)
            seq.append(int(logits.argmax()))
            if seq[-1] == EOS:
                break
        assert ep.token_ids == seq[len(prompt):]
        assert set(ep.chosen) == {0}
    with pytest.raises(ValueError, match="decisions"):
        _rollout(model).collect(_prompts(), None, decisions="best")
    with pytest.raises(ValueError, match="actor weights"):
        _rollout(model).collect(_prompts(), None, decisions="greedy")


def test_reference_decisions_sample_the_llm_over_the_candidates(model):
    """Walking with a_k = p_k / Σ_{j≥k} p_j emits t_k with probability p_k / Σ_j p_j."""
    from vllm_align.mara.rules import candidate_set

    prompt = PROMPTS[0]
    n = 800
    out = _rollout(model, max_len=1).collect([Prompt(i, "", tuple(prompt)) for i in range(n)],
                                             None, seed=1, decisions="reference")
    logits, _ = hf_mara_reference.forward_last(model, prompt)
    ids, probs, valid = candidate_set(logits[None], torch.tensor([6]), torch.tensor([0.9]), 6)
    k = int(valid.sum())
    assert k >= 3
    expected = probs[0, :k] / probs[0, :k].sum()
    picks = torch.tensor([e.chosen[0] for e in out.episodes])
    assert [e.token_ids[0] for e in out.episodes] == ids[0, picks].tolist()
    freq = torch.bincount(picks, minlength=k)[:k].float() / n
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() < 4 * sigma + 1e-3).all(), (freq, expected)

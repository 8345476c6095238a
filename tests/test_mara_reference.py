"""The HF MARA reference decoder against an independent batched composition.

``hf_mara_reference`` (plain Python, one forward per candidate) and
``vllm_align.mara.rules`` (batched tensor ops; here with all candidates of a
step in one batched HF forward) are written independently; on a tiny random
Llama with a random agent they must emit the same tokens, for both fallbacks
and custom k and p. Also checks that ``hidden_states[-1]`` is the final-norm
output the agent must read.
"""

from __future__ import annotations

import pytest
from conftest import peaked_tiny_llama
import torch

import hf_mara_reference
from vllm_align.mara.rules import candidate_set, walk_step
from vllm_align.toy.models import random_agent

HIDDEN, VOCAB = 64, 96


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def model():
    return peaked_tiny_llama(HIDDEN, VOCAB)


def test_last_hidden_state_is_post_norm(model):
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        last = out.hidden_states[-1]
        torch.testing.assert_close(model.lm_head(last), out.logits)
        # Not the pre-norm residual stream: normalising again changes it.
        assert not torch.allclose(model.model.norm(last), last, atol=1e-3)
    hf_mara_reference.check_post_norm(model, out.logits[0, -1], last[0, -1])
    with pytest.raises(RuntimeError, match="final-norm"):
        hf_mara_reference.check_post_norm(model, out.logits[0, -1],
                                          out.hidden_states[-2][0, -1])


@torch.no_grad()
def _batched_decode(model, agent, prompt, *, max_new_tokens, top_k, top_p, threshold,
                    fallback):
    """MARA via rules.py: every candidate of a step in one batched forward."""
    seq = list(prompt)
    logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
    out = []
    for _ in range(max_new_tokens):
        ids, _, valid = candidate_set(logits.unsqueeze(0), torch.tensor([top_k]),
                                      torch.tensor([top_p]), max_k=top_k)
        n = int(valid.sum())
        batch = torch.tensor([seq + [int(t)] for t in ids[0, :n]])
        res = model(input_ids=batch, use_cache=False, output_hidden_states=True)
        a = agent.accept_prob(res.hidden_states[-1][:, -1])
        index = torch.tensor([0])
        while True:  # the one walk, a candidate at a time
            step = walk_step(index, torch.tensor([n]), a[index], torch.tensor([threshold]),
                             torch.tensor([fallback == "last"]), torch.tensor([False]),
                             torch.zeros(1))
            if step.done.item():
                break
            index = step.next_index
        j = int(step.chosen_index[0])
        seq.append(int(ids[0, j]))
        out.append(seq[-1])
        logits = res.logits[j, -1]
    return out


@pytest.mark.parametrize("fallback,top_k,top_p,bias", [
    ("last", 40, 0.95, 0.0),
    ("first", 40, 0.95, 1.0),
    ("last", 5, 0.8, -2.0),
    ("first", 3, 1.0, 1.0),
])
def test_reference_matches_batched_rules(model, fallback, top_k, top_p, bias):
    agent = random_agent(HIDDEN, seed=11, accept_bias=bias)
    prompt = [1, 17, 42, 8, 64]
    steps = hf_mara_reference.mara_greedy_decode(
        model, agent, prompt, max_new_tokens=16, top_k=top_k, top_p=top_p, threshold=0.5,
        fallback=fallback)
    assert len(steps) == 16
    # Near-ties could legitimately flip between a batched and a single forward.
    assert min(s.margin for s in steps) > 1e-4 and min(s.set_margin for s in steps) > 1e-6
    expected = hf_mara_reference.tokens(steps)
    got = _batched_decode(model, agent, prompt, max_new_tokens=16, top_k=top_k, top_p=top_p,
                          threshold=0.5, fallback=fallback)
    assert got == expected
    for s in steps:
        n = len(s.candidates)
        assert len(s.accept_probs) == (0 if n == 1 else s.chosen_index + 1 if not s.fallback
                                       else n - 1 if fallback == "last" else n)


def test_reference_exercises_every_branch(model):
    """Over the configurations above, the walk takes every kind of decision."""
    kinds = set()
    for fallback, bias in (("last", -1.5), ("first", -1.5), ("last", 0.5)):
        for s in hf_mara_reference.mara_greedy_decode(
                model, random_agent(HIDDEN, seed=11, accept_bias=bias), [1, 17, 42, 8, 64],
                max_new_tokens=24, top_k=6, top_p=0.9, fallback=fallback):
            if len(s.candidates) == 1:
                kinds.add("lone")
            elif s.fallback:
                kinds.add(f"fallback-{fallback}")
            else:
                kinds.add("first" if s.chosen_index == 0 else "later")
    assert kinds == {"lone", "fallback-last", "fallback-first", "first", "later"}, kinds


def test_eos_stops(model):
    agent = random_agent(HIDDEN, seed=11)
    steps = hf_mara_reference.mara_greedy_decode(model, agent, [1, 17, 42], max_new_tokens=12)
    eos = steps[2].token
    stopped = hf_mara_reference.mara_greedy_decode(model, agent, [1, 17, 42], max_new_tokens=12,
                                                   eos_token_id=eos)
    first = next(i for i, s in enumerate(steps) if s.token == eos)
    assert hf_mara_reference.tokens(stopped) == hf_mara_reference.tokens(steps)[:first + 1]

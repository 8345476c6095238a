"""MARA inside the engine, checked token for token against a plain HF decoder.

One engine (aligned + reference model, two agents) serves the tests here with
4 sequences at a time, a 64-token step budget (long prompts are prefilled in
chunks), prefix caching on 32-token blocks, and a KV cache of only 12 blocks,
so that sequences are preempted and recomputed mid-walk. The reference
decoder (``hf_mara_reference``) runs one full HF forward per candidate, at
batch size 1.
"""

import random

import pytest
import torch
from vllm import LLM, SamplingParams, TokensPrompt

import hf_mara_reference
import hf_reference
from vllm_align.engine.mara_stats import mara_stats
from vllm_align.mara.agent import save_agent
from vllm_align.toy.models import random_agent

MAX_NUM_SEQS, STEP_BUDGET, NUM_BLOCKS = 4, 64, 12
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def agents(tiny_pair, tmp_path_factory):
    """{name: (agent, path)}: two agents with state-dependent decisions, and two sure ones."""
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(tiny_pair[0]).hidden_size
    out = tmp_path_factory.mktemp("agents")
    made = {"default": random_agent(hidden, seed=1),
            "eager": random_agent(hidden, seed=2, accept_bias=2.0),
            "always": random_agent(hidden, seed=3, accept_bias=100.0),
            "never": random_agent(hidden, seed=4, accept_bias=-100.0)}
    return {name: (agent, str(save_agent(agent, out / f"{name}.safetensors")))
            for name, agent in made.items()}


@pytest.fixture(scope="module")
def mara_llm(tiny_pair, agents):
    aligned, reference = tiny_pair
    llm = LLM(model=aligned, additional_config={"align": {
        "reference_model": reference,
        "mara_agents": {name: path for name, (_, path) in agents.items()}}},
        dtype="float32", max_model_len=256, max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=STEP_BUDGET, enable_prefix_caching=True, block_size=32,
        num_gpu_blocks_override=NUM_BLOCKS, seed=0, disable_log_stats=False, enforce_eager=True)
    yield llm
    del llm


@pytest.fixture(scope="module")
def hf_models(tiny_pair):
    return hf_reference.load_pair(*tiny_pair)


def _generate(llm, prompts, params):
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)


def _mara_reference(model, agent, prompt, spec, max_tokens):
    return hf_mara_reference.mara_greedy_decode(
        model, agent, prompt, max_new_tokens=max_tokens, top_k=spec.get("top_k", 40),
        top_p=spec.get("top_p", 0.95), threshold=spec.get("threshold", 0.5),
        fallback=spec.get("fallback", "last"))


MIXED = [  # (spec, prompt length); several prompts exceed the 64-token step budget
    ({"method": "mara"}, 5),
    ({"method": "dera", "lambda": 0.5}, 40),
    ({"method": "mara", "fallback": "first", "top_k": 5}, 12),
    ({"method": "mara", "agent": "eager", "top_p": 0.8}, 70),
    ({"method": "none"}, 3),
    ({"method": "mara", "top_k": 3, "fallback": "first", "threshold": 0.3}, 20),
    ({"method": "aad", "alpha": 0.1}, 90),
    ({"method": "mara", "agent": "eager", "top_k": 1}, 8),
    ({"method": "mara", "top_p": 1.0, "top_k": 1000}, 33),
    ({"method": "mara", "agent": "eager", "fallback": "first"}, 130),
]


def test_mara_conformance_in_one_mixed_batch(mara_llm, hf_models, agents):
    """MARA rows equal the one-forward-per-candidate HF decoder; the others their rules.

    Ten requests, four at a time, joining and leaving at different steps,
    chunked prefills and a shared cached prefix.
    """
    rng = random.Random(5)
    prefix = [rng.randrange(10, 1000) for _ in range(40)]
    prompts = [(prefix if n > 64 else []) + [rng.randrange(10, 1000) for _ in range(n)]
               for _, n in MIXED]
    max_tokens = [MAX_TOKENS + 3 * (i % 3) for i in range(len(MIXED))]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True,
                             extra_args={"align": spec}) for (spec, _), m in zip(MIXED, max_tokens)]
    outputs = _generate(mara_llm, prompts, params)

    aligned, _ = hf_models
    first_rates = []
    for prompt, (spec, _), m, out in zip(prompts, MIXED, max_tokens, outputs):
        got = list(out.outputs[0].token_ids)
        if spec["method"] != "mara":
            assert got == hf_reference.generate(*hf_models, prompt, spec, m, ignore_eos=True)
            assert mara_stats(out.outputs[0]) is None
            continue
        agent = agents[spec.get("agent", "default")][0]
        steps = _mara_reference(aligned, agent, prompt, spec, m)
        assert got == hf_mara_reference.tokens(steps), (spec, [s.margin for s in steps])
        stats = mara_stats(out.outputs[0])
        assert stats.positions == tuple(s.chosen_index for s in steps)
        assert stats.evaluated == tuple(len(s.accept_probs) for s in steps)
        first_rates.append(stats.first_rate)
    # The mix exercised both first-candidate accepts and deeper walks.
    assert max(first_rates) > 0.5 and min(first_rates) < 0.5


def _preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_mara_survives_preemption(mara_llm, hf_models, agents):
    """Sequences that outgrow the 12-block KV cache are preempted and recomputed mid-walk."""
    rng = random.Random(7)
    prompts = [[rng.randrange(10, 1000) for _ in range(60)] for _ in range(4)]
    specs = [{"method": "mara"}, {"method": "mara", "fallback": "first", "top_k": 4},
             {"method": "mara", "agent": "eager"}, {"method": "mara", "top_p": 0.7}]
    before = _preemptions(mara_llm)
    outputs = _generate(mara_llm, prompts, [SamplingParams(
        max_tokens=70, temperature=0, ignore_eos=True, extra_args={"align": s}) for s in specs])
    assert _preemptions(mara_llm) > before, "4 x 130 tokens should not fit in 12 x 32 slots"
    aligned, _ = hf_models
    for prompt, spec, out in zip(prompts, specs, outputs):
        steps = _mara_reference(aligned, agents[spec.get("agent", "default")][0], prompt, spec, 70)
        assert list(out.outputs[0].token_ids) == hf_mara_reference.tokens(steps), spec


def test_sampled_decisions(mara_llm, hf_models, agents):
    """Sampled decisions accept with probability P(accept).

    An agent that is sure to accept emits the LLM's greedy tokens; one sure to
    reject walks to the last candidate ("last") every time, as greedy
    decisions would; an unsure one emits only candidates of its top-k.
    """
    rng = random.Random(6)
    prompts = [[rng.randrange(10, 1000) for _ in range(9)] for _ in range(3)]
    specs = [{"method": "mara", "agent": "always", "decisions": "sampled"},
             {"method": "mara", "agent": "never", "decisions": "sampled", "top_k": 6},
             {"method": "mara", "decisions": "sampled", "top_k": 4}]
    # Seeded and at temperature 1 (both irrelevant to MARA's choice; a seeded
    # row that emits nothing in a step must not disturb vLLM's generators).
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i, ignore_eos=True,
                             extra_args={"align": s}) for i, s in enumerate(specs)]
    outputs = _generate(mara_llm, prompts, params)
    aligned, _ = hf_models
    greedy = hf_reference.generate(aligned, None, prompts[0], {"method": "none"}, MAX_TOKENS,
                                   ignore_eos=True)
    assert list(outputs[0].outputs[0].token_ids) == greedy
    last = _mara_reference(aligned, agents["never"][0], prompts[1], specs[1], MAX_TOKENS)
    assert list(outputs[1].outputs[0].token_ids) == hf_mara_reference.tokens(last)
    assert all(s.chosen_index == len(s.candidates) - 1 for s in last)
    ids = list(prompts[2])
    for token in outputs[2].outputs[0].token_ids:
        cands, _ = hf_mara_reference.candidates(
            hf_reference.next_token_logits(aligned, ids), 4, 0.95)
        assert token in cands
        ids.append(token)


def test_seeded_sampled_decisions_do_not_depend_on_the_batch(mara_llm):
    """A seeded MARA request with sampled decisions gives the same tokens alone and in two
    different mixes (its prompt is prefilled in chunks); its decisions follow its seed."""
    rng = random.Random(8)
    prompt = [rng.randrange(10, 1000) for _ in range(90)]
    others = [[rng.randrange(10, 1000) for _ in range(n)] for n in (30, 7, 75, 12)]

    def seeded(seed):
        return SamplingParams(max_tokens=2 * MAX_TOKENS, temperature=1.0, seed=seed,
                              ignore_eos=True, extra_args={"align": {
                                  "method": "mara", "decisions": "sampled", "top_k": 8}})

    def noise(spec, **kw):
        return SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, extra_args={"align": spec},
                              **{"temperature": 1.0, **kw})

    alone = _generate(mara_llm, [prompt], seeded(42))[0].outputs[0].token_ids
    mix_a = _generate(mara_llm, [others[0], prompt, others[1]], [
        noise({"method": "mara", "decisions": "sampled"}), seeded(42),
        noise({"method": "dera", "lambda": 0.5}, seed=3)])
    mix_b = _generate(mara_llm, [others[2], others[3], prompt, others[0]], [
        noise({"method": "mara", "decisions": "sampled", "agent": "eager"}, seed=7),
        noise({"method": "none"}), seeded(42), noise({"method": "mara", "top_k": 3})])
    assert mix_a[1].outputs[0].token_ids == alone
    assert mix_b[2].outputs[0].token_ids == alone
    assert _generate(mara_llm, [prompt], seeded(43))[0].outputs[0].token_ids != alone


@pytest.mark.parametrize("spec, extra, message", [
    ({"method": "mara", "agent": "nope"}, {}, "unknown MARA agent 'nope'"),
    ({"method": "mara", "top_k": 0}, {}, "'top_k' must be an integer >= 1"),
    ({"method": "mara", "top_p": 1.5}, {}, "'top_p' must be in (0, 1]"),
    ({"method": "mara"}, {"logprobs": 2}, "does not support logprobs"),
    ({"method": "mara"}, {"repetition_penalty": 1.2}, "repetition_penalty"),
])
def test_bad_mara_requests_refused_alone(mara_llm, spec, extra, message):
    good = SamplingParams(max_tokens=3, temperature=0, extra_args={"align": {"method": "mara"}})
    with pytest.raises(ValueError) as err:
        _generate(mara_llm, [[11, 12, 13]] * 2, [good, SamplingParams(
            max_tokens=3, temperature=0, extra_args={"align": spec}, **extra)])
    assert message in str(err.value)
    assert len(_generate(mara_llm, [[11, 12, 13]], good)[0].outputs[0].token_ids) == 3

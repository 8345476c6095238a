"""One small-cache pair engine with MARA agents: every row of a mixed batch equals its plain
decoder, and the reference model runs only for rows that read it.

The engine (aligned + reference model, five agents) serves every test here with 4 sequences
at a time, a 64-token step budget (long prompts are prefilled in chunks), prefix caching on
32-token blocks and a KV cache of only 12 blocks, so that sequences are preempted and
recomputed, MARA rows mid-walk. The decoders: ``hf_reference`` (DeRa, AAD, none) and
``hf_mara_reference`` (one full HF forward per candidate, batch size 1). The reference
model's work is read from the pair model's token counters in the worker.
"""

import random

import pytest
from vllm import LLM, SamplingParams, TokensPrompt

import hf_mara_reference
import hf_reference
from vllm_align.engine.mara_stats import mara_stats
from vllm_align.mara.agent import save_agent
from vllm_align.toy.models import random_agent

MAX_NUM_SEQS, STEP_BUDGET, NUM_BLOCKS, BLOCK = 4, 64, 12, 32
MAX_TOKENS = 12
# The agent of the rows that check the reference's work (its MARA rows stand beside them).
MILD = {"method": "mara", "agent": "mild"}


@pytest.fixture(scope="module")
def agents(tiny_pair, tmp_path_factory):
    """{name: (agent, path)}: three agents with state-dependent decisions, and two sure ones."""
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(tiny_pair[0]).hidden_size
    out = tmp_path_factory.mktemp("agents")
    made = {"default": random_agent(hidden, seed=1),
            "eager": random_agent(hidden, seed=2, accept_bias=2.0),
            "mild": random_agent(hidden, seed=2, accept_bias=1.0),
            "always": random_agent(hidden, seed=3, accept_bias=100.0),
            "never": random_agent(hidden, seed=4, accept_bias=-100.0)}
    return {name: (agent, str(save_agent(agent, out / f"{name}.safetensors")))
            for name, agent in made.items()}


@pytest.fixture(scope="module")
def llm(tiny_pair, agents):
    aligned, reference = tiny_pair
    engine = LLM(model=aligned, additional_config={"align": {
        "reference_model": reference,
        "mara_agents": {name: path for name, (_, path) in agents.items()}}},
        dtype="float32", max_model_len=256, max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=STEP_BUDGET, enable_prefix_caching=True, block_size=BLOCK,
        num_gpu_blocks_override=NUM_BLOCKS, seed=0, disable_log_stats=False, enforce_eager=True)
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf_models(tiny_pair):
    return hf_reference.load_pair(*tiny_pair)


def _ids(rng, n):
    return [rng.randrange(10, 1000) for _ in range(n)]


def _generate(llm, prompts, params):
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)


def _params(spec, max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args={"align": spec},
                          **{"temperature": 0, **kw})


def _preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def _reference_tokens(llm) -> int:
    return llm.collective_rpc(lambda w: w.model_runner.get_model().reference_tokens)[0]


def _mara_reference(model, agents, prompt, spec, max_tokens):
    """The HF decoder's steps for a MARA ``spec`` (its defaults as the engine's)."""
    return hf_mara_reference.mara_greedy_decode(
        model, agents[spec.get("agent", "default")][0], prompt, max_new_tokens=max_tokens,
        top_k=spec.get("top_k", 40), top_p=spec.get("top_p", 0.95),
        threshold=spec.get("threshold", 0.5), fallback=spec.get("fallback", "last"))


def _expected(hf_models, agents, prompt, spec, max_tokens):
    if spec["method"] == "mara":
        return hf_mara_reference.tokens(
            _mara_reference(hf_models[0], agents, prompt, spec, max_tokens))
    return hf_reference.generate(*hf_models, prompt, spec, max_tokens, ignore_eos=True)


def _check(hf_models, agents, prompts, specs, outputs, max_tokens):
    for prompt, spec, m, out in zip(prompts, specs, max_tokens, outputs):
        for completion in out.outputs:
            assert list(completion.token_ids) == _expected(hf_models, agents, prompt, spec, m), \
                spec


# -- MARA rows ---------------------------------------------------------------

MARA_MIXED = [  # (spec, prompt length); several prompts exceed the 64-token step budget
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


def test_mara_conformance_in_one_mixed_batch(llm, hf_models, agents):
    """MARA rows equal the one-forward-per-candidate HF decoder; the others their rules.

    Ten requests, four at a time, joining and leaving at different steps,
    chunked prefills and a shared cached prefix.
    """
    rng = random.Random(5)
    prefix = _ids(rng, 40)
    prompts = [(prefix if n > 64 else []) + _ids(rng, n)
               for _, n in MARA_MIXED]
    max_tokens = [MAX_TOKENS + 3 * (i % 3) for i in range(len(MARA_MIXED))]
    outputs = _generate(llm, prompts, [_params(spec, m)
                                       for (spec, _), m in zip(MARA_MIXED, max_tokens)])

    aligned, _ = hf_models
    first_rates = []
    for prompt, (spec, _), m, out in zip(prompts, MARA_MIXED, max_tokens, outputs):
        got = list(out.outputs[0].token_ids)
        if spec["method"] != "mara":
            assert got == hf_reference.generate(*hf_models, prompt, spec, m, ignore_eos=True)
            assert mara_stats(out.outputs[0]) is None
            continue
        steps = _mara_reference(aligned, agents, prompt, spec, m)
        assert got == hf_mara_reference.tokens(steps), (spec, [s.margin for s in steps])
        stats = mara_stats(out.outputs[0])
        assert stats.positions == tuple(s.chosen_index for s in steps)
        assert stats.evaluated == tuple(len(s.accept_probs) for s in steps)
        first_rates.append(stats.first_rate)
    # The mix exercised both first-candidate accepts and deeper walks.
    assert max(first_rates) > 0.5 and min(first_rates) < 0.5


def test_mara_survives_preemption(llm, hf_models, agents):
    """Sequences that outgrow the 12-block KV cache are preempted and recomputed mid-walk."""
    rng = random.Random(7)
    prompts = [_ids(rng, 60) for _ in range(4)]
    specs = [{"method": "mara"}, {"method": "mara", "fallback": "first", "top_k": 4},
             {"method": "mara", "agent": "eager"}, {"method": "mara", "top_p": 0.7}]
    before = _preemptions(llm)
    outputs = _generate(llm, prompts, [_params(s, 70) for s in specs])
    assert _preemptions(llm) > before, "4 x 130 tokens should not fit in 12 x 32 slots"
    aligned, _ = hf_models
    for prompt, spec, out in zip(prompts, specs, outputs):
        steps = _mara_reference(aligned, agents, prompt, spec, 70)
        assert list(out.outputs[0].token_ids) == hf_mara_reference.tokens(steps), spec


def test_sampled_decisions(llm, hf_models, agents):
    """Sampled decisions accept with probability P(accept).

    An agent that is sure to accept emits the LLM's greedy tokens; one sure to
    reject walks to the last candidate ("last") every time, as greedy
    decisions would; an unsure one emits only candidates of its top-k.
    """
    rng = random.Random(6)
    prompts = [_ids(rng, 9) for _ in range(3)]
    specs = [{"method": "mara", "agent": "always", "decisions": "sampled"},
             {"method": "mara", "agent": "never", "decisions": "sampled", "top_k": 6},
             {"method": "mara", "decisions": "sampled", "top_k": 4}]
    # Seeded and at temperature 1 (both irrelevant to MARA's choice; a seeded
    # row that emits nothing in a step must not disturb vLLM's generators).
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i, ignore_eos=True,
                             extra_args={"align": s}) for i, s in enumerate(specs)]
    outputs = _generate(llm, prompts, params)
    aligned, _ = hf_models
    greedy = hf_reference.generate(aligned, None, prompts[0], {"method": "none"}, MAX_TOKENS,
                                   ignore_eos=True)
    assert list(outputs[0].outputs[0].token_ids) == greedy
    last = _mara_reference(aligned, agents, prompts[1], specs[1], MAX_TOKENS)
    assert list(outputs[1].outputs[0].token_ids) == hf_mara_reference.tokens(last)
    assert all(s.chosen_index == len(s.candidates) - 1 for s in last)
    ids = list(prompts[2])
    for token in outputs[2].outputs[0].token_ids:
        cands, _ = hf_mara_reference.candidates(
            hf_reference.next_token_logits(aligned, ids), 4, 0.95)
        assert token in cands
        ids.append(token)


def test_seeded_sampled_decisions_do_not_depend_on_the_batch(llm):
    """A seeded MARA request with sampled decisions gives the same tokens alone and in two
    different mixes (its prompt is prefilled in chunks); its decisions follow its seed."""
    rng = random.Random(8)
    prompt = _ids(rng, 90)
    others = [_ids(rng, n) for n in (30, 7, 75, 12)]

    def seeded(seed):
        return SamplingParams(max_tokens=2 * MAX_TOKENS, temperature=1.0, seed=seed,
                              ignore_eos=True, extra_args={"align": {
                                  "method": "mara", "decisions": "sampled", "top_k": 8}})

    def noise(spec, **kw):
        return SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, extra_args={"align": spec},
                              **{"temperature": 1.0, **kw})

    alone = _generate(llm, [prompt], seeded(42))[0].outputs[0].token_ids
    mix_a = _generate(llm, [others[0], prompt, others[1]], [
        noise({"method": "mara", "decisions": "sampled"}), seeded(42),
        noise({"method": "dera", "lambda": 0.5}, seed=3)])
    mix_b = _generate(llm, [others[2], others[3], prompt, others[0]], [
        noise({"method": "mara", "decisions": "sampled", "agent": "eager"}, seed=7),
        noise({"method": "none"}), seeded(42), noise({"method": "mara", "top_k": 3})])
    assert mix_a[1].outputs[0].token_ids == alone
    assert mix_b[2].outputs[0].token_ids == alone
    assert _generate(llm, [prompt], seeded(43))[0].outputs[0].token_ids != alone


@pytest.mark.parametrize("spec, extra, message", [
    ({"method": "mara", "agent": "nope"}, {}, "unknown MARA agent 'nope'"),
    ({"method": "mara", "top_k": 0}, {}, "'top_k' must be an integer >= 1"),
    ({"method": "mara", "top_p": 1.5}, {}, "'top_p' must be in (0, 1]"),
    ({"method": "mara"}, {"logprobs": 2}, "does not support logprobs"),
    ({"method": "mara"}, {"repetition_penalty": 1.2}, "repetition_penalty"),
])
def test_bad_mara_requests_refused_alone(llm, spec, extra, message):
    good = SamplingParams(max_tokens=3, temperature=0, extra_args={"align": {"method": "mara"}})
    with pytest.raises(ValueError) as err:
        _generate(llm, [[11, 12, 13]] * 2, [good, SamplingParams(
            max_tokens=3, temperature=0, extra_args={"align": spec}, **extra)])
    assert message in str(err.value)
    assert len(_generate(llm, [[11, 12, 13]], good)[0].outputs[0].token_ids) == 3


# -- the reference runs only where read -------------------------------------

REFERENCE_MIXED = [  # (spec, prompt length, max tokens): rows join and leave at different steps
    ({"method": "none"}, 90, 6),
    ({"method": "dera", "lambda": 0.0}, 20, 14),
    (MILD, 70, 9),
    ({"method": "aad", "alpha": 0.1}, 75, 5),
    ({"method": "none"}, 8, 16),
    ({"method": "dera", "lambda": 1.5}, 3, 7),
    (MILD, 12, 12),
    ({"method": "aad", "alpha": 0.3, "entropy_threshold": 1.0}, 100, 10),
]


def test_mixed_rows_pay_the_reference_only_where_read(llm, hf_models, agents):
    """Every row equals its decoder, and the reference ran over exactly the DeRa/AAD
    rows' tokens: their prompts (chunked where long) and every generated token but the last."""
    rng = random.Random(11)
    prompts = [_ids(rng, n) for _, n, _ in REFERENCE_MIXED]
    specs = [s for s, _, _ in REFERENCE_MIXED]
    max_tokens = [m for _, _, m in REFERENCE_MIXED]
    before, preempted = _reference_tokens(llm), _preemptions(llm)
    outputs = _generate(llm, prompts, [_params(s, m) for s, m in zip(specs, max_tokens)])
    assert _preemptions(llm) == preempted, "the count below assumes no recomputation"
    _check(hf_models, agents, prompts, specs, outputs, max_tokens)
    reads = [s["method"] in ("dera", "aad") for s in specs]
    expected = sum(len(p) - o.num_cached_tokens + m - 1
                   for p, m, o, r in zip(prompts, max_tokens, outputs, reads) if r)
    assert _reference_tokens(llm) - before == expected

    before = _reference_tokens(llm)
    _generate(llm, prompts[:3], [_params(s, 4) for s in
                                 ({"method": "none"}, MILD, {"method": "none"})])
    assert _reference_tokens(llm) == before, "no row read the reference"


def test_prefix_cache_never_crosses_between_rows_that_read_the_reference_and_others(
        llm, hf_models, agents):
    """A prefix cached without reference KV is not reused by a DeRa/AAD row (it recomputes
    it), but is by another row that skips the reference; and the reverse."""
    rng = random.Random(12)
    for first, same, other in (
            ({"method": "none"}, MILD, {"method": "dera", "lambda": 0.0}),
            ({"method": "aad", "alpha": 0.1}, {"method": "dera", "lambda": 0.0},
             {"method": "none"})):
        prefix = _ids(rng, 3 * BLOCK)
        prompts = [prefix + _ids(rng, 5) for _ in range(3)]
        specs = [first, same, other]
        outputs = [_generate(llm, [p], _params(s, 6))[0] for p, s in zip(prompts, specs)]
        _check(hf_models, agents, prompts, specs, outputs, [6] * 3)
        assert outputs[1].num_cached_tokens >= 2 * BLOCK, "same kind: the prefix is reused"
        assert outputs[2].num_cached_tokens == 0, "other kind: the prefix is recomputed"


def test_preemption_n_and_prompt_logprobs_in_a_mixed_batch(llm, hf_models, agents):
    """Rows outgrowing the 12-block cache are preempted and recomputed; n = 2 and prompt
    logprobs rows sit beside them. Every completion equals its decoder."""
    rng = random.Random(13)
    specs = [{"method": "dera", "lambda": 0.5}, {"method": "none"},
             {"method": "aad", "alpha": 0.1}, MILD]
    prompts = [_ids(rng, 60) for _ in specs]
    before = _preemptions(llm)
    asks = [s["method"] != "mara" for s in specs]  # prompt logprobs of the rule, preempted too
    outputs = _generate(llm, prompts, [_params(s, 70, **({"prompt_logprobs": 2} if a else {}))
                                       for s, a in zip(specs, asks)])
    assert _preemptions(llm) > before, "4 x 130 tokens should not fit in 12 x 32 slots"
    _check(hf_models, agents, prompts, specs, outputs, [70] * 4)
    for prompt, spec, out, a in zip(prompts, specs, outputs, asks):
        if a:
            hf_reference.check_prompt_logprobs(hf_reference.prompt_log_probs(
                *hf_models, prompt, spec), _prompt_logprobs(out))

    specs = [{"method": "dera", "lambda": 0.0}, {"method": "none"}, {"method": "aad", "alpha": 0.2}]
    prompts = [_ids(rng, n) for n in (15, 40, 9)]
    # n = 2 needs sampling; top-k 1 samples the greedy token.
    params = [_params(specs[0], 8, n=2, temperature=1.0, top_k=1),
              _params(specs[1], 8, prompt_logprobs=1), _params(specs[2], 8, prompt_logprobs=1)]
    outputs = _generate(llm, prompts, params)
    assert len(outputs[0].outputs) == 2
    assert len(outputs[1].prompt_logprobs) == len(prompts[1])
    _check(hf_models, agents, prompts, specs, outputs, [8] * 3)
    for i in (1, 2):
        hf_reference.check_prompt_logprobs(hf_reference.prompt_log_probs(
            *hf_models, prompts[i], specs[i]), _prompt_logprobs(outputs[i]))


def _prompt_logprobs(output) -> list:
    """An output's prompt logprobs as ``[None, {token_id: logprob}, ...]``."""
    return [None if p is None else {t: lp.logprob for t, lp in p.items()}
            for p in output.prompt_logprobs]


PROMPT_RULES = [  # (spec, prompt length): long prompts are prefilled in chunks of <= 64
    ({"method": "dera", "lambda": 0.0}, 70),
    ({"method": "dera", "lambda": 0.5}, 20),
    ({"method": "dera", "lambda": 2.0}, 90),
    ({"method": "aad", "alpha": 0.1}, 66),
    ({"method": "aad", "alpha": 0.3, "entropy_threshold": 1.0}, 30),
    ({"method": "none"}, 40),
    ({"method": "dera", "lambda": 1.0}, 40),  # the same prompt as the row before
]


def test_prompt_logprobs_follow_each_rows_rule(llm, hf_models, agents):
    """One batch: DeRa (lambda 0, 0.5, 1, 2), AAD and none rows asking for prompt logprobs
    (chunked prompts among them, one with n = 2), MARA and DeRa rows that do not. Every
    returned prompt logprob equals the rule's distribution by plain HF forwards of both
    models; lambda = 1 gives the aligned model's, lambda = 0 the reference's."""
    rng = random.Random(14)
    prompts = [_ids(rng, n) for _, n in PROMPT_RULES]
    prompts[-1] = prompts[-2]
    specs = [s for s, _ in PROMPT_RULES]
    params = [_params(s, 3, prompt_logprobs=5) for s in specs]
    params[1] = _params(specs[1], 3, prompt_logprobs=5, n=2, temperature=1.0, top_k=1)
    others = [(MILD, _ids(rng, 50)), ({"method": "dera", "lambda": 0.5}, _ids(rng, 30))]
    scored = lambda: llm.collective_rpc(
        lambda w: w.model_runner.get_model().reference_prompt_positions)[0]
    before = scored()
    outputs = _generate(llm, prompts + [p for _, p in others],
                        params + [_params(s, 3) for s, _ in others])
    # The reference's LM head scored the prompt positions of DeRa/AAD rows asking for prompt
    # logprobs (n = 2: each sequence asks), and nothing else.
    assert scored() - before == sum((len(p) - 1) * sp.n for p, s, sp in zip(prompts, specs, params)
                                    if s["method"] != "none")
    _check(hf_models, agents, prompts + [p for _, p in others], specs + [s for s, _ in others],
           outputs, [3] * len(outputs))
    returned = [_prompt_logprobs(o) for o in outputs[:len(specs)]]
    for prompt, spec, got in zip(prompts, specs, returned):
        assert hf_reference.check_prompt_logprobs(
            hf_reference.prompt_log_probs(*hf_models, prompt, spec), got) >= len(prompt) - 1
    assert all(o.prompt_logprobs is None for o in outputs[len(specs):])
    # lambda = 1 is the aligned model, lambda = 0 the reference model alone.
    for i, (none, one) in enumerate(zip(returned[-2][1:], returned[-1][1:])):
        assert none.keys() == one.keys() and all(abs(none[t] - one[t]) < 1e-5 for t in none), i
    assert hf_reference.check_prompt_logprobs(hf_reference.prompt_log_probs(
        hf_models[1], None, prompts[0], {"method": "none"}), returned[0]) > 0


def test_prompt_logprobs_recompute_a_cached_prefix(llm, hf_models, agents):
    """A prompt whose prefix is cached (by a DeRa row, which also reads the reference) is
    recomputed when it asks for prompt logprobs, even if it says not to skip the cache."""
    rng = random.Random(15)
    prefix = _ids(rng, 3 * BLOCK)
    spec = {"method": "dera", "lambda": 2.0}
    first = _generate(llm, [prefix + _ids(rng, 4)], _params(spec, 2))[0]
    prompts = [prefix + _ids(rng, 5) for _ in range(3)]
    outputs = [_generate(llm, [p], _params(spec, 2, **kw))[0] for p, kw in zip(prompts, (
        {}, {"prompt_logprobs": 2}, {"prompt_logprobs": 2, "skip_reading_prefix_cache": False}))]
    assert outputs[0].num_cached_tokens >= 2 * BLOCK, "without prompt logprobs it is reused"
    for prompt, out in zip(prompts[1:], outputs[1:]):
        assert out.num_cached_tokens == 0
        hf_reference.check_prompt_logprobs(
            hf_reference.prompt_log_probs(*hf_models, prompt, spec), _prompt_logprobs(out))
    _check(hf_models, agents, prompts, [spec] * 3, outputs, [2] * 3)
    assert first.outputs[0].token_ids


def test_mara_refuses_prompt_logprobs_and_says_why(llm):
    with pytest.raises(ValueError, match="prompt_logprobs: its rule is a walk"):
        _generate(llm, [[11, 12, 13]], _params(MILD, 2, prompt_logprobs=1))

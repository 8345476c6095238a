"""The reference model runs only for rows that read it, and never reads KV it did not write.

One eager pair engine with a MARA agent: 4 sequences at a time, a 64-token step budget
(long prompts are prefilled in chunks), prefix caching on 32-token blocks and a KV cache
of 12 blocks (sequences are preempted). Every row is compared with its plain decoder
(``hf_reference``, ``hf_mara_reference``); the reference model's work is read from the
pair model's token counter in the worker.
"""

import random

import pytest
from vllm import LLM, SamplingParams, TokensPrompt

import hf_mara_reference
import hf_reference
from vllm_align.mara.agent import save_agent
from vllm_align.toy.models import random_agent

NUM_BLOCKS, BLOCK = 12, 32


@pytest.fixture(scope="module")
def agent(tiny_pair, tmp_path_factory):
    from transformers import AutoConfig

    made = random_agent(AutoConfig.from_pretrained(tiny_pair[0]).hidden_size, seed=2,
                        accept_bias=1.0)
    return made, str(save_agent(made, tmp_path_factory.mktemp("agent") / "a.safetensors"))


@pytest.fixture(scope="module")
def llm(tiny_pair, agent):
    aligned, reference = tiny_pair
    engine = LLM(model=aligned, additional_config={"align": {
        "reference_model": reference, "mara_agents": {"default": agent[1]}}},
        dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
        enable_prefix_caching=True, block_size=BLOCK, num_gpu_blocks_override=NUM_BLOCKS,
        seed=0, disable_log_stats=False, enforce_eager=True)
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf_pair(tiny_pair):
    return hf_reference.load_pair(*tiny_pair)


def _ids(rng, n):
    return [rng.randrange(10, 1000) for _ in range(n)]


def _generate(llm, prompts, params):
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)


def _params(spec, max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args={"align": spec},
                          **{"temperature": 0, **kw})


def _reference_tokens(llm) -> int:
    return llm.collective_rpc(lambda w: w.model_runner.get_model().reference_tokens)[0]


def _preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def _expected(hf_pair, agent, prompt, spec, max_tokens):
    if spec["method"] == "mara":
        return hf_mara_reference.tokens(hf_mara_reference.mara_greedy_decode(
            hf_pair[0], agent, prompt, max_new_tokens=max_tokens, top_k=40, top_p=0.95,
            threshold=0.5, fallback="last"))
    return hf_reference.generate(*hf_pair, prompt, spec, max_tokens, ignore_eos=True)


def _check(hf_pair, agent, prompts, specs, outputs, max_tokens):
    for prompt, spec, m, out in zip(prompts, specs, max_tokens, outputs):
        for completion in out.outputs:
            assert list(completion.token_ids) == _expected(hf_pair, agent[0], prompt, spec, m), spec


MIXED = [  # (spec, prompt length, max tokens): rows join and leave at different steps
    ({"method": "none"}, 90, 6),
    ({"method": "dera", "lambda": 0.0}, 20, 14),
    ({"method": "mara"}, 70, 9),
    ({"method": "aad", "alpha": 0.1}, 75, 5),
    ({"method": "none"}, 8, 16),
    ({"method": "dera", "lambda": 1.5}, 3, 7),
    ({"method": "mara"}, 12, 12),
    ({"method": "aad", "alpha": 0.3, "entropy_threshold": 1.0}, 100, 10),
]


def test_mixed_rows_pay_the_reference_only_where_read(llm, hf_pair, agent):
    """Every row equals its decoder, and the reference ran over exactly the DeRa/AAD
    rows' tokens: their prompts (chunked where long) and every generated token but the last."""
    rng = random.Random(11)
    prompts = [_ids(rng, n) for _, n, _ in MIXED]
    specs = [s for s, _, _ in MIXED]
    max_tokens = [m for _, _, m in MIXED]
    before, preempted = _reference_tokens(llm), _preemptions(llm)
    outputs = _generate(llm, prompts, [_params(s, m) for s, m in zip(specs, max_tokens)])
    assert _preemptions(llm) == preempted, "the count below assumes no recomputation"
    _check(hf_pair, agent, prompts, specs, outputs, max_tokens)
    reads = [s["method"] in ("dera", "aad") for s in specs]
    expected = sum(len(p) - o.num_cached_tokens + m - 1
                   for p, m, o, r in zip(prompts, max_tokens, outputs, reads) if r)
    assert _reference_tokens(llm) - before == expected

    before = _reference_tokens(llm)
    _generate(llm, prompts[:3], [_params(s, 4) for s in
                                 ({"method": "none"}, {"method": "mara"}, {"method": "none"})])
    assert _reference_tokens(llm) == before, "no row read the reference"


def test_prefix_cache_never_crosses_between_rows_that_read_the_reference_and_others(
        llm, hf_pair, agent):
    """A prefix cached without reference KV is not reused by a DeRa/AAD row (it recomputes
    it), but is by another row that skips the reference; and the reverse."""
    rng = random.Random(12)
    for first, same, other in (
            ({"method": "none"}, {"method": "mara"}, {"method": "dera", "lambda": 0.0}),
            ({"method": "aad", "alpha": 0.1}, {"method": "dera", "lambda": 0.0},
             {"method": "none"})):
        prefix = _ids(rng, 3 * BLOCK)
        prompts = [prefix + _ids(rng, 5) for _ in range(3)]
        specs = [first, same, other]
        outputs = [_generate(llm, [p], _params(s, 6))[0] for p, s in zip(prompts, specs)]
        _check(hf_pair, agent, prompts, specs, outputs, [6] * 3)
        assert outputs[1].num_cached_tokens >= 2 * BLOCK, "same kind: the prefix is reused"
        assert outputs[2].num_cached_tokens == 0, "other kind: the prefix is recomputed"


def test_preemption_n_and_prompt_logprobs_in_a_mixed_batch(llm, hf_pair, agent):
    """Rows outgrowing the 12-block cache are preempted and recomputed; n = 2 and prompt
    logprobs rows sit beside them. Every completion equals its decoder."""
    rng = random.Random(13)
    specs = [{"method": "dera", "lambda": 0.5}, {"method": "none"},
             {"method": "aad", "alpha": 0.1}, {"method": "mara"}]
    prompts = [_ids(rng, 60) for _ in specs]
    before = _preemptions(llm)
    asks = [s["method"] != "mara" for s in specs]  # prompt logprobs of the rule, preempted too
    outputs = _generate(llm, prompts, [_params(s, 70, **({"prompt_logprobs": 2} if a else {}))
                                       for s, a in zip(specs, asks)])
    assert _preemptions(llm) > before, "4 x 130 tokens should not fit in 12 x 32 slots"
    _check(hf_pair, agent, prompts, specs, outputs, [70] * 4)
    for prompt, spec, out, a in zip(prompts, specs, outputs, asks):
        if a:
            hf_reference.check_prompt_logprobs(hf_reference.prompt_log_probs(
                *hf_pair, prompt, spec), _prompt_logprobs(out))

    specs = [{"method": "dera", "lambda": 0.0}, {"method": "none"}, {"method": "aad", "alpha": 0.2}]
    prompts = [_ids(rng, n) for n in (15, 40, 9)]
    # n = 2 needs sampling; top-k 1 samples the greedy token.
    params = [_params(specs[0], 8, n=2, temperature=1.0, top_k=1), _params(specs[1], 8, prompt_logprobs=1),
              _params(specs[2], 8, prompt_logprobs=1)]
    outputs = _generate(llm, prompts, params)
    assert len(outputs[0].outputs) == 2
    assert len(outputs[1].prompt_logprobs) == len(prompts[1])
    _check(hf_pair, agent, prompts, specs, outputs, [8] * 3)
    for i in (1, 2):
        hf_reference.check_prompt_logprobs(hf_reference.prompt_log_probs(
            *hf_pair, prompts[i], specs[i]), _prompt_logprobs(outputs[i]))


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


def test_prompt_logprobs_follow_each_rows_rule(llm, hf_pair, agent):
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
    others = [({"method": "mara"}, _ids(rng, 50)), ({"method": "dera", "lambda": 0.5}, _ids(rng, 30))]
    scored = lambda: llm.collective_rpc(
        lambda w: w.model_runner.get_model().reference_prompt_positions)[0]
    before = scored()
    outputs = _generate(llm, prompts + [p for _, p in others],
                        params + [_params(s, 3) for s, _ in others])
    # The reference's LM head scored the prompt positions of DeRa/AAD rows asking for prompt
    # logprobs (n = 2: each sequence asks), and nothing else.
    assert scored() - before == sum((len(p) - 1) * sp.n for p, s, sp in zip(prompts, specs, params)
                                    if s["method"] != "none")
    _check(hf_pair, agent, prompts + [p for _, p in others], specs + [s for s, _ in others],
           outputs, [3] * len(outputs))
    returned = [_prompt_logprobs(o) for o in outputs[:len(specs)]]
    for prompt, spec, got in zip(prompts, specs, returned):
        assert hf_reference.check_prompt_logprobs(
            hf_reference.prompt_log_probs(*hf_pair, prompt, spec), got) >= len(prompt) - 1
    assert all(o.prompt_logprobs is None for o in outputs[len(specs):])
    # lambda = 1 is the aligned model, lambda = 0 the reference model alone.
    for i, (none, one) in enumerate(zip(returned[-2][1:], returned[-1][1:])):
        assert none.keys() == one.keys() and all(abs(none[t] - one[t]) < 1e-5 for t in none), i
    assert hf_reference.check_prompt_logprobs(hf_reference.prompt_log_probs(
        hf_pair[1], None, prompts[0], {"method": "none"}), returned[0]) > 0


def test_prompt_logprobs_recompute_a_cached_prefix(llm, hf_pair, agent):
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
            hf_reference.prompt_log_probs(*hf_pair, prompt, spec), _prompt_logprobs(out))
    _check(hf_pair, agent, prompts, [spec] * 3, outputs, [2] * 3)
    assert first.outputs[0].token_ids


def test_mara_refuses_prompt_logprobs_and_says_why(llm):
    with pytest.raises(ValueError, match="prompt_logprobs: its rule is a walk"):
        _generate(llm, [[11, 12, 13]], _params({"method": "mara"}, 2, prompt_logprobs=1))

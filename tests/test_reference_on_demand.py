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
from vllm_align.mara.agent import random_agent, save_agent

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
    outputs = _generate(llm, prompts, [_params(s, 70) for s in specs])
    assert _preemptions(llm) > before, "4 x 130 tokens should not fit in 12 x 32 slots"
    _check(hf_pair, agent, prompts, specs, outputs, [70] * 4)

    specs = [{"method": "dera", "lambda": 0.0}, {"method": "none"}, {"method": "aad", "alpha": 0.2}]
    prompts = [_ids(rng, n) for n in (15, 40, 9)]
    # n = 2 needs sampling; top-k 1 samples the greedy token.
    params = [_params(specs[0], 8, n=2, temperature=1.0, top_k=1), _params(specs[1], 8, prompt_logprobs=1),
              _params(specs[2], 8, prompt_logprobs=1)]
    outputs = _generate(llm, prompts, params)
    assert len(outputs[0].outputs) == 2
    assert len(outputs[1].prompt_logprobs) == len(prompts[1])
    _check(hf_pair, agent, prompts, specs, outputs, [8] * 3)

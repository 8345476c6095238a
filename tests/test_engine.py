"""The dual-model engine on tiny local models, checked against plain HF forwards.

One engine serves every test here: both models in one forward, 4 sequences at
a time (so later requests join as earlier ones finish), a 64-token step budget
(so long prompts are prefilled in chunks) and prefix caching on with 32-token blocks.
"""

import math
import random

import pytest
import torch
from vllm import LLM, SamplingParams, TokensPrompt
from vllm.sampling_params import StructuredOutputsParams

import hf_reference

MAX_NUM_SEQS, STEP_BUDGET = 4, 64


@pytest.fixture(scope="module")
def pair_llm(tiny_pair):
    aligned, reference = tiny_pair
    llm = LLM(model=aligned, additional_config={"align": {"reference_model": reference}},
              dtype="float32", max_model_len=512, max_num_seqs=MAX_NUM_SEQS,
              max_num_batched_tokens=STEP_BUDGET, enable_prefix_caching=True, block_size=32,
              seed=0)
    yield llm
    del llm


@pytest.fixture(scope="module")
def hf_pair(tiny_pair):
    return hf_reference.load_pair(*tiny_pair)


def test_engine_with_alignment_runs_v1_with_its_batch_state(pair_llm):
    """The plugin picks vLLM's V1 runner for this engine alone and loads its batch state
    in the workers (a plain engine: test_engine_startup.py)."""
    assert pair_llm.llm_engine.vllm_config.use_v2_model_runner is False
    loaded = pair_llm.collective_rpc(lambda worker: [
        type(p).__name__ for p in worker.model_runner.input_batch.logitsprocs.all])
    assert loaded and all("AlignBatchState" in names for names in loaded)


def test_a_rule_is_parsed_once_where_it_enters(pair_llm):
    """The caller's process parses a request's spec into its canonical form, on the
    request's own copy of the parameters; the workers decode from that form alone."""
    def count_parses(worker, on):
        from vllm_align.config import AlignParams
        if on:
            worker.saved_parse, worker.parses = AlignParams.__dict__["parse"], []
            AlignParams.parse = classmethod(
                lambda cls, spec: worker.parses.append(spec) or worker.saved_parse.__func__(
                    cls, spec))
            return 0
        AlignParams.parse = worker.saved_parse
        return len(worker.parses)

    spec = {"method": "aad", "alpha": 0.2}
    params = SamplingParams(max_tokens=6, temperature=0.0, extra_args={"align": spec})
    request = pair_llm.llm_engine.input_processor.process_inputs(
        "canonical", TokensPrompt(prompt_token_ids=[11, 12, 13]), params, ("generate",))
    assert request.sampling_params.extra_args["align"] == {"method": "aad", "alpha": 0.2}
    assert params.extra_args == {"align": {"method": "aad", "alpha": 0.2}}  # not rewritten
    plain = SamplingParams(max_tokens=6, temperature=0.0)  # no spec: the engine's default
    request = pair_llm.llm_engine.input_processor.process_inputs(
        "default", TokensPrompt(prompt_token_ids=[11, 12, 13]), plain, ("generate",))
    assert request.sampling_params.extra_args == {"align": {"method": "none"}}
    assert plain.extra_args is None

    pair_llm.collective_rpc(count_parses, args=(True,))
    try:
        _generate(pair_llm, [[11, 12, 13], [14, 15]], [params, plain])
    finally:
        parses = pair_llm.collective_rpc(count_parses, args=(False,))
    assert parses == [0] * len(parses)


def _random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 1000) for _ in range(n)]


def _generate(llm, prompts, params):
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    return llm.generate(inputs, params, use_tqdm=False)


def _expected_logprobs(hf_pair, ids: list[int], spec: dict) -> torch.Tensor:
    """log-probabilities [V] the rule assigns after ``ids``, from plain HF forwards."""
    h_a, h_r = (hf_reference.next_token_logits(m, ids).double() for m in hf_pair)
    if spec["method"] == "none":
        return torch.log_softmax(h_a, -1)
    if spec["method"] == "dera":
        lam = spec["lambda"]
        return torch.log_softmax(lam * h_a + (1 - lam) * h_r, -1)
    logp_dpo, logp_sft = torch.log_softmax(h_a, -1), torch.log_softmax(h_r, -1)
    in_v = logp_dpo >= logp_dpo.max() + math.log(spec["alpha"])
    return torch.log_softmax((logp_dpo - logp_sft).masked_fill(~in_v, -math.inf), -1)


def test_reference_logits_row_aligned_with_prefix_cache_and_chunked_prefill(pair_llm, hf_pair):
    """Returned logprobs of DeRa lambda=0 are the reference model's, row by row.

    Prompts of different lengths share a 70-token prefix (two 32-token blocks) that is cached by
    first requests; the long ones exceed the step budget and are chunked. The
    batch mixes methods, so a row mix-up would show as wrong logprobs.
    """
    rng = random.Random(1)
    prefix = _random_ids(rng, 70)
    prompts = [prefix + _random_ids(rng, n) for n in (3, 17, 30, 60, 9, 41)]
    specs = [{"method": "dera", "lambda": 0.0}, {"method": "none"},
             {"method": "dera", "lambda": 0.0}, {"method": "dera", "lambda": 0.5},
             {"method": "aad", "alpha": 0.1}, {"method": "dera", "lambda": 0.0}]
    # One warm-up of each kind: rows that read the reference never share cached blocks
    # with rows that do not (test_mixed_rows.py).
    _generate(pair_llm, [prefix + [5]] * 2, [SamplingParams(
        max_tokens=1, temperature=0, extra_args={"align": {"method": m}}) for m in ("none", "dera")])

    params = [SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=5,
                             extra_args={"align": s}) for s in specs]
    outputs = _generate(pair_llm, prompts, params)
    assert all(o.num_cached_tokens >= 64 for o in outputs), "prefix cache was not used"
    for prompt, spec, out in zip(prompts, specs, outputs):
        ids = list(prompt)
        for token, top in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
            expected = _expected_logprobs(hf_pair, ids, spec)
            for tok, lp in top.items():
                if expected[tok] > -1e3:  # AAD: tokens outside V_alpha are ~ -1e4
                    assert lp.logprob == pytest.approx(float(expected[tok]), abs=2e-3), (spec, tok)
            ids.append(token)


CONFORMANCE = [  # (spec, max_tokens, prompt length): requests finish at different times
    ({"method": "none"}, 5, 7),
    ({"method": "dera", "lambda": 0.0}, 12, 20),
    ({"method": "dera", "lambda": 1.0}, 7, 3),
    ({"method": "dera", "lambda": 0.5}, 16, 90),
    ({"method": "dera", "lambda": 2.0}, 9, 12),
    ({"method": "aad", "alpha": 0.1}, 14, 33),
    ({"method": "aad", "alpha": 0.5}, 6, 70),
    ({"method": "aad", "alpha": 0.1, "entropy_threshold": 2.0}, 10, 15),
    ({"method": "dera", "lambda": 0.5}, 4, 25),
    ({"method": "aad", "alpha": 0.1}, 11, 5),
]


def test_greedy_conformance_in_one_mixed_batch(pair_llm, hf_pair):
    """Every method equals a decoder that recomputes both HF models each step."""
    rng = random.Random(2)
    prompts = [_random_ids(rng, n) for _, _, n in CONFORMANCE]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True,
                             extra_args={"align": s}) for s, m, _ in CONFORMANCE]
    outputs = _generate(pair_llm, prompts, params)
    for prompt, (spec, max_tokens, _), out in zip(prompts, CONFORMANCE, outputs):
        expected, steps = hf_reference.generate(*hf_pair, prompt, spec, max_tokens,
                                                ignore_eos=True, return_steps=True)
        got = list(out.outputs[0].token_ids)
        assert got == expected, (spec, [s.margin for s in steps])

    aligned, reference = hf_pair
    alone = {name: hf_reference.generate(model, None, prompts[i], {"method": "none"},
                                         CONFORMANCE[i][1], ignore_eos=True)
             for name, model, i in (("reference", reference, 1), ("aligned", aligned, 2))}
    assert list(outputs[1].outputs[0].token_ids) == alone["reference"]  # lambda = 0
    assert list(outputs[2].outputs[0].token_ids) == alone["aligned"]  # lambda = 1


def test_sampling_parameters_apply_to_the_aligned_distribution(pair_llm):
    rng = random.Random(3)
    prompt = [_random_ids(rng, 12)]
    dera = {"align": {"method": "dera", "lambda": 0.5}}
    greedy = _generate(pair_llm, prompt, SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True, extra_args=dera))
    top1 = _generate(pair_llm, prompt, SamplingParams(
        max_tokens=8, temperature=1.0, top_k=1, ignore_eos=True, extra_args=dera))
    assert top1[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids

    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=2, ignore_eos=True,
                            extra_args={"align": {"method": "aad", "alpha": 0.5}})
    first, again = (_generate(pair_llm, prompt, seeded)[0] for _ in range(2))
    assert len(first.outputs) == 2
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]

    choice = SamplingParams(max_tokens=8, temperature=0,
                            structured_outputs=StructuredOutputsParams(choice=["cat", "dog"]),
                            extra_args={"align": {"method": "aad", "alpha": 0.1}})
    text = pair_llm.generate(["the animal is a"], choice, use_tqdm=False)[0].outputs[0].text
    assert text in ("cat", "dog")


def test_prompt_logprobs_follow_the_rule_and_do_not_disturb_mixing(pair_llm, hf_pair):
    """On the compiled engine: the rule's prompt logprobs (DeRa, AAD), and the same tokens."""
    rng = random.Random(4)
    prompt = _random_ids(rng, 20)
    specs = [{"method": "dera", "lambda": 0.0}, {"method": "aad", "alpha": 0.1}]
    outs = _generate(pair_llm, [prompt] * 2, [SamplingParams(
        max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=3,
        extra_args={"align": spec}) for spec in specs])
    for spec, out in zip(specs, outs):
        returned = [None if p is None else {t: lp.logprob for t, lp in p.items()}
                    for p in out.prompt_logprobs]
        assert hf_reference.check_prompt_logprobs(
            hf_reference.prompt_log_probs(*hf_pair, prompt, spec), returned) >= len(prompt) - 1
        assert list(out.outputs[0].token_ids) == hf_reference.generate(
            *hf_pair, prompt, spec, 6, ignore_eos=True)


BAD_SPECS = [
    ({"method": "beam"}, "unknown alignment method"),
    ({"method": "aad", "alpha": 0.1, "lambda": 1.0}, "unknown alignment key"),
    ({"method": "dera", "lambda": float("nan")}, "must be finite"),
    ({"method": "dera", "lambda": float("inf")}, "must be finite"),
    ({"method": "dera", "lambda": "1"}, "must be a number"),
    ({"method": "aad", "alpha": 0.0}, "(0, 1]"),
    ({"method": "aad", "alpha": 1.01}, "(0, 1]"),
    ({"method": "mara"}, "MARA agent"),
    (["dera", 0.5], "must be an object"),
    ("dera", "not valid JSON"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS)
def test_bad_request_refused_alone(pair_llm, spec, message):
    with pytest.raises(ValueError, match=None) as err:
        pair_llm.generate(["hi"], SamplingParams(max_tokens=2, extra_args={"align": spec}),
                          use_tqdm=False)
    assert message in str(err.value)
    ok = pair_llm.generate(["hi"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) >= 1

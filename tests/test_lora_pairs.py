"""LoRA pairs: one engine holds the base weights once; a request's adapter is its aligned model.

``LLM(model=BASE, enable_lora=True, additional_config={"align": {"reference_model": BASE}})``:
a row with a ``LoRARequest`` decodes its rule with aligned = BASE + that adapter and
reference = BASE. Adapters are made with ``peft`` in its own format; the HF decoders use
the adapter merged with ``merge_and_unload`` as the aligned model and the base as the
reference (``hf_reference``, ``hf_mara_reference``). One eager engine: three adapters with
room for two at once (vLLM swaps them), four rows at a time (rows join and leave mid-run),
a 64-token step budget (long prompts are prefilled in chunks) and prefix caching on.
"""

import random

import pytest
import torch

import hf_mara_reference
import hf_reference

MAX_TOKENS = 8
RANK = 8


def make_adapter(base: str, out, seed: int) -> str:
    """A rank-8 ``peft`` LoRA adapter on every linear layer of ``base``, random A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=16, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                        "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, config).save_pretrained(out)
    return str(out)


def merged(base: str, adapter: str | None):
    """The HF model a row decodes with: ``base``, or ``base`` + ``adapter`` merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


@pytest.fixture(scope="module")
def base(tiny_pair) -> str:
    return tiny_pair[1]


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("adapters")
    return [make_adapter(base, d / f"dpo{i}", seed=10 + i) for i in range(3)]


@pytest.fixture(scope="module")
def agent(base, tmp_path_factory):
    from transformers import AutoConfig

    from vllm_align.mara.agent import save_agent
    from vllm_align.toy.models import random_agent

    made = random_agent(AutoConfig.from_pretrained(base).hidden_size, seed=2, accept_bias=1.0)
    return made, str(save_agent(made, tmp_path_factory.mktemp("agent") / "a.safetensors"))


@pytest.fixture(scope="module")
def llm(base, agent):
    from vllm import LLM

    engine = LLM(model=base, enable_lora=True, max_lora_rank=RANK, max_loras=2,
                 additional_config={"align": {"reference_model": base,
                                              "mara_agents": {"default": agent[1]}}},
                 dtype="float32", max_model_len=256, max_num_seqs=4,
                 max_num_batched_tokens=64, enable_prefix_caching=True, block_size=32,
                 seed=0, enforce_eager=True)
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf_models(base, adapters):
    """{adapter index or None: HF model}."""
    return {None: merged(base, None), **{i: merged(base, a) for i, a in enumerate(adapters)}}


def _lora(adapters, i):
    from vllm.lora.request import LoRARequest

    return None if i is None else LoRARequest(f"dpo{i}", i + 1, adapters[i])


def _generate(llm, adapters, rows, prompts, **extra):
    """rows: [(adapter index or None, spec)] -> token ids per row."""
    from vllm import SamplingParams, TokensPrompt

    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                             extra_args={"align": spec}, **extra) for _, spec in rows]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        lora_request=[_lora(adapters, i) for i, _ in rows], use_tqdm=False)
    return outs


def _expected(hf_models, agent, i, spec, prompt):
    if spec["method"] == "mara":
        return hf_mara_reference.tokens(hf_mara_reference.mara_greedy_decode(
            hf_models[i], agent[0], prompt, max_new_tokens=MAX_TOKENS, top_k=spec["top_k"]))
    return hf_reference.generate(hf_models[i], hf_models[None], prompt, spec, MAX_TOKENS,
                                 ignore_eos=True)


ROWS = [(0, {"method": "dera", "lambda": 0.5}, 70), (1, {"method": "dera", "lambda": 0.0}, 9),
        (2, {"method": "dera", "lambda": 2.0}, 30), (0, {"method": "aad", "alpha": 0.1}, 12),
        (1, {"method": "aad", "alpha": 0.1, "entropy_threshold": 2.0}, 50),
        (2, {"method": "none"}, 20), (None, {"method": "none"}, 40),
        (0, {"method": "mara", "top_k": 5}, 25), (None, {"method": "mara", "top_k": 5}, 15),
        (1, {"method": "none"}, 66)]


def test_every_row_decodes_as_its_hf_peft_decoder(llm, adapters, hf_models, agent):
    rng = random.Random(3)
    prompts = [[rng.randrange(10, 1000) for _ in range(n)] for _, _, n in ROWS]
    outs = _generate(llm, adapters, [(i, s) for i, s, _ in ROWS], prompts)
    for (i, spec, _), prompt, out in zip(ROWS, prompts, outs):
        assert list(out.outputs[0].token_ids) == _expected(hf_models, agent, i, spec, prompt), (
            i, spec)
    # The adapters matter: the DeRa λ=0 row is the base model, the λ=0.5 row is not.
    base_alone = hf_reference.generate(hf_models[None], None, prompts[0], {"method": "none"},
                                       MAX_TOKENS, ignore_eos=True)
    assert list(outs[0].outputs[0].token_ids) != base_alone


def test_prompt_logprobs_follow_the_rule_on_adapter_rows(llm, adapters, hf_models):
    rows = [(0, {"method": "dera", "lambda": 2.0}), (1, {"method": "aad", "alpha": 0.1}),
            (2, {"method": "none"})]
    rng = random.Random(4)
    prompts = [[rng.randrange(10, 1000) for _ in range(n)] for n in (70, 20, 33)]
    outs = _generate(llm, adapters, rows, prompts, prompt_logprobs=3)
    for (i, spec), prompt, out in zip(rows, prompts, outs):
        got = [None if p is None else {t: lp.logprob for t, lp in p.items()}
               for p in out.prompt_logprobs]
        expected = hf_reference.prompt_log_probs(hf_models[i], hf_models[None], prompt, spec)
        assert hf_reference.check_prompt_logprobs(expected, got) >= len(prompt) - 1, spec


def test_dera_and_aad_without_an_adapter_are_refused_alone(llm, adapters, hf_models, agent):
    from vllm import SamplingParams

    prompt = [11, 12, 13, 14]
    good = (0, {"method": "dera", "lambda": 0.5})
    for spec in ({"method": "dera", "lambda": 0.5}, {"method": "aad", "alpha": 0.1}):
        with pytest.raises(ValueError, match="needs an adapter"):
            _generate(llm, adapters, [good, (None, spec)], [prompt, prompt])
    with pytest.raises(ValueError, match="needs an adapter"):  # also through the default
        llm.generate([prompt], SamplingParams(max_tokens=2, extra_args={"align": {
            "method": "dera"}}), use_tqdm=False)
    out = _generate(llm, adapters, [good], [prompt])[0]
    assert list(out.outputs[0].token_ids) == _expected(hf_models, agent, *good, prompt)


def test_base_weights_are_held_once(llm, base):
    from pathlib import Path

    def unique_bytes(worker):
        model = worker.model_runner.get_model()
        seen = {}
        for t in [*model.parameters(), *model.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values()), model.reference is not None

    held, has_reference = llm.collective_rpc(unique_bytes)[0]
    checkpoint = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
    assert has_reference
    assert held <= 1.15 * checkpoint, (held, checkpoint)


def _reference_tokens(llm) -> int:
    return llm.collective_rpc(lambda w: w.model_runner.get_model().reference_tokens)[0]


def test_none_and_mara_adapter_rows_run_no_reference(llm, adapters):
    prompts = [[20 + i, 30, 40, 50, 60] for i in range(4)]
    rows = [(0, {"method": "none"}), (1, {"method": "mara", "top_k": 5}),
            (2, {"method": "none"}), (None, {"method": "none"})]
    before = _reference_tokens(llm)
    _generate(llm, adapters, rows, prompts)
    assert _reference_tokens(llm) == before
    _generate(llm, adapters, [(0, {"method": "dera", "lambda": 0.5})], prompts[:1])
    assert _reference_tokens(llm) > before  # the counter counts


def test_prefix_cache_never_crosses_adapters_or_reference_kv(llm, adapters, hf_models, agent):
    """A DeRa row never reads KV computed under another adapter, nor KV computed
    without the reference's layers; a repeat of its own kind does hit the cache."""
    prompt = [random.Random(5).randrange(10, 1000) for _ in range(100)]  # 3 full blocks
    dera = {"method": "dera", "lambda": 2.0}

    def run(i, spec):
        out = _generate(llm, adapters, [(i, spec)], [prompt])[0]
        assert list(out.outputs[0].token_ids) == _expected(hf_models, agent, i, spec, prompt)
        return out.num_cached_tokens

    run(0, {"method": "none"})
    assert run(0, {"method": "none"}) > 0          # caching is on
    assert run(1, dera) == 0                       # adapter 0's KV: another adapter
    assert run(0, dera) == 0                       # adapter 0's KV lacks the reference's
    assert run(0, dera) > 0                        # its own kind hits


def test_a_plain_engine_with_lora_is_stock_vllm(base, adapters, hf_models):
    """Not the pair model, and vLLM's own LoRA ops. (In a batch that mixes adapter rows
    with rows without one, vLLM 0.32's CPU ops give the latter the last slot's adapter;
    docs/lora-pairs.md. So each row runs alone here; pair engines fix the ops.)"""
    from vllm import LLM, SamplingParams, TokensPrompt

    engine = LLM(model=base, enable_lora=True, max_lora_rank=RANK, max_loras=1,
                 dtype="float32", max_model_len=128, max_num_seqs=2, seed=0, enforce_eager=True)
    prompt = [11, 12, 13, 14, 15]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    try:
        arch = engine.llm_engine.model_config.hf_config.architectures
        outs = [engine.generate([TokensPrompt(prompt_token_ids=prompt)], greedy,
                                lora_request=_lora(adapters, i), use_tqdm=False)[0]
                for i in (0, None)]
        fixed = engine.collective_rpc(lambda w: __import__(
            "vllm_align.patches.lora_cpu_ops", fromlist=["_enabled"])._enabled)[0]
        with pytest.raises(ValueError, match="needs a reference model"):
            engine.generate([prompt], SamplingParams(max_tokens=2, extra_args={"align": {
                "method": "dera"}}), use_tqdm=False)
    finally:
        del engine
    assert arch == ["LlamaForCausalLM"] and not fixed
    for i, out in zip((0, None), outs):
        assert list(out.outputs[0].token_ids) == hf_reference.generate(
            hf_models[i], None, prompt, {"method": "none"}, MAX_TOKENS, ignore_eos=True)


def test_reference_model_naming_the_served_model_needs_lora(base):
    from vllm import LLM

    with pytest.raises(Exception, match="enable_lora"):
        LLM(model=base, additional_config={"align": {"reference_model": base}},
            dtype="float32", max_model_len=128, enforce_eager=True)


def test_a_separate_reference_keeps_working_with_adapters(tiny_pair, base, adapters, hf_models,
                                                           agent):
    """reference_model=OTHER with LoRA: aligned = BASE + the row's adapter (BASE alone for a
    row without one), reference = OTHER."""
    from vllm import LLM

    other = tiny_pair[0]
    engine = LLM(model=base, enable_lora=True, max_lora_rank=RANK, max_loras=2,
                 additional_config={"align": {"reference_model": other}},
                 dtype="float32", max_model_len=256, max_num_seqs=4,
                 max_num_batched_tokens=64, seed=0, enforce_eager=True)
    rows = [(0, {"method": "dera", "lambda": 0.5}), (None, {"method": "dera", "lambda": 2.0}),
            (1, {"method": "aad", "alpha": 0.1}), (None, {"method": "aad", "alpha": 0.1}),
            (2, {"method": "none"}), (None, {"method": "none"})]
    rng = random.Random(6)
    prompts = [[rng.randrange(10, 1000) for _ in range(n)] for n in (70, 9, 30, 12, 20, 40)]
    try:
        outs = _generate(engine, adapters, rows, prompts)
    finally:
        del engine
    reference = merged(other, None)
    for (i, spec), prompt, out in zip(rows, prompts, outs):
        assert list(out.outputs[0].token_ids) == hf_reference.generate(
            hf_models[i], reference, prompt, spec, MAX_TOKENS, ignore_eos=True), (i, spec)


def test_a_qwen2_lora_pair(tiny_pair, tmp_path_factory):
    """The LoRA pair on a non-Llama architecture: Qwen2 (biased q/k/v projections, tied
    embeddings, its own vLLM class), peft adapters, one mixed batch against HF + PEFT."""
    from pathlib import Path

    from vllm import LLM

    from test_architectures import _qwen2
    from vllm_align.mara.agent import save_agent
    from vllm_align.toy.models import random_agent

    d = tmp_path_factory.mktemp("qwen2-lora")
    _qwen2(d / "base", Path(tiny_pair[0]), seed=0)
    qwen = str(d / "base")
    qwen_adapters = [make_adapter(qwen, d / f"dpo{i}", seed=20 + i) for i in range(2)]
    qwen_agent = random_agent(128, seed=2, accept_bias=1.0)
    agent_path = str(save_agent(qwen_agent, d / "agent.safetensors"))
    engine = LLM(model=qwen, enable_lora=True, max_lora_rank=RANK, max_loras=1,
                 additional_config={"align": {"reference_model": qwen,
                                              "mara_agents": {"default": agent_path}}},
                 dtype="float32", max_model_len=256, max_num_seqs=4,
                 max_num_batched_tokens=64, seed=0, enforce_eager=True)
    rows = [(0, {"method": "dera", "lambda": 2.0}), (1, {"method": "aad", "alpha": 0.1}),
            (None, {"method": "none"}), (1, {"method": "mara", "top_k": 5}),
            (0, {"method": "none"}), (1, {"method": "dera", "lambda": 0.5})]
    rng = random.Random(7)
    prompts = [[rng.randrange(10, 1000) for _ in range(n)] for n in (70, 20, 40, 30, 9, 15)]
    try:
        assert "Qwen2" in type(engine.llm_engine.model_config.hf_config).__name__
        outs = _generate(engine, qwen_adapters, rows, prompts)
    finally:
        del engine
    models = {None: merged(qwen, None), **{i: merged(qwen, a) for i, a in enumerate(qwen_adapters)}}
    for (i, spec), prompt, out in zip(rows, prompts, outs):
        assert list(out.outputs[0].token_ids) == _expected(
            models, (qwen_agent, agent_path), i, spec, prompt), (i, spec)

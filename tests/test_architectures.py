"""The pair engine on an architecture other than Llama: a tiny Qwen2 pair.

Qwen2 differs from Llama where an engine integration could: biased q/k/v projections,
its own vLLM model class and weight names, and (here) tied input and output embeddings.
One eager engine (aligned + reference + a MARA agent), one mixed batch with chunked
prompts: every row's tokens equal its plain HF decoder's (``hf_reference``,
``hf_mara_reference``), and every prompt logprob its rule's distribution by plain HF
forwards of both models.
"""

import math
import random

import pytest
import torch

import hf_mara_reference
import hf_reference

VOCAB = 1024
SPECS = [({"method": "dera", "lambda": 2.0}, 70), ({"method": "aad", "alpha": 0.1}, 20),
         ({"method": "none"}, 40), ({"method": "mara", "top_k": 5}, 30),
         ({"method": "dera", "lambda": 0.5}, 9)]
MAX_TOKENS = 8


def _qwen2(path, tokenizer_dir, seed: int, base=None, noise: float = 0.3):
    """A 2-layer float32 Qwen2 with spread-out weights (peaked, context-dependent
    distributions), saved at ``path`` with the tokenizer of ``tokenizer_dir``; with ``base``,
    ``base``'s weights plus relative noise. Returns the model."""
    import shutil

    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if base is not None:
                ref = dict(base.named_parameters())[name]
                p.copy_(ref + noise * ref.std() * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0 / math.sqrt(cfg.hidden_size))
            elif p.ndim == 1:    # q/k/v biases
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return model


@pytest.fixture(scope="module")
def qwen_pair(tiny_pair, tmp_path_factory):
    """(aligned path, reference path) of a tiny Qwen2 pair with the tiny Llama's tokenizer."""
    from pathlib import Path

    d = tmp_path_factory.mktemp("qwen2")
    tok = Path(tiny_pair[0])
    reference = _qwen2(d / "reference", tok, seed=0)
    _qwen2(d / "aligned", tok, seed=1, base=reference)
    return str(d / "aligned"), str(d / "reference")


@pytest.fixture(scope="module")
def agent(qwen_pair, tmp_path_factory):
    from vllm_align.mara.agent import save_agent
    from vllm_align.toy.models import random_agent

    made = random_agent(128, seed=2, accept_bias=1.0)
    return made, str(save_agent(made, tmp_path_factory.mktemp("agent") / "a.safetensors"))


@pytest.fixture(scope="module")
def outputs(qwen_pair, agent):
    """(prompts, outputs) of one mixed batch: every SPECS row asks for prompt logprobs but
    MARA's (refused for it)."""
    from vllm import LLM, SamplingParams, TokensPrompt

    aligned, reference = qwen_pair
    llm = LLM(model=aligned, additional_config={"align": {
        "reference_model": reference, "mara_agents": {"default": agent[1]}}},
        dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
        seed=0, enforce_eager=True)
    assert "Qwen2" in type(llm.llm_engine.model_config.hf_config).__name__
    rng = random.Random(3)
    prompts = [[rng.randrange(10, VOCAB) for _ in range(n)] for _, n in SPECS]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                             prompt_logprobs=None if spec["method"] == "mara" else 3,
                             extra_args={"align": spec}) for spec, _ in SPECS]
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=False)
    finally:
        del llm
    return prompts, outs


@pytest.fixture(scope="module")
def hf_models(qwen_pair):
    return hf_reference.load_pair(*qwen_pair)


def test_every_rule_decodes_as_its_hf_decoder(outputs, hf_models, agent):
    prompts, outs = outputs
    for (spec, _), prompt, out in zip(SPECS, prompts, outs):
        if spec["method"] == "mara":
            expected = hf_mara_reference.tokens(hf_mara_reference.mara_greedy_decode(
                hf_models[0], agent[0], prompt, max_new_tokens=MAX_TOKENS, top_k=spec["top_k"]))
        else:
            expected = hf_reference.generate(*hf_models, prompt, spec, MAX_TOKENS,
                                             ignore_eos=True)
        assert list(out.outputs[0].token_ids) == expected, spec


def test_prompt_logprobs_follow_each_rule(outputs, hf_models):
    prompts, outs = outputs
    for (spec, _), prompt, out in zip(SPECS, prompts, outs):
        if spec["method"] == "mara":
            assert out.prompt_logprobs is None
            continue
        got = [None if p is None else {t: lp.logprob for t, lp in p.items()}
               for p in out.prompt_logprobs]
        expected = hf_reference.prompt_log_probs(*hf_models, prompt, spec)
        assert hf_reference.check_prompt_logprobs(expected, got) >= len(prompt) - 1, spec
        if spec["method"] != "none":   # the rule, not the aligned model's scores
            aligned = hf_reference.prompt_log_probs(hf_models[0], None, prompt, {"method": "none"})
            assert any(abs(lp - float(aligned[i, t])) > 1e-2
                       for i, entry in enumerate(got[1:]) for t, lp in entry.items()), spec

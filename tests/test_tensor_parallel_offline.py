"""``LLM(..., tensor_parallel_size=2)``: the mixed batch in one ``generate`` call gives the
plain HF decoders' tokens (DeRa, AAD, MARA with a random agent, none), as one rank does.
Each rank is bound to one core (``VLLM_CPU_OMP_THREADS_BIND='0|1'``, README: "Tensor and data
parallel")."""

from __future__ import annotations

from serving import MAX_TOKENS, MIXED, PROMPT, TWO_RANKS, agent_file, reference_tokens


def test_offline_tensor_parallel_mixed_batch(tiny_pair, tmp_path, monkeypatch):
    from vllm import LLM, SamplingParams

    for key, value in TWO_RANKS.items():
        monkeypatch.setenv(key, value)
    agent, path = agent_file(tiny_pair, tmp_path / "agent.safetensors")
    aligned, reference = tiny_pair
    llm = LLM(model=aligned, tensor_parallel_size=2, dtype="float32", max_model_len=256,
              enforce_eager=True, additional_config={"align": {
                  "reference_model": reference, "mara_agents": {"default": path}}})
    try:
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                 extra_args={"align": spec}) for spec in MIXED]
        outs = llm.generate([PROMPT] * len(MIXED), params, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        assert got == reference_tokens(tiny_pair, agent, outs[0].prompt_token_ids)
    finally:
        del llm

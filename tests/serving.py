"""The server tests' `vllm serve` (vllm_align.cli.local_server, as the demo's) and requests."""

from pathlib import Path

import openai

from vllm_align.cli import local_server
from vllm_align.cli.local_server import STARTUP_S, stop  # noqa: F401 (the tests import them)

# Two CPU ranks (tensor or data parallel) on a 2-core machine: one core each.
TWO_RANKS = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def start(args: list[str], log: Path, env: dict | None = None):
    """(process, url) of `vllm serve ARGS` with the tiny models' settings."""
    return local_server.start([*args, "--dtype", "float32", "--max-model-len", "256",
                               "--max-num-seqs", "8"], log,
                              env={"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def agent_file(tiny_pair, path: Path, width_delta: int = 0) -> tuple[object, str]:
    from transformers import AutoConfig

    from vllm_align.mara.agent import save_agent
    from vllm_align.toy.models import random_agent

    hidden = AutoConfig.from_pretrained(tiny_pair[0]).hidden_size + width_delta
    agent = random_agent(hidden, seed=1)
    return agent, str(save_agent(agent, path))


PROMPT, MAX_TOKENS = "the cat sat on", 8


def complete(client, model, alignment=None, **kw):
    """A greedy completion of PROMPT (MAX_TOKENS tokens, EOS ignored, token ids returned)."""
    extra = {"ignore_eos": True, "return_token_ids": True}
    if alignment is not None:
        extra["alignment"] = alignment
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                     temperature=0, extra_body=extra, **kw)


def ids(completion) -> list[int]:
    return list(completion.choices[0].token_ids)


def hf_greedy_ids(tiny_pair) -> dict[str, list[int]]:
    """Greedy ids of PROMPT by the aligned and reference models alone, by plain HF forwards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(tiny_pair[0])(PROMPT).input_ids

    def greedy(path: str) -> list[int]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt):]

    return {"aligned": greedy(tiny_pair[0]), "reference": greedy(tiny_pair[1])}


# One mixed batch for the parallel and batch-file tests: every method the engine serves.
MIXED = ({"method": "dera", "lambda": 0.5}, {"method": "aad", "alpha": 0.1},
         {"method": "mara", "top_k": 5}, {"method": "none"})


def reference_tokens(tiny_pair, agent, prompt_ids, max_tokens: int = MAX_TOKENS
                     ) -> list[list[int]]:
    """The greedy ids each MIXED spec must give after ``prompt_ids`` (EOS ignored), by the
    plain HF decoders (tests/hf_reference.py, tests/hf_mara_reference.py)."""
    import hf_mara_reference
    import hf_reference

    models = hf_reference.load_pair(*tiny_pair)
    out = []
    for spec in MIXED:
        if spec["method"] == "mara":
            steps = hf_mara_reference.mara_greedy_decode(
                models[0], agent, list(prompt_ids), max_new_tokens=max_tokens,
                top_k=spec["top_k"])
            out.append(hf_mara_reference.tokens(steps))
        else:
            out.append(hf_reference.generate(*models, list(prompt_ids), spec, max_tokens,
                                             ignore_eos=True))
    return out


def complete_mixed(client, model) -> list:
    """MIXED as concurrent completions of PROMPT (one engine batch); the completions in
    MIXED's order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(MIXED)) as pool:
        return list(pool.map(lambda spec: complete(client, model, spec), MIXED))

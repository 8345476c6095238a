"""Shared fixtures: a tiny local model pair, built once per session (no downloads)."""

import os

import pytest

# Tiny models need little KV cache; vLLM's CPU default would reserve several GiB.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Tests look into the workers with collective_rpc(lambda worker: ...).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

# The suite runs on 2 pytest-xdist workers, a file at a time (Makefile); files that take
# minutes start first so that neither worker is left with a long one at the end.
SLOW_FIRST = ("test_train_learns.py", "test_lora_pairs.py", "test_train_mara.py",
              "test_replicas.py", "test_lora_data.py", "test_sweep.py",
              "test_generate_pairs.py", "test_server.py", "test_parallel_serve.py",
              "test_toy_mara.py", "test_engine.py", "test_tensor_parallel_offline.py",
              "test_run_batch.py", "test_toy_world.py", "test_mixed_rows.py",
              "test_engine_startup.py", "test_engine_rollout.py", "test_lm_eval.py",
              "test_lora_serving.py", "test_architectures.py", "test_pairs_mara.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[str, str]:
    """(aligned_path, reference_path) of a ~2M-parameter float32 Llama pair."""
    from vllm_align.toy.models import build_llama_pair

    return build_llama_pair(tmp_path_factory.mktemp("tiny-pair"), seed=0)


@pytest.fixture(scope="session")
def align_server(tiny_pair, tmp_path_factory):
    """(url, model, process) of `vllm serve` on the tiny pair with a reference model and
    a MARA agent (named "default"); a 64-token step budget, so long prompts are prefilled
    in chunks. Requests without `alignment` get DeRa lambda=0 (the reference model).
    Eager: test_engine.py's engine is the compiled one (a compile costs minutes here)."""
    from serving import agent_file, start, stop

    aligned, reference = tiny_pair
    tmp = tmp_path_factory.mktemp("server")
    _, agent = agent_file(tiny_pair, tmp / "agent.safetensors")
    proc, url = start([aligned, "--sampler", "align", "--reference-model", reference,
                       "--mara-agent", agent, "--max-num-batched-tokens", "64",
                       "--align-default", '{"method": "dera", "lambda": 0.0}', "--enforce-eager"],
                      tmp / "serve.log")
    yield url, aligned, proc
    stop(proc)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny forwards: thread start-up dominates, and on a shared 2-core box costs ~20x."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def peaked_tiny_llama(hidden: int = 64, vocab: int = 96):
    """A 2-layer float32 Llama with spread-out weights: peaked, context-dependent distributions."""
    import math

    import torch

    from vllm_align.toy.models import llama

    m = llama(vocab, hidden, num_layers=2, num_heads=2, intermediate_size=128,
              max_positions=128, num_key_value_heads=1).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 4.0 / math.sqrt(hidden))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    return m

"""Shared fixtures: a tiny local model pair, built once per session (no downloads)."""

import os

import pytest

# Tiny models need little KV cache; vLLM's CPU default would reserve several GiB.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[str, str]:
    """(aligned_path, reference_path) of a ~2M-parameter float32 Llama pair."""
    from vllm_align.toy.models import build_llama_pair

    return build_llama_pair(tmp_path_factory.mktemp("tiny-pair"), seed=0)

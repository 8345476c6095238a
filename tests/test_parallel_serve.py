"""`vllm serve --sampler align` over two CPU ranks: tensor parallel, and data parallel.

Each server gets the mixed batch (DeRa, AAD, MARA with a random agent, none) as
concurrent requests and must give the plain HF decoders' tokens. TP=2 splits every
layer over the ranks (the pair model's two models, the reference rows and the MARA
walk included); DP=2 runs two engine cores behind one API server, which spreads the
requests over both; here the test also checks that both cores served requests.
Each rank is bound to one core (``VLLM_CPU_OMP_THREADS_BIND='0|1'``, README: "Tensor and data
parallel").
"""

from __future__ import annotations

import pytest

from serving import (MIXED, TWO_RANKS, agent_file, client, complete_mixed, ids,
                     reference_tokens, start, stop)


def _serve(tiny_pair, tmp, flags):
    aligned, reference = tiny_pair
    agent, path = agent_file(tiny_pair, tmp / "agent.safetensors")
    proc, url = start([aligned, "--sampler", "align", "--reference-model", reference,
                       "--mara-agent", path, "--enforce-eager", *flags],
                      tmp / "serve.log", env=TWO_RANKS)
    return agent, proc, url


def _check_mixed(tiny_pair, agent, url, rounds: int = 1):
    model = tiny_pair[0]
    expected = None
    for _ in range(rounds):
        outs = complete_mixed(client(url), model)
        if expected is None:
            expected = reference_tokens(tiny_pair, agent, outs[0].choices[0].prompt_token_ids)
            assert len({tuple(e) for e in expected}) == len(MIXED)   # four different rules
        assert [ids(o) for o in outs] == expected


def test_tensor_parallel_server_gives_one_rank_tokens(tiny_pair, tmp_path):
    agent, proc, url = _serve(tiny_pair, tmp_path, ["--tensor-parallel-size", "2"])
    try:
        _check_mixed(tiny_pair, agent, url)
    finally:
        stop(proc)


def _served_per_engine(url) -> dict[str, float]:
    """Finished requests per engine core, from the server's Prometheus metrics."""
    import re

    import requests

    counts: dict[str, float] = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            engine = re.search(r'engine="(\d+)"', line).group(1)
            counts[engine] = counts.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_data_parallel_server_serves_mixed_methods_from_both_cores(tiny_pair, tmp_path):
    agent, proc, url = _serve(tiny_pair, tmp_path, ["--data-parallel-size", "2"])
    try:
        _check_mixed(tiny_pair, agent, url, rounds=3)
        served = _served_per_engine(url)
        assert sorted(served) == ["0", "1"] and min(served.values()) > 0, served
    finally:
        stop(proc)

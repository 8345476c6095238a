"""generate-pairs and sweep with ``--replicas 2`` (Ray actors on a local cluster, one core
each) give the one-engine outputs byte for byte.

The same commands on one engine each give the baselines; the two ``--replicas 2`` runs
share one pool of two replica engines (the CLI's ``ReplicaPool``
is wrapped so that its second construction with the same engine arguments reuses the
first): a pool per command would cost another Ray cluster and two more engine starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_align.cli.main import main

N_PAIRS, N_SWEEP = 24, 12
ENGINE = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--seed", "5",
          "--max-num-seqs", "4"]


@pytest.fixture(scope="module")
def inputs(tiny_pair, tmp_path_factory):
    """Paths of the pairs prompts (a chat one among them), the sweep prompts (long: some
    seeded request is prefilled in pieces) and the sweep's reward."""
    d = tmp_path_factory.mktemp("replicas-in")
    pairs = d / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"id": "chat", "messages": [{"role": "user", "content": "Tell me about it."}]}
                   if i == 3 else {"prompt": f"the small house number {i} was"}) + "\n"
        for i in range(N_PAIRS)))
    sweep = d / "sweep.jsonl"
    sweep.write_text("".join(
        json.dumps({"prompt": f"number {i}: " + " ".join(["the old river"] * 40)}) + "\n"
        for i in range(N_SWEEP)))
    scorer = d / "score.py"
    scorer.write_text("def chars(prompt, response):\n    return float(len(response))\n")
    return pairs, sweep, f"{scorer}:chars"


def _pairs_argv(tiny_pair, inputs, out: Path) -> list[str]:
    return ["generate-pairs", "--model", tiny_pair[0], "--reference-model", tiny_pair[1],
            "--prompts", str(inputs[0]), "--output", str(out), "--max-tokens", "10",
            "--batch-size", "4", "--no-progress", *ENGINE]


def _sweep_argv(tiny_pair, inputs, out: Path) -> list[str]:
    return ["sweep", "--model", tiny_pair[0], "--reference-model", tiny_pair[1],
            "--prompts", str(inputs[1]), "--reward", inputs[2], "--output", str(out / "s.csv"),
            "--lambdas", "0,1", "--alphas", "0.2", "--temperature", "1", "--max-tokens", "8",
            "--responses-dir", str(out / "resp"), "--no-progress", *ENGINE]


@pytest.fixture(scope="module")
def one_engine(tiny_pair, inputs, tmp_path_factory):
    """(pairs output, sweep output dir) of the same commands on one engine each."""
    d = tmp_path_factory.mktemp("one-engine")
    assert main(_pairs_argv(tiny_pair, inputs, d / "pairs.jsonl")) == 0
    assert main(_sweep_argv(tiny_pair, inputs, d)) == 0
    return d / "pairs.jsonl", d


@pytest.fixture(scope="module")
def shared_pool():
    """Every ``--replicas 2`` run of this module decodes on one ReplicaPool."""
    from vllm_align.data import replicas

    made: dict = {}
    pool_cls = replicas.ReplicaPool

    class Shared:
        def __init__(self, n, build, *, ray_address=None):
            if not made:
                made["build"] = build
                made["pool"] = pool_cls(n, build, ray_address=ray_address)
            # The same engines only for the same engine arguments.
            assert vars(build["engine_args"]) == vars(made["build"]["engine_args"])
            self.pool = made["pool"]

        def pairs(self, *args):
            return self.pool.pairs(*args)

        def generate_grid(self, cfg, items):
            return self.pool.generate_grid(cfg, items)

        def close(self):
            pass

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replicas, "ReplicaPool", Shared)
        yield made
    if "pool" in made:
        made["pool"].close()


def test_two_replicas_resume_pairs_to_the_one_engine_records(tiny_pair, inputs, one_engine,
                                                             shared_pool, tmp_path):
    """A partial output with a torn last line, resumed on 2 replicas: exactly the
    one-engine records (per-prompt seeds; records written by the driver alone)."""
    baseline = one_engine[0].read_bytes()
    lines = baseline.splitlines(keepends=True)
    assert len(lines) == N_PAIRS
    out = tmp_path / "pairs.jsonl"
    out.write_bytes(b"".join(lines[:5]) + lines[5][:30])
    assert main(_pairs_argv(tiny_pair, inputs, out) + ["--replicas", "2"]) == 0
    assert out.read_bytes() == baseline


def test_two_replicas_give_the_one_engine_sweep(tiny_pair, inputs, one_engine, shared_pool,
                                                tmp_path):
    """A prompt shard per replica: the same CSV and response files as one engine."""
    one = one_engine[1]
    assert main(_sweep_argv(tiny_pair, inputs, tmp_path) + ["--replicas", "2"]) == 0
    assert "pool" in shared_pool
    assert (tmp_path / "s.csv").read_bytes() == (one / "s.csv").read_bytes()
    names = sorted(p.name for p in (one / "resp").iterdir())
    assert names == ["aad_alpha=0.2.jsonl", "dera_lambda=0.jsonl", "dera_lambda=1.jsonl"]
    for name in names:
        assert (tmp_path / "resp" / name).read_bytes() == (one / "resp" / name).read_bytes()

"""generate-pairs on 2 engine replicas (Ray actors, ``--replicas 2``) against 1 engine,
in one run on the same machine.

A locally built pair (``vllm-align toy-models`` shape: hidden 256, 2 layers), N text
prompts, generate-pairs' default sides; first the one-engine run, then the 2-replica
run (a local Ray cluster, one core per replica), each to a fresh output file. Timed:
the whole call (engine start-up included) and the decoding alone (``PairsResult.seconds``:
engine ready to last record synced). The two outputs must be byte-identical.

On a 2-core machine the one engine already uses both cores, so 2 replicas of 1 core
each can only add overhead (Ray start, a second engine start, chunk drains); the gain
needs a replica per node or GPU.

Usage: python benchmarks/bench_replicas.py [--prompts 128] [--tokens 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import functools

    from vllm_align.data.pairs import generate_pairs
    from vllm_align.data.replicas import ReplicaPool
    from vllm_align.toy.models import build_llama_pair

    tmp = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    aligned, reference = build_llama_pair(tmp / "pair", seed=0)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the small house number {i} was"}) + "\n"
                               for i in range(args.prompts)))
    results = {}
    for replicas in (1, 2):
        out = tmp / f"pairs-{replicas}.jsonl"
        t0 = time.perf_counter()
        res = generate_pairs(model=aligned, reference_model=reference, prompts=str(prompts),
                             output=str(out), max_tokens=args.tokens, seed=0, dtype="float32",
                             max_model_len=256, progress=False,
                             engines=functools.partial(ReplicaPool, 2) if replicas > 1 else None,
                             llm_kwargs={"enforce_eager": True, "enable_prefix_caching": False})
        wall = time.perf_counter() - t0
        results[replicas] = {"wall_s": round(wall, 1), "decode_s": round(res.seconds, 1),
                             "tokens": res.tokens,
                             "decode_tok_s": round(res.tokens / res.seconds, 1)}
        print(replicas, results[replicas], flush=True)
    same = (tmp / "pairs-1.jsonl").read_bytes() == (tmp / "pairs-2.jsonl").read_bytes()
    report = {"prompts": args.prompts, "tokens": args.tokens, "cpus": os.cpu_count(),
              "identical_outputs": same, "runs": results}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

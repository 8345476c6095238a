"""generate-pairs throughput vs a bare ``LLM.generate`` of the same requests.

Both runs use the same locally built model pair (the bench_align.py pair by
default), the same engine settings (dtype, seed, max_model_len, the reference
model), the same text prompts and the same two sides per prompt (generate-pairs'
defaults: chosen = AAD alpha 0.1 greedy, rejected = the aligned model with
nucleus p 0.9, temperature 1; prompt i seeded seed + i):

* bare  : one ``llm.generate`` call with all 2 x N requests, timed around it;
* pairs : ``generate_pairs`` (what ``vllm-align generate-pairs`` runs) to a fresh
          output file, timed from its engine being ready to its last record
          synced (its own measurement; engine start-up excluded in both).

The runs alternate (bare, pairs, bare, pairs, ...), each with a fresh engine
and no warm-up in either, so the first-call costs are paid alike. The ratio is
pairs tokens/s over bare tokens/s from the summed tokens and seconds.

Usage: python benchmarks/bench_pairs.py [--prompts 128] [--tokens 64] [--repeats 2]
           [--batch-size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# As in bench_align.py: give vLLM both cores (its CPU worker reserves one by default).
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

MAX_MODEL_LEN = 512


def write_prompts(path: Path, tokenizer, n: int, seed: int = 0) -> None:
    """``n`` text prompts of 8-24 random vocabulary words, one JSON object per line."""
    rng = random.Random(seed)
    words = sorted({w for w in (tokenizer.decode([t]).strip()
                                for t in range(len(tokenizer)))
                    if w.isalpha() and len(w) > 2})
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(rng.choices(words, k=rng.randint(8, 24)))})
                    + "\n")


def load_avg() -> float:
    return os.getloadavg()[0]


def bench_bare(aligned: str, reference: str, prompts: Path, tokens: int, dtype: str,
               seed: int) -> dict:
    from vllm_align.data.engine import build_llm
    from vllm_align.data.pairs import (CHOSEN_SAMPLING, DEFAULT_CHOSEN, DEFAULT_REJECTED,
                                       REJECTED_SAMPLING, parse_side)
    from vllm_align.data.prompts import read_prompts

    chosen = parse_side(DEFAULT_CHOSEN, side="chosen", defaults=CHOSEN_SAMPLING)
    rejected = parse_side(DEFAULT_REJECTED, side="rejected", defaults=REJECTED_SAMPLING)
    items = read_prompts(prompts)
    # generate-pairs' own engine settings (build_llm), so only the driving loop differs.
    llm = build_llm(aligned, reference, dtype=dtype, seed=seed, max_model_len=MAX_MODEL_LEN,
                    seeded_sampling=True)
    try:
        inputs, params = [], []
        for it in items:
            inputs += [it.prompt, it.prompt]
            params += [chosen.sampling_params(tokens, seed + it.index),
                       rejected.sampling_params(tokens, seed + it.index)]
        load = load_avg()
        t0 = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
    finally:
        del llm
        gc.collect()
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    texts = [(outs[2 * j].outputs[0].text, outs[2 * j + 1].outputs[0].text)
             for j in range(len(items))]
    return {"tokens": n_tokens, "seconds": seconds, "load": load, "texts": texts}


def bench_pairs(aligned: str, reference: str, prompts: Path, tokens: int, dtype: str,
                seed: int, batch_size: int, out: Path) -> dict:
    from vllm_align.data.pairs import generate_pairs

    out.unlink(missing_ok=True)
    load = load_avg()
    res = generate_pairs(model=aligned, reference_model=reference, prompts=str(prompts),
                         output=str(out), max_tokens=tokens, seed=seed, batch_size=batch_size,
                         dtype=dtype, max_model_len=MAX_MODEL_LEN, progress=False)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    return {"tokens": res.tokens, "seconds": res.seconds, "load": load,
            "texts": [(r["chosen"], r["rejected"]) for r in recs]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per side")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="generate-pairs --batch-size (its default: 64)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--models-dir", default=".cache/bench-models")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from vllm_align.toy.models import build_llama_pair

    aligned, reference = build_llama_pair(
        args.models_dir, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_heads=args.hidden_size // 64, vocab_size=args.vocab_size, seed=0)
    runs: dict[str, list[dict]] = {"bare": [], "pairs": []}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        write_prompts(prompts, AutoTokenizer.from_pretrained(aligned), args.prompts, args.seed)
        for _ in range(args.repeats):
            runs["bare"].append(bench_bare(aligned, reference, prompts, args.tokens,
                                           args.dtype, args.seed))
            runs["pairs"].append(bench_pairs(aligned, reference, prompts, args.tokens,
                                             args.dtype, args.seed, args.batch_size,
                                             Path(tmp) / "pairs.jsonl"))

    def rate(name: str) -> float:
        return sum(r["tokens"] for r in runs[name]) / sum(r["seconds"] for r in runs[name])

    reference_texts = runs["bare"][0]["texts"]
    same = [sum(a == b for a, b in zip(r["texts"], reference_texts)) for r in runs["pairs"]]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "vllm_reserved_cpus": os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"],
        "config": vars(args),
        "runs": {name: [{"tokens": r["tokens"], "seconds": round(r["seconds"], 2),
                         "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
                         "load_avg_1min_at_start": round(r["load"], 2)} for r in rs]
                 for name, rs in runs.items()},
        "tokens_per_s": {"bare": round(rate("bare"), 1), "pairs": round(rate("pairs"), 1)},
        "ratio_pairs_over_bare": round(rate("pairs") / rate("bare"), 3),
        "pairs_identical_to_bare": f"{min(same)}/{len(reference_texts)}",
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

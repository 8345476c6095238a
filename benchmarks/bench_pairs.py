"""generate-pairs throughput vs a bare ``LLM.generate``, on its engine and on the aligned model alone.

One engine (``build_llm``, generate-pairs' own settings; prefix caching off so
that a run does not find the previous run's prompts cached) on a locally built
model pair (the bench_align.py pair by default), one warm-up call, then
``--repeats`` times both of (the order alternating between repeats):

* bare  : one ``llm.generate`` call with all 2 x N requests, timed around it;
* pairs : ``generate_pairs(..., llm=engine)`` (what ``vllm-align generate-pairs``
          runs, minus the engine start-up) to a fresh output file, timed by
          itself from its first request to its last record synced;
* alone : one ``llm.generate`` call on a second engine serving the aligned
          model alone (stock vLLM), with the same 2 x N requests as plain
          decoding (the chosen side greedy, the rejected side as above): what
          the same sampling costs without the reference model. The limit of
          pairs/alone is 1/(1 + 1/2): half the rows (AAD) read the reference.

Same text prompts, same two sides per prompt (generate-pairs' defaults:
chosen = AAD alpha 0.1 greedy, rejected = the aligned model with nucleus p 0.9,
temperature 1; prompt i seeded seed + i), so both produce the same texts, which
is checked. Sharing one engine and alternating keeps the comparison fair on a
machine whose load changes. Reported: pairs tokens/s over bare tokens/s from
the summed tokens and seconds, and the median over repeats of each repeat's ratio
(its two runs back to back), the robust figure when other jobs come and go.

Usage: python benchmarks/bench_pairs.py [--prompts 128] [--tokens 64] [--repeats 3]
           [--batch-size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
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


def bare_requests(prompts: Path, tokens: int, seed: int):
    """generate-pairs' requests for ``prompts``: [chosen, rejected] per prompt."""
    from vllm_align.data.pairs import (CHOSEN_SAMPLING, DEFAULT_CHOSEN, DEFAULT_REJECTED,
                                       REJECTED_SAMPLING, parse_side)
    from vllm_align.data.prompts import read_prompts

    chosen = parse_side(DEFAULT_CHOSEN, side="chosen", defaults=CHOSEN_SAMPLING)
    rejected = parse_side(DEFAULT_REJECTED, side="rejected", defaults=REJECTED_SAMPLING)
    inputs, params = [], []
    for it in read_prompts(prompts):
        inputs += [it.prompt, it.prompt]
        params += [chosen.sampling_params(tokens, seed + it.index),
                   rejected.sampling_params(tokens, seed + it.index)]
    return inputs, params


def alone_requests(params):
    """The same requests for the aligned model alone: both sides plain decoding."""
    out = []
    for p in params:
        p = p.clone()
        p.extra_args = None
        out.append(p)
    return out


def bench_bare(llm, inputs, params) -> dict:
    load = load_avg()
    t0 = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return {"tokens": sum(len(o.outputs[0].token_ids) for o in outs), "seconds": seconds,
            "load": load, "texts": [(outs[j].outputs[0].text, outs[j + 1].outputs[0].text)
                                    for j in range(0, len(outs), 2)]}


def bench_pairs(llm, aligned: str, reference: str, prompts: Path, tokens: int, seed: int,
                batch_size: int, out: Path) -> dict:
    from vllm_align.data.pairs import generate_pairs

    out.unlink(missing_ok=True)
    load = load_avg()
    res = generate_pairs(model=aligned, reference_model=reference, prompts=str(prompts),
                         output=str(out), max_tokens=tokens, seed=seed, batch_size=batch_size,
                         progress=False, llm=llm)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    return {"tokens": res.tokens, "seconds": res.seconds, "load": load,
            "texts": [(r["chosen"], r["rejected"]) for r in recs]}


def main(argv=None) -> int:
    from bench_align import add_model_args, bench_pair, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per side")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="generate-pairs --batch-size (its default: 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    add_model_args(parser)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from vllm_align.data.engine import build_llm
    aligned, reference = bench_pair(args)
    llm = build_llm(aligned, reference, dtype=args.dtype, seed=args.seed,
                    max_model_len=MAX_MODEL_LEN, llm_kwargs={"enable_prefix_caching": False})
    plain = build_llm(aligned, None, dtype=args.dtype, seed=args.seed,
                      max_model_len=MAX_MODEL_LEN, llm_kwargs={"enable_prefix_caching": False})
    runs: dict[str, list[dict]] = {"bare": [], "pairs": [], "alone": []}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        write_prompts(prompts, AutoTokenizer.from_pretrained(aligned), args.prompts, args.seed)
        inputs, params = bare_requests(prompts, args.tokens, args.seed)
        plain_params = alone_requests(params)
        llm.generate(inputs[:4], params[:4], use_tqdm=False)     # warm-up
        plain.generate(inputs[:4], plain_params[:4], use_tqdm=False)
        for rep in range(args.repeats):
            def bare() -> None:
                runs["bare"].append(bench_bare(llm, inputs, params))

            def alone() -> None:
                runs["alone"].append(bench_bare(plain, inputs, plain_params))

            def pairs() -> None:
                runs["pairs"].append(bench_pairs(llm, aligned, reference, prompts, args.tokens,
                                                 args.seed, args.batch_size,
                                                 Path(tmp) / "pairs.jsonl"))
            # Alternate which goes first, so a load trend favours neither.
            for run in ((alone, bare, pairs) if rep % 2 == 0 else (pairs, bare, alone)):
                run()
    del llm, plain
    gc.collect()

    def rate(name: str) -> float:
        return sum(r["tokens"] for r in runs[name]) / sum(r["seconds"] for r in runs[name])

    def per_repeat_ratio(num: str, den: str) -> list[float]:
        return [(p["tokens"] / p["seconds"]) / (b["tokens"] / b["seconds"])
                for b, p in zip(runs[den], runs[num])]

    per_repeat = per_repeat_ratio("pairs", "bare")
    per_repeat_alone = per_repeat_ratio("pairs", "alone")
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
        "tokens_per_s": {name: round(rate(name), 1) for name in runs},
        "ratio_pairs_over_bare": round(rate("pairs") / rate("bare"), 3),
        "ratio_per_repeat": [round(r, 3) for r in per_repeat],
        # Each repeat's two runs are back to back: their ratio sees the same load, so
        # the median over repeats is the robust figure on a shared machine.
        "ratio_median": round(statistics.median(per_repeat), 3),
        "ratio_pairs_over_alone_per_repeat": [round(r, 3) for r in per_repeat_alone],
        "ratio_pairs_over_alone_median": round(statistics.median(per_repeat_alone), 3),
        "pairs_identical_to_bare": f"{min(same)}/{len(reference_texts)}",
    }
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

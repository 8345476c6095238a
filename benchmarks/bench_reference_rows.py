"""A pair engine whose rows read the reference in part, vs stock vLLM serving the aligned model alone.

Two engines in one process, both alive for the whole run (same prompts, greedy,
fixed length, prefix caching off):

* plain : vLLM with the aligned model alone;
* pair  : the plugin with the reference model, a fraction f of the rows DeRa
          lambda=0.5 (spread through the batch), the rest ``none``.

Each repeat times every f with a plain run before and after it (plain, f1,
plain, f2, plain, ...); each pair run is compared with the mean of the two
plain runs around it, so a load trend favours no run. Reported: the median
over repeats of each pair/plain ratio. The physical
limit is 1/(1+f): a row that reads the reference costs two models' forwards,
one that does not costs one. Also reported: KV capacity in tokens per GiB of
both engines (the pair engine's, the same for every request: see
docs/reference-rows.md).

Usage: python benchmarks/bench_reference_rows.py [--prompts 32] [--tokens 64]
           [--fractions 0,0.25,0.5,1] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# As in bench_align.py: give vLLM both cores (its CPU worker reserves one by default).
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
# kv_tokens_per_gib asks the worker with collective_rpc(lambda ...).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def engine(aligned: str, reference: str | None, num_seqs: int, dtype: str):
    from vllm import LLM

    kwargs = {"additional_config": {"align": {"reference_model": reference}}} if reference else {}
    return LLM(model=aligned, dtype=dtype, max_model_len=512, seed=0, max_num_seqs=num_seqs,
               enable_prefix_caching=False, **kwargs)


def kv_tokens_per_gib(llm) -> float:
    blocks = llm.collective_rpc(lambda w: w.model_runner.kv_cache_config.num_blocks)[0]
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    return blocks * block_size / float(os.environ["VLLM_CPU_KVCACHE_SPACE"])


def params_for(n: int, fraction: float, tokens: int, aligned_engine: bool):
    """Row i is DeRa when floor((i+1)·f) > floor(i·f): ``floor(n·f)`` rows, spread out."""
    from vllm import SamplingParams

    out = []
    for i in range(n):
        dera = aligned_engine and int((i + 1) * fraction) > int(i * fraction)
        spec = {"method": "dera", "lambda": 0.5} if dera else {"method": "none"}
        out.append(SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True,
                                  extra_args={"align": spec} if aligned_engine else None))
    return out


def rate(llm, inputs, params) -> float:
    start = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def main(argv=None) -> int:
    from bench_align import _prompts, add_model_args, bench_pair, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--fractions", default="0,0.25,0.5,1")
    parser.add_argument("--repeats", type=int, default=3)
    add_model_args(parser)
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]

    from transformers import AutoTokenizer
    from vllm import TokensPrompt

    aligned, reference = bench_pair(args)
    inputs = [TokensPrompt(prompt_token_ids=p)
              for p in _prompts(AutoTokenizer.from_pretrained(aligned), args.prompts)]
    plain = engine(aligned, None, args.prompts, args.dtype)
    pair = engine(aligned, reference, args.prompts, args.dtype)
    runs = [("plain", plain, params_for(args.prompts, 0, args.tokens, False))]
    runs += [(f"dera={f:g}", pair, params_for(args.prompts, f, args.tokens, True))
             for f in fractions]
    for _, llm, params in runs:
        llm.generate(inputs[:2], params[:2], use_tqdm=False)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    per_run: dict[str, list[float]] = {name: [] for name, _, _ in runs[1:]}
    for _ in range(args.repeats):
        before = rate(*runs[0][1:2], inputs, runs[0][2])
        rates["plain"].append(before)
        for name, llm, params in runs[1:]:
            rates[name].append(rate(llm, inputs, params))
            after = rate(*runs[0][1:2], inputs, runs[0][2])
            rates["plain"].append(after)
            per_run[name].append(rates[name][-1] / ((before + after) / 2))
            before = after

    ratios = {f"{name}/plain": statistics.median(r) for name, r in per_run.items()}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "config": vars(args),
        "tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
        "ratio_median": {k: round(v, 3) for k, v in ratios.items()},
        "limit": {f"dera={f:g}/plain": round(1 / (1 + f), 3) for f in fractions},
        "kv_tokens_per_gib": {"plain": round(kv_tokens_per_gib(plain)),
                              "pair (any request)": round(kv_tokens_per_gib(pair))},
    }
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

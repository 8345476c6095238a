"""A loglikelihood-only workload (lm-eval's multiple choice): the plugin vs stock vLLM.

Every request is what lm-eval's ``local-completions`` sends to score a choice,
offline: the context + continuation as the prompt, ``prompt_logprobs=1``
(served: ``echo`` with ``logprobs`` 1) and ``max_tokens=1``. All runs in one
process, on one locally built model pair, same prompts; a stock engine and a pair
engine alive together, each round scoring the prompts once per setting:

* plain      : stock vLLM, the aligned model alone (no reference model);
* none       : the plugin with a reference model, every request ``none``
               (the aligned model's prompt logprobs; the reference is not run);
* dera       : the plugin, every request DeRa lambda=2 (both models over every
               prompt token, both LM heads over every prompt position).

Reported: prompt tokens scored per second per round, their medians and the
ratios of the medians to plain.

Usage: python benchmarks/bench_loglikelihood.py [--prompts 64] [--rounds 3] [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

from bench_align import add_model_args, bench_pair, write_report  # noqa: E402


def _prompts(vocab_size: int, n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 64-192 token ids (a context and a continuation, lm-eval style)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size) for _ in range(rng.randint(64, 192))]
            for _ in range(n)]


def engine(aligned: str, reference: str | None, dtype: str, eager: bool):
    """An engine serving ``aligned`` (stock vLLM when ``reference`` is None)."""
    from vllm import LLM

    kwargs = {}
    if reference is not None:
        kwargs["additional_config"] = {"align": {"reference_model": reference}}
    return LLM(model=aligned, dtype=dtype, max_model_len=512, seed=0, max_num_seqs=16,
               enforce_eager=eager, **kwargs)


def score(llm, spec: dict | None, prompts) -> float:
    """Prompt tokens scored per second (``prompt_logprobs=1``, ``max_tokens=1``)."""
    from vllm import SamplingParams, TokensPrompt

    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1,
                        extra_args={"align": spec} if spec else None)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    start = time.perf_counter()
    outs = llm.generate(inputs, sp, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.prompt_logprobs) == len(p) for o, p in zip(outs, prompts))
    return sum(len(p) for p in prompts) / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="let vLLM compile the models (default: eager, all three engines)")
    add_model_args(parser)
    args = parser.parse_args(argv)

    aligned, reference = bench_pair(args)
    load_before = os.getloadavg()[0]
    prompts = _prompts(args.vocab_size, args.prompts)
    # All three engines alive; each round scores the prompts on each, so that a busy
    # moment of a shared machine hits every engine alike; medians over the rounds.
    plain = engine(aligned, None, args.dtype, not args.compile)
    pair = engine(aligned, reference, args.dtype, not args.compile)
    runs = {"plain": (plain, None), "none": (pair, {"method": "none"}),
            "dera": (pair, {"method": "dera", "lambda": 2.0})}
    for llm, spec in runs.values():
        score(llm, spec, prompts[:2])  # warm-up
    rounds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (llm, spec) in runs.items():
            rounds[name].append(score(llm, spec, prompts))
    results = {name: statistics.median(v) for name, v in rounds.items()}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "config": vars(args),
        "prompt_tokens": sum(len(p) for p in prompts),
        "prompt_tokens_per_s_per_round": {k: [round(x, 1) for x in v] for k, v in rounds.items()},
        "prompt_tokens_per_s_median": {k: round(v, 1) for k, v in results.items()},
        "ratios": {"none/plain": round(results["none"] / results["plain"], 3),
                   "dera/plain": round(results["dera"] / results["plain"], 3)},
    }
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

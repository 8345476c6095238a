"""MARA training rollouts: episodes/s in the vLLM engine vs the HF reference rollout.

One process, one locally built model (~118M parameters by default), the same
prompts, top-k/top-p, response limit and actor for both rollouts; sampled
decisions (training), no terminal reward (the scorers are the same code in both
and are not what is compared):

* hf     : ``HFRollout.collect``: all episodes in lockstep, one ``[B, 1]``
           transformers forward per micro-step with a growing ``DynamicCache``;
* engine : ``EngineRollout.collect``: the same episodes as vLLM requests, the
           actor installed as the engine's MARA agent, the walk recorded in
           the worker and fetched once.

The HF rollout is timed before the engine starts and again after it is shut
down (an idle engine still polls a core); the ratio uses their mean and the
report keeps every repeat. The engine's time is split into installing the
actor, decoding, fetching the records and assembling transitions.

The engine is the one ``train-mara`` starts for these rollouts (``engine_kwargs``: on CPU
eager below 1M response tokens, in this process, a KV cache for the batch); ``--engine-args``
overrides it as train-mara's flag does.

Usage: python benchmarks/bench_rollout.py [--episodes 64] [--tokens 64] [--repeats 3]
       [--engine-args JSON] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

# An engine in its own processes (VLLM_ENABLE_V1_MULTIPROCESSING=1) gets both cores, like the
# HF rollout (as bench_align.py); the default in-process engine runs on torch's threads.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def time_hf(model_path: str, prompts, actor, args) -> list[float]:
    """Seconds per ``HFRollout.collect`` of all prompts, ``args.repeats`` times."""
    from vllm_align.train.hf_rollout import HFRollout, load_causal_lm
    from vllm_align.train.rollout import RolloutSpec

    model, tokenizer = load_causal_lm(model_path, args.dtype)
    hf = HFRollout(model, tokenizer, RolloutSpec(model_path).terminal(), top_k=args.top_k,
                   top_p=args.top_p, max_response_len=args.tokens)
    hf.collect(prompts[:2], actor, seed=0)  # warm-up
    seconds = []
    for r in range(args.repeats):
        start = time.perf_counter()
        batch = hf.collect(prompts, actor, seed=r)
        seconds.append(time.perf_counter() - start)
    time_hf.last = batch
    return seconds


def time_engine(model_path: str, prompts, actor, args) -> tuple[list[float], dict, object]:
    """Seconds per ``EngineRollout.collect`` and the split of the last one."""
    from vllm_align.train import engine_rollout
    from vllm_align.train.engine_rollout import EngineRollout
    from vllm_align.train.rollout import RolloutSpec

    # The engine train-mara would start for these rollouts (engine_rollout.engine_kwargs).
    spec = RolloutSpec(model=model_path, reward=None, top_k=args.top_k, top_p=args.top_p,
                       max_response_len=args.tokens, dtype=args.dtype,
                       engine_args=json.loads(args.engine_args),
                       episodes=len(prompts) * (args.repeats + 1), batch=len(prompts),
                       prompt_len=max(len(p.token_ids) for p in prompts))
    rollout = EngineRollout.from_spec(spec)  # no reward source: a zero terminal reward
    rollout.collect(prompts[:2], actor, seed=0)  # warm-up (and compile)

    split: dict[str, float] = {}
    timed = {"set_actor": (rollout, "set_actor"), "decode": (rollout, "_decode"),
             "assemble": (engine_rollout, "assemble"),
             "walk_records": (engine_rollout, "walk_records")}
    originals = {name: getattr(obj, attr) for name, (obj, attr) in timed.items()}

    def timer(name, fn):
        def wrapped(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                split[name] = split.get(name, 0.0) + time.perf_counter() - start
        return wrapped

    seconds = []
    for r in range(args.repeats):
        split.clear()
        for name, (obj, attr) in timed.items():
            setattr(obj, attr, timer(name, originals[name]))
        start = time.perf_counter()
        batch = rollout.collect(prompts, actor, seed=r)
        seconds.append(time.perf_counter() - start)
        for name, (obj, attr) in timed.items():
            setattr(obj, attr, originals[name])
    split["records_rpc_and_rest"] = seconds[-1] - sum(split.values())
    del rollout
    gc.collect()
    return seconds, {k: round(v, 3) for k, v in split.items()}, batch


def main(argv=None) -> int:
    from bench_align import _prompts, add_model_args, bench_pair, write_report
    from bench_mara import calibrated_agent

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=64, help="episodes per rollout")
    parser.add_argument("--tokens", type=int, default=64, help="response limit")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accept-rate", type=float, default=0.7)
    parser.add_argument("--engine-args", default="{}", help="JSON: the rollout engine's "
                        "arguments over train-mara's, e.g. '{\"enforce_eager\": false}'")
    add_model_args(parser)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from vllm_align.data.prompts import Prompt

    model, _ = bench_pair(args)
    ids = _prompts(AutoTokenizer.from_pretrained(model), args.episodes)
    prompts = [Prompt(id=i, text="", token_ids=tuple(p)) for i, p in enumerate(ids)]
    agent = calibrated_agent(model, ids[:32], args.accept_rate,
                             os.path.join(args.models_dir, "bench-agent.safetensors"))
    actor = agent.state_dict()

    hf_before = time_hf(model, prompts, actor, args)
    hf_batch = time_hf.last
    gc.collect()
    engine_s, split, engine_batch = time_engine(model, prompts, actor, args)
    hf_after = time_hf(model, prompts, actor, args)
    hf_s = statistics.median(hf_before + hf_after)
    eng_s = statistics.median(engine_s)
    tokens = sum(len(e.token_ids) for e in engine_batch.episodes)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "config": vars(args),
        "load_average_at_end": os.getloadavg(),
        "seconds_per_rollout": {"hf_before": [round(s, 3) for s in hf_before],
                                "engine": [round(s, 3) for s in engine_s],
                                "hf_after": [round(s, 3) for s in hf_after]},
        "episodes_per_s": {"hf": round(args.episodes / hf_s, 2),
                           "engine": round(args.episodes / eng_s, 2)},
        "engine/hf": round(hf_s / eng_s, 2),
        "engine_split_last_rollout_s": split,
        "tokens_per_rollout": tokens,
        "forwards_per_token": {"hf": round(hf_batch.forwards / max(1, sum(
            len(e.token_ids) for e in hf_batch.episodes)), 3),
            "engine": round(engine_batch.forwards / max(1, tokens), 3)},
    }
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

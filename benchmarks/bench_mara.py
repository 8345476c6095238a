"""Throughput of MARA in the engine vs plain vLLM vs the released code's HF loop.

One process, the runs one after the other, one locally built model (~118M
parameters by default), same prompts, fixed length (``ignore_eos``):

* plain      : vLLM, the model alone, greedy;
* mara       : vLLM with the plugin, every request MARA (k=40, p=0.95,
               fallback "last", greedy decisions) with a random MLP agent
               whose accept bias is calibrated for about 70% first-candidate
               accepts; its verdicts depend strongly on the state, so its
               rejections cluster (some positions reject many candidates);
* mara-flat  : the same with an agent whose P(accept) is 0.7 on every state
               and sampled decisions: independent accepts, the textbook
               "70% first candidates" (a geometric walk);
* hf-mara    : transformers, batch 1, one forward per candidate with a KV cache
  hf-flat      (cropped back after a rejection), as the released MARA code
               runs, with each agent.

MARA's cost is set by the forwards it needs per emitted token (one per
candidate fed, ``vllm_align/engine/mara_rows.py``), so the report gives the
measured first-candidate rate, candidates fed per token, and the ratio a
zero-overhead MARA would reach (``1 / forwards per token``) next to the
measured one.

``--prompts`` requests go through ``--max-num-seqs`` slots: with more prompts
than slots (the default) finished rows are refilled as in serving; with
``--prompts`` equal to ``--max-num-seqs`` all rows start together and the run
waits for its slowest row (MARA's rows need different numbers of forwards).

Each engine runs the workload ``--repeats`` times; its median tokens/s is
reported (and every repeat, with the load average at the end).

Usage: python benchmarks/bench_mara.py [--prompts 128] [--max-num-seqs 32]
       [--tokens 64] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# As bench_align.py: vLLM gets both cores, like the HF loop.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def calibrate_accept_bias(agent, states, rate: float,
                          threshold: float = 0.5) -> float:
    """Set the accept bias so that about ``rate`` of ``states`` get P(accept) > threshold.

    Args:
        agent: a ``mara.agent.MaraAgent``, modified in place (``output_linear.bias[1]``).
        states: [N, d] sample of the states the agent will see, e.g. the LLM's
            final hidden states after feeding first candidates.
        rate: target fraction in (0, 1).
        threshold: the greedy decision threshold in (0, 1).
    Returns:
        The new accept bias. With m = l_accept − l_reject before the accept
        bias, P(accept) > t ⇔ m + b > logit(t); b is set so that logit(t) − b
        is the (1 − rate)-quantile of m over ``states``.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate!r}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    import torch

    from vllm_align.mara.agent import ACCEPT, REJECT

    with torch.no_grad():
        bias = agent.output_linear.bias
        logits = agent.logits(states.to(torch.float32))
        margin = logits[:, ACCEPT] - logits[:, REJECT] - bias[ACCEPT]
        cut = math.log(threshold / (1.0 - threshold))
        new = cut - float(torch.quantile(margin.double(), 1.0 - rate))
        bias[ACCEPT] = new
    return new


def calibrated_agent(model_path: str, prompts, rate: float, path: str):
    """A random agent whose accept bias gives ``rate`` first-candidate accepts.

    Calibrated on the states MARA meets first: the final hidden state after
    feeding each prompt's most probable next token, and a few greedy steps on.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_align.mara.agent import save_agent
    from vllm_align.toy.models import random_agent

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    states = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            for _ in range(4):
                out = model(ids, output_hidden_states=True)
                ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=1)
                states.append(model(ids, output_hidden_states=True).hidden_states[-1][0, -1])
    agent = random_agent(model.config.hidden_size, seed=0)
    calibrate_accept_bias(agent, torch.stack(states), rate)
    save_agent(agent, path)
    return agent


def flat_agent(hidden_size: int, rate: float, path: str):
    """An agent with P(accept) ≈ ``rate`` on every state (a tiny output scale)."""
    from vllm_align.mara.agent import save_agent
    from vllm_align.toy.models import random_agent

    agent = random_agent(hidden_size, seed=0, accept_bias=math.log(rate / (1 - rate)),
                         logit_scale=1e-3)
    save_agent(agent, path)
    return agent


def make_engine(model: str, agent_path: str | None, dtype: str, max_num_seqs: int):
    from vllm import LLM

    kwargs = {}
    if agent_path is not None:
        kwargs["additional_config"] = {"align": {"mara_agents": {"default": agent_path}}}
    return LLM(model=model, dtype=dtype, max_model_len=512, seed=0, max_num_seqs=max_num_seqs,
               enable_prefix_caching=False, **kwargs)


def timed_run(llm, prompts, tokens: int, spec: dict | None):
    """(tokens/s, [MaraStats] or None) of one ``generate`` over ``prompts``."""
    from vllm import SamplingParams, TokensPrompt

    from vllm_align.engine.mara_stats import mara_stats

    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True,
                        extra_args=None if spec is None else {"align": spec})
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    start = time.perf_counter()
    outs = llm.generate(inputs, sp, use_tqdm=False)
    elapsed = time.perf_counter() - start
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = [mara_stats(o.outputs[0]) for o in outs] if spec is not None else None
    return n_tokens / elapsed, stats


def bench_hf_mara(model_path: str, agent, prompts, tokens: int, dtype: str,
                  decisions: str = "greedy", top_k: int = 40, top_p: float = 0.95) -> float:
    """Tokens/s of MARA at batch 1 with one HF forward per candidate (KV cached)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from vllm_align.mara.rules import candidate_set

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    k, p = torch.tensor([top_k]), torch.tensor([top_p])
    gen = torch.Generator().manual_seed(0)

    def accepts(state) -> bool:
        a = float(agent.accept_prob(state)[0])
        return (float(torch.rand(1, generator=gen)) < a) if decisions == "sampled" else a > 0.5

    def run(prompt, n_steps: int) -> int:
        cache = DynamicCache()
        with torch.inference_mode():
            logits = model(torch.tensor([prompt]), past_key_values=cache).logits[:, -1]
            for _ in range(n_steps):
                ids, _, valid = candidate_set(logits, k, p, top_k)
                n = int(valid.sum())
                for j in range(n):
                    out = model(ids[:, j:j + 1], past_key_values=cache, output_hidden_states=True)
                    if n == 1 or j == n - 1 or accepts(out.hidden_states[-1][:, -1]):
                        break
                    cache.crop(-1)  # rejected: drop its KV, try the next candidate
                logits = out.logits[:, -1]
        return n_steps

    run(prompts[0], 2)  # warm-up
    start = time.perf_counter()
    n_tokens = sum(run(q, tokens) for q in prompts)
    return n_tokens / (time.perf_counter() - start)


def walk_summary(stats) -> dict:
    """First-candidate rate and candidates fed (= forwards) per emitted token."""
    n_tokens = sum(s.num_tokens for s in stats)
    fed = sum(sum(s.positions) + s.num_tokens for s in stats) / n_tokens
    return {"first_candidate_rate": round(sum(s.positions.count(0) for s in stats) / n_tokens, 3),
            "candidates_fed_per_token": round(fed, 3),
            "zero_overhead_ratio": round(1 / fed, 3)}


def main(argv=None) -> int:
    from bench_align import _prompts, add_model_args, bench_pair, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--hf-prompts", type=int, default=4,
                        help="prompts for the (slow) batch-1 HF loops")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accept-rate", type=float, default=0.7)
    add_model_args(parser)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    model, _ = bench_pair(args)
    prompts = _prompts(AutoTokenizer.from_pretrained(model), args.prompts)
    agent_path = os.path.join(args.models_dir, "bench-agent.safetensors")
    agent = calibrated_agent(model, prompts[:32], args.accept_rate, agent_path)
    flat_path = os.path.join(args.models_dir, "bench-agent-flat.safetensors")
    flat = flat_agent(args.hidden_size, args.accept_rate, flat_path)

    # One engine at a time (an idle vLLM engine still polls and takes CPU);
    # each timed ``--repeats`` times, the median kept.
    slots = args.max_num_seqs
    runs = {"plain": (None, None), "mara": (agent_path, {"method": "mara"}),
            "mara-flat": (flat_path, {"method": "mara", "decisions": "sampled"})}
    repeats, tps, walks = {}, {}, {}
    for name, (path, spec) in runs.items():
        llm = make_engine(model, path, args.dtype, slots)
        timed_run(llm, prompts[:2], 4, spec)  # warm-up
        repeats[name] = []
        for _ in range(args.repeats):
            speed, stats = timed_run(llm, prompts, args.tokens, spec)
            repeats[name].append(round(speed, 1))
        if stats is not None:
            walks[name] = walk_summary(stats)
        tps[name] = statistics.median(repeats[name])
        print(name, repeats[name], flush=True)
        del llm
        gc.collect()
    hf_prompts = prompts[: args.hf_prompts]
    tps["hf-mara"] = bench_hf_mara(model, agent, hf_prompts, args.tokens, args.dtype)
    tps["hf-flat"] = bench_hf_mara(model, flat, hf_prompts, args.tokens, args.dtype, "sampled")
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "vllm_reserved_cpus": os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"],
        "config": vars(args),
        "load_average_at_end": os.getloadavg(),
        "repeats_tokens_per_s": repeats,
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "walks": walks,
        "ratios": {"mara/plain": round(tps["mara"] / tps["plain"], 3),
                   "mara-flat/plain": round(tps["mara-flat"] / tps["plain"], 3),
                   "mara/hf-mara": round(tps["mara"] / tps["hf-mara"], 2),
                   "mara-flat/hf-flat": round(tps["mara-flat"] / tps["hf-flat"], 2)},
    }
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

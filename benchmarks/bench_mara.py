"""Throughput of MARA in the engine vs plain vLLM vs the released code's HF loop.

One process, the runs one after the other, one locally built model (~118M
parameters by default), same prompts, fixed length:

* plain    : vLLM, the model alone, greedy (vLLM's default: async scheduling);
* plain-sync: the same with async scheduling off, as an engine with MARA
             agents runs (its rollback of rejecting rows is written for the
             synchronous scheduler);
* mara     : vLLM with the plugin, every request MARA (k=40, p=0.95, greedy
             decisions), the agent's accept bias calibrated so that about 70%
             of first candidates are accepted (the measured rate is reported);
* hf-mara  : transformers, batch 1, one forward per candidate with a KV cache
             (cropped back after a rejection), as the released MARA code runs.

Usage: python benchmarks/bench_mara.py [--prompts 32] [--tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# As bench_align.py: vLLM gets both cores, like the HF loop.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def calibrated_agent(model_path: str, prompts, rate: float, path: str):
    """A random agent whose accept bias gives ``rate`` first-candidate accepts.

    Calibrated on the states MARA meets first: the final hidden state after
    feeding each prompt's most probable next token, and a few greedy steps on.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_align.mara.agent import calibrate_accept_bias, random_agent, save_agent

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


def bench_vllm(model: str, agent_path: str | None, prompts, tokens: int, dtype: str,
               **kwargs):
    """(tokens/s, [MaraStats] or None) of one engine over ``prompts``."""
    from vllm import LLM, SamplingParams, TokensPrompt

    from vllm_align.engine.stats import mara_stats

    extra = None
    if agent_path is not None:
        kwargs["additional_config"] = {"align": {"mara_agents": {"default": agent_path}}}
        extra = {"align": {"method": "mara"}}
    llm = LLM(model=model, dtype=dtype, max_model_len=512, seed=0, max_num_seqs=len(prompts),
              enable_prefix_caching=False, **kwargs)
    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, extra_args=extra)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(inputs[:2], sp, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(inputs, sp, use_tqdm=False)
    elapsed = time.perf_counter() - start
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = [mara_stats(o.outputs[0]) for o in outs] if agent_path else None
    del llm
    gc.collect()
    return n_tokens / elapsed, stats


def bench_hf_mara(model_path: str, agent, prompts, tokens: int, dtype: str,
                  top_k: int = 40, top_p: float = 0.95) -> float:
    """Tokens/s of MARA at batch 1 with one HF forward per candidate (KV cached)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from vllm_align.mara.rules import candidate_set

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    k, p = torch.tensor([top_k]), torch.tensor([top_p])

    def run(prompt, n_steps: int) -> int:
        cache = DynamicCache()
        with torch.inference_mode():
            logits = model(torch.tensor([prompt]), past_key_values=cache).logits[:, -1]
            for _ in range(n_steps):
                ids, _, valid = candidate_set(logits, k, p, top_k)
                n = int(valid.sum())
                for j in range(n):
                    out = model(ids[:, j:j + 1], past_key_values=cache, output_hidden_states=True)
                    if n == 1 or j == n - 1 or float(agent.accept_prob(
                            out.hidden_states[-1][:, -1])[0]) > 0.5:
                        break
                    cache.crop(-1)  # rejected: drop its KV, try the next candidate
                logits = out.logits[:, -1]
        return n_steps

    run(prompts[0], 2)  # warm-up
    start = time.perf_counter()
    n_tokens = sum(run(q, tokens) for q in prompts)
    return n_tokens / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--hf-prompts", type=int, default=4,
                        help="prompts for the (slow) batch-1 HF loop")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--accept-rate", type=float, default=0.7)
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--models-dir", default=".cache/bench-models")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from bench_align import _prompts
    from vllm_align.toy.models import build_llama_pair

    model, _ = build_llama_pair(
        args.models_dir, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_heads=args.hidden_size // 64, vocab_size=args.vocab_size, seed=0)
    prompts = _prompts(AutoTokenizer.from_pretrained(model), args.prompts)
    agent_path = os.path.join(args.models_dir, "bench-agent.safetensors")
    agent = calibrated_agent(model, prompts, args.accept_rate, agent_path)

    plain, _ = bench_vllm(model, None, prompts, args.tokens, args.dtype)
    plain_sync, _ = bench_vllm(model, None, prompts, args.tokens, args.dtype,
                               async_scheduling=False)
    mara, stats = bench_vllm(model, agent_path, prompts, args.tokens, args.dtype)
    hf = bench_hf_mara(model, agent, prompts[: args.hf_prompts], args.tokens, args.dtype)
    n_tokens = sum(s.num_tokens for s in stats)
    first = sum(s.positions.count(0) for s in stats) / n_tokens
    # Forwards per token: one per candidate fed (see vllm_align/engine/mara_rows.py).
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "vllm_reserved_cpus": os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"],
        "config": vars(args),
        "tokens_per_s": {"plain": round(plain, 1), "plain-sync": round(plain_sync, 1),
                         "mara": round(mara, 1),
                         "hf-mara-batch1": round(hf, 1)},
        "mara_first_candidate_rate": round(first, 3),
        "mara_mean_position": round(sum(sum(s.positions) for s in stats) / n_tokens, 3),
        "mara_candidates_fed_per_token": round(
            sum(sum(s.positions) + s.num_tokens for s in stats) / n_tokens, 3),
        "ratios": {"mara/plain": round(mara / plain, 3),
                   "mara/plain-sync": round(mara / plain_sync, 3),
                   "plain-sync/plain": round(plain_sync / plain, 3),
                   "mara/hf-mara-batch1": round(mara / hf, 2)},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Throughput of DeRa and AAD in the engine vs plain vLLM vs a batched HF loop.

All runs in one process, one after the other, on one locally built model pair
(~100M parameters each by default), same prompts, greedy, fixed length:

* plain   : vLLM with the aligned model alone (no reference model);
* dera    : the plugin, every request DeRa lambda=0.5;
* aad     : the plugin, every request AAD alpha=0.1;
* hf-dera, hf-aad : transformers, both models batched with KV caches, the
            same math per step (how the published implementations decode,
            but batched, which they are not);
* hf-dera-batch1 : the same loop one prompt at a time, as the published code runs.

Usage: python benchmarks/bench_align.py [--prompts 32] [--tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# vLLM's CPU worker by default leaves one core to the API process; the HF loop
# uses every core. Give vLLM every core too, so both compete on equal hardware.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def _prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    vocab = [t for t in range(tokenizer.vocab_size) if t not in tokenizer.all_special_ids]
    return [[rng.choice(vocab) for _ in range(rng.randint(16, 48))] for _ in range(n)]


def bench_vllm(aligned: str, reference: str | None, spec: dict | None, prompts, tokens: int,
               dtype: str) -> float:
    from vllm import LLM, SamplingParams, TokensPrompt

    kwargs = {}
    if reference is not None:
        kwargs["additional_config"] = {"align": {"reference_model": reference}}
    llm = LLM(model=aligned, dtype=dtype, max_model_len=512, seed=0,
              max_num_seqs=len(prompts), enable_prefix_caching=False, **kwargs)
    extra = {"align": spec} if spec else None
    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, extra_args=extra)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(inputs[:2], sp, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(inputs, sp, use_tqdm=False)
    elapsed = time.perf_counter() - start
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()
    return n_tokens / elapsed


def bench_hf(aligned: str, reference: str, spec: dict, prompts, tokens: int,
             dtype: str, batch_size: int | None = None) -> float:
    """Tokens/s of an HF loop over ``prompts`` in groups of ``batch_size`` (all by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_align import methods

    torch_dtype = getattr(torch, dtype)
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype).eval()
              for p in (aligned, reference)]

    def rule(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        if spec["method"] == "dera":
            return methods.dera_logits(a, r, torch.full((n,), spec["lambda"]))
        return methods.aad_scores(a, r, torch.full((n,), spec["alpha"]), torch.full((n,), -1.0))

    def run(group, n_steps: int) -> int:
        width = max(map(len, group))
        # Left padding so every row's next token sits in the last column.
        cur = torch.zeros(len(group), width, dtype=torch.long)
        attn = torch.zeros_like(cur)
        for i, p in enumerate(group):
            cur[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        past = [None, None]
        with torch.inference_mode():
            for _ in range(n_steps):
                logits = []
                for k, m in enumerate(models):
                    out = m(input_ids=cur, attention_mask=attn, position_ids=pos,
                            past_key_values=past[k], use_cache=True)
                    past[k] = out.past_key_values
                    logits.append(out.logits[:, -1].float())
                cur = rule(*logits).argmax(-1, keepdim=True)
                attn = torch.cat([attn, torch.ones_like(cur)], dim=1)
                pos = pos[:, -1:] + 1
        return len(group) * n_steps

    size = batch_size or len(prompts)
    groups = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    run(groups[0], 2)  # warm-up
    start = time.perf_counter()
    n_tokens = sum(run(g, tokens) for g in groups)
    return n_tokens / (time.perf_counter() - start)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The benchmark model pair's flags (shared by every script here) and ``--json``."""
    from vllm_align.toy.cache import cache_dir

    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--models-dir", default=str(cache_dir("bench-models")))
    parser.add_argument("--json", default=None, help="write the results here")


def write_report(report: dict, path: str | None) -> None:
    """Print a benchmark's report as JSON, and write it to ``path`` (``--json``) if given."""
    print(json.dumps(report, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def bench_pair(args) -> tuple[str, str]:
    """(aligned, reference) paths of the locally built pair the flags describe (cached)."""
    from vllm_align.toy.models import build_llama_pair

    return build_llama_pair(
        args.models_dir, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_heads=args.hidden_size // 64, vocab_size=args.vocab_size, seed=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    add_model_args(parser)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    aligned, reference = bench_pair(args)
    prompts = _prompts(AutoTokenizer.from_pretrained(aligned), args.prompts)

    results = {
        "plain": bench_vllm(aligned, None, None, prompts, args.tokens, args.dtype),
        "dera": bench_vllm(aligned, reference, {"method": "dera", "lambda": 0.5},
                           prompts, args.tokens, args.dtype),
        "aad": bench_vllm(aligned, reference, {"method": "aad", "alpha": 0.1},
                          prompts, args.tokens, args.dtype),
    }
    results["hf-dera"] = bench_hf(aligned, reference, {"method": "dera", "lambda": 0.5},
                                  prompts, args.tokens, args.dtype)
    results["hf-aad"] = bench_hf(aligned, reference, {"method": "aad", "alpha": 0.1},
                                 prompts, args.tokens, args.dtype)
    results["hf-dera-batch1"] = bench_hf(aligned, reference, {"method": "dera", "lambda": 0.5},
                                         prompts, args.tokens, args.dtype, batch_size=1)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "vllm_reserved_cpus": os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"],
        "torch_threads_hf": __import__("torch").get_num_threads(),
        "config": vars(args),
        "tokens_per_s": {k: round(v, 1) for k, v in results.items()},
        "ratios": {
            "dera/plain": round(results["dera"] / results["plain"], 3),
            "aad/plain": round(results["aad"] / results["plain"], 3),
            "dera/hf-dera": round(results["dera"] / results["hf-dera"], 2),
            "aad/hf-aad": round(results["aad"] / results["hf-aad"], 2),
            "dera/hf-dera-batch1": round(results["dera"] / results["hf-dera-batch1"], 2),
        },
    }
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A LoRA pair (aligned = base + adapter, reference = the base, held once) vs stock vLLM
serving the same adapter.

Two engines in one process, both alive for the whole run, both vLLM's LoRA engine on the
same base with the same adapter (``max_loras`` 1), same prompts, greedy, fixed length,
prefix caching off, eager (``enforce_eager``: on CPU vLLM turns compilation off when LoRA
is on anyway, so eager is compared with eager):

* stock : vLLM, every request the adapter, plain decoding;
* dera  : the plugin's LoRA pair, every request the adapter, DeRa lambda=0.5
          (base + adapter mixed with the base: two forwards, limit ~0.5x);
* none  : the same pair engine, every request the adapter, ``none`` (one forward,
          limit 1x).

Each pair run sits between two stock runs and is compared with their mean (a load
trend favours no run); reported: the median over repeats of each ratio. Also: the
weight bytes each engine holds (unique parameter and buffer storage in the worker)
against a full pair's two checkpoints.

Usage: python benchmarks/bench_lora.py [--prompts 32] [--tokens 64] [--rank 16]
           [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# As in bench_align.py: give vLLM both cores (its CPU worker reserves one by default).
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
# held_bytes asks the worker with collective_rpc(lambda ...).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: str, out: Path, rank: int) -> str:
    """A rank-``rank`` peft adapter on every projection, random A and B (cached)."""
    if (out / "adapter_config.json").exists():
        return str(out)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                        target_modules=PROJECTIONS)
    get_peft_model(model, config).save_pretrained(out)
    return str(out)


def engine(base: str, pair: bool, num_seqs: int, rank: int, dtype: str):
    from vllm import LLM

    kwargs = {"additional_config": {"align": {"reference_model": base}}} if pair else {}
    return LLM(model=base, dtype=dtype, max_model_len=512, seed=0, max_num_seqs=num_seqs,
               enable_prefix_caching=False, enforce_eager=True, enable_lora=True,
               max_lora_rank=rank, max_loras=1, **kwargs)


def held_bytes(llm) -> int:
    """Unique parameter + buffer storage of the worker's model (shared storage once)."""
    def unique(worker):
        seen = {}
        for t in [*worker.model_runner.get_model().parameters(),
                  *worker.model_runner.get_model().buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    return llm.collective_rpc(unique)[0]


def main(argv=None) -> int:
    from bench_align import _prompts, add_model_args, bench_pair, write_report
    from bench_reference_rows import rate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    add_model_args(parser)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer
    from vllm import SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest

    _, base = bench_pair(args)      # the pair's reference checkpoint serves as the base
    adapter = make_adapter(base, Path(args.models_dir) / f"lora-r{args.rank}", args.rank)
    lora = LoRARequest("dpo", 1, adapter)
    inputs = [TokensPrompt(prompt_token_ids=p)
              for p in _prompts(AutoTokenizer.from_pretrained(base), args.prompts)]

    def params(spec):
        return SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True,
                              extra_args={"align": spec} if spec else None)

    stock = engine(base, False, args.prompts, args.rank, args.dtype)
    pair = engine(base, True, args.prompts, args.rank, args.dtype)
    runs = {"stock": (stock, params(None)),
            "dera": (pair, params({"method": "dera", "lambda": 0.5})),
            "none": (pair, params({"method": "none"}))}

    def timed(name):
        llm, sp = runs[name]
        return rate(_Lora(llm, lora), inputs, [sp] * len(inputs))

    for name in runs:
        timed(name)     # warm-up (and the adapter loaded into each engine)
    rates = {name: [] for name in runs}
    per_run = {name: [] for name in ("dera", "none")}
    for _ in range(args.repeats):
        before = timed("stock")
        rates["stock"].append(before)
        for name in per_run:
            rates[name].append(timed(name))
            after = timed("stock")
            rates["stock"].append(after)
            per_run[name].append(rates[name][-1] / ((before + after) / 2))
            before = after

    checkpoint = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
    adapter_file = sum(f.stat().st_size for f in Path(adapter).glob("*.safetensors"))
    held = {"stock LoRA engine": held_bytes(stock), "LoRA pair engine": held_bytes(pair)}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "config": vars(args),
        "eager": "both engines enforce_eager (vLLM's CPU backend turns compilation off "
                 "with LoRA)",
        "tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
        "ratio_median": {f"{k}/stock": round(statistics.median(v), 3)
                         for k, v in per_run.items()},
        "limit": {"dera/stock": 0.5, "none/stock": 1.0},
        "target": {"dera/stock": 0.45, "none/stock": 0.9},
        "weight_bytes": {
            **held,
            "base checkpoint": checkpoint,
            "adapter file": adapter_file,
            "full pair (two checkpoints)": 2 * checkpoint,
            "LoRA pair engine / full pair": round(held["LoRA pair engine"] / (2 * checkpoint),
                                                  3),
            "LoRA pair (base + adapter files) / full pair":
                round((checkpoint + adapter_file) / (2 * checkpoint), 3),
        },
    }
    write_report(report, args.json)
    return 0


class _Lora:
    """``llm`` whose ``generate`` gives every prompt ``lora`` (for ``rate``)."""

    def __init__(self, llm, lora):
        self.llm, self.lora = llm, lora

    def generate(self, inputs, params, **kwargs):
        return self.llm.generate(inputs, params, lora_request=self.lora, **kwargs)


if __name__ == "__main__":
    raise SystemExit(main())

"""`vllm-align train-mara` as a user runs it: the whole command, `--rollout engine` vs `hf`.

Each run is the command line in a fresh process (imports, prompt and reward loading, the
rollout's start-up, every rollout, the final checkpoint), timed from outside. Rollouts only
(``--learning-starts`` above the run's transitions), the benchmark model of
``bench_align.py`` (~118M Llama, built locally), 64 random-token prompts written as JSONL
text, a ``.py`` reward, ``--threads 2`` (both cores, for both rollouts), and no environment
variables beyond the caller's. The rollouts run in both orders, back to back
(hf, engine, hf); per-rollout times are the differences of ``metrics.csv``'s
``elapsed_s`` after the first rollout (which also pays the rollout's start-up).

Workloads (``--workload``, default both):

* ``issue``: issue 24's job, ``--episodes 128 --rollout-batch 16 --max-response-len 16
  --top-k 8`` (8 rollouts of 16 x 16 tokens);
* ``bench``: ``bench_rollout.py``'s default rollout, 64 episodes x 64 tokens, top-k 40,
  8 rollouts (``--episodes 512 --rollout-batch 64 --max-response-len 64``).

Usage: python benchmarks/bench_train_mara.py [--workload issue|bench] [--order hf,engine,hf]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = {
    "issue": ["--episodes", "128", "--rollout-batch", "16", "--max-response-len", "16",
              "--top-k", "8"],
    "bench": ["--episodes", "512", "--rollout-batch", "64", "--max-response-len", "64",
              "--top-k", "40"],
}
ORDER = ("hf", "engine", "hf")  # both orders, back to back: hf→engine and engine→hf
REWARD = "def score(prompt, response):\n    return len(set(response.split())) / 16.0\n"


def write_inputs(model: str, tmp: Path) -> tuple[Path, Path]:
    """The prompts (64 random-token prompts of bench_align, decoded) and the reward file."""
    from transformers import AutoTokenizer

    from bench_align import _prompts

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = tmp / "prompts.jsonl"
    with open(prompts, "w") as f:
        for ids in _prompts(tokenizer, 64):
            f.write(json.dumps({"prompt": tokenizer.decode(ids)}) + "\n")
    reward = tmp / "reward.py"
    reward.write_text(REWARD)
    return prompts, reward


def run_once(rollout: str, workload: str, model: str, prompts: Path, reward: Path,
             out: Path, env: dict) -> dict:
    cmd = [str(Path(sys.executable).with_name("vllm-align")), "train-mara", "--model", model,
           "--prompts", str(prompts), "--reward", f"{reward}:score", "--output-dir", str(out),
           *WORKLOADS[workload], "--threads", "2", "--learning-starts", "100000",
           "--no-progress", "--log-every", "1000", "--rollout", rollout]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    whole = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    with open(out / "metrics.csv") as f:
        elapsed = [float(row["elapsed_s"]) for row in csv.DictReader(f)]
    per = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return {"rollout": rollout, "whole_s": round(whole, 2), "trainer_s": round(elapsed[-1], 2),
            "first_rollout_s": round(elapsed[0], 2), "per_rollout_s": [round(s, 2) for s in per],
            "per_rollout_median_s": round(statistics.median(per), 3),
            "startup_s": round(whole - sum(per), 2), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2), "command": " ".join(cmd)}


def main(argv=None) -> int:
    from bench_align import add_model_args, bench_pair, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), action="append")
    parser.add_argument("--order", default=",".join(ORDER), help="the runs, comma-separated")
    add_model_args(parser)
    args = parser.parse_args(argv)
    model, _ = bench_pair(args)
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, "
                               f"{os.cpu_count()} cores", "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        prompts, reward = write_inputs(model, Path(tmp))
        # vLLM caches its inspection of the plugin's model class under VLLM_CACHE_ROOT, keyed
        # by the file's hash; a miss costs a subprocess importing vLLM (~10 s). A user's cache
        # is warm after the first run; on this shared machine other checkouts of the plugin
        # overwrite the shared entry, so the runs get their own cache, warmed (and timed) first.
        env = {**os.environ, "VLLM_CACHE_ROOT": str(Path(tmp) / "vllm-cache")}
        report["engine_first_run_cold_vllm_cache"] = run_once(
            "engine", "issue", model, prompts, reward, Path(tmp) / "cold", env)
        for workload in args.workload or ["issue", "bench"]:
            runs = [run_once(r, workload, model, prompts, reward, Path(tmp) / f"{workload}-{i}",
                             env) for i, r in enumerate(args.order.split(","))]
            whole = {r: statistics.mean(x["whole_s"] for x in runs if x["rollout"] == r)
                     for r in ("hf", "engine")}
            per = {r: statistics.median(s for x in runs if x["rollout"] == r
                                        for s in x["per_rollout_s"]) for r in ("hf", "engine")}
            report["workloads"][workload] = {
                "runs": runs,
                "whole_command_hf/engine": round(whole["hf"] / whole["engine"], 2),
                "per_rollout_hf/engine": round(per["hf"] / per["engine"], 2)}
            write_report(report, args.json)  # after each workload, in case a later one fails
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train a MARA agent on the toy politeness task and record its learning curve.

    python benchmarks/train_mara_toy.py [--out-dir .cache/mara-toy] [--docs docs/mara-training]

Copies the shipped toy world's models (``vllm_align.toy.shipped``; ``--world-dir`` for
another) into ``--out-dir``, trains a fresh agent there with ``vllm_align.toy.agent.ToySettings``,
decodes the 64 held-out prompts every way in ``vllm_align.cli.demo_runs.RUNS`` through the
engine (plain greedy and sampled decoding, MARA with the untrained and the trained agent),
and writes into ``--docs``:
``metrics.csv`` (one row per rollout), ``learning_curve.png`` and ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path
from statistics import fmean

from vllm_align.cli import demo_runs
from vllm_align.toy.agent import ToySettings, toy_agent
from vllm_align.toy.cache import cache_dir
from vllm_align.toy.shipped import ASSETS_DIR
from vllm_align.toy.world import polite_count, read_toy_world
from vllm_align.train.metrics import plot_curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(cache_dir("mara-toy")))
    parser.add_argument("--world-dir", default=str(ASSETS_DIR))
    parser.add_argument("--docs", default="docs/mara-training")
    args = parser.parse_args()
    out, docs = Path(args.out_dir), Path(args.docs)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    docs.mkdir(parents=True, exist_ok=True)
    settings = ToySettings()
    started = time.monotonic()
    for name in ("sft", "dpo", "stamp.json"):
        src = Path(args.world_dir) / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, out / name)
    agent = toy_agent(out, settings, log=print)
    llm = demo_runs.build_engine(agent)
    try:
        outputs = demo_runs.decode_runs(
            llm, read_toy_world(out).prompt_token_ids(llm.get_tokenizer()))
    finally:
        del llm
    wall = time.monotonic() - started
    shutil.copy(agent.metrics_csv, docs / "metrics.csv")
    words = demo_runs.mean_rewards(outputs, lambda text: polite_count("", text))
    r = {k: fmean(v) for k, v in words.items()}
    print("held-out mean polite words: " + "  ".join(f"{k} {v:.4f}" for k, v in r.items()))
    baselines = {f"held-out: {name} ({r[key]:.2f})": r[key] for name, key in (
        ("plain sampling", "plain sampling"), ("untrained MARA, sampled", "untrained sampled"),
        ("trained MARA, sampled", "trained sampled"))}
    plot_curve(docs / "metrics.csv", docs / "learning_curve.png",
               columns=("reward", "kl", "accept_rate"), baselines=baselines,
               title="MARA SAC on the toy politeness task (training rollouts: sampled decisions)")
    texts = {k: [o.text.strip() for o in reps[0]][:6] for k, reps in outputs.items()}
    samples = "\n".join(f"| {p} | {s} | {g} |" for p, s, g in zip(
        texts["plain greedy"], texts["trained sampled"], texts["trained greedy"]))
    repeats = f" ({len(demo_runs.SEEDS)} seeds)"
    table = "\n".join(f"| {run.label}{repeats if run.sampled else ''} | {r[k]:.3f} |"
                      for k, run in demo_runs.RUNS.items())
    settings_rows = "\n".join(f"| `{k}` | {v} |" for k, v in dataclasses.asdict(settings).items())
    stats = agent.stats
    (docs / "RESULTS.md").write_text(f"""# MARA SAC on the toy politeness task

`python benchmarks/train_mara_toy.py`: {wall:.0f} s wall on a shared 2-core CPU (training
{stats['train_seconds']:.0f} s: {stats['episodes']} episodes, {stats['transitions']} transitions,
{stats['updates']} SAC updates; rollouts in a vLLM engine serving the SFT model, the learner on one torch
thread; evaluation in one engine serving the SFT model with both agents).

LLM: the toy world's SFT model (`vllm_align/toy/world.py`). Reward R: the number of polite words in
the response (`vllm_align.toy.world:polite_count`), α_r = 1, no cost. Training prompts: 512 of the
world's training requests; evaluation: its 64 held-out prompts. Top-k 40, top-p 0.95, fallback
"last", response limit {settings.max_response_len} tokens, KL coefficient 0.1.

| decoding (64 held-out prompts) | mean polite words |
| --- | --- |
{table}

Sampled decisions are the policy SAC optimises (accept with probability P(accept)); greedy
decisions (accept when P(accept) > 0.5) are the served default. Why the untrained agent scores
high with greedy decisions: its P(accept) sits just under 0.5 almost everywhere, so greedily it
rejects every candidate and the fallback emits the last, least probable one, which in this world
is often the polite variant (with sampled decisions the same agent is plain-like).

![learning curve](learning_curve.png)

`metrics.csv`: one row per rollout of {settings.rollout_batch} training episodes (sampled
decisions): reward, KL, entropy, losses, acceptance rate, ... (columns: `vllm_align/train/metrics.py`).

Settings (`vllm_align.toy.agent.ToySettings`; the rest are `SACConfig`'s table-6 defaults):

| setting | value |
| --- | --- |
{settings_rows}

First held-out responses:

| plain greedy | trained MARA, sampled | trained MARA, greedy |
| --- | --- | --- |
{samples}
""")
    print(f"wrote {docs}/metrics.csv, learning_curve.png, RESULTS.md")


if __name__ == "__main__":
    main()

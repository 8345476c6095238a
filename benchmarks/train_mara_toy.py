"""Train a MARA agent on the toy politeness task and record its learning curve.

    python benchmarks/train_mara_toy.py [--out-dir .cache/mara-toy] [--docs docs/mara-training]

Uses the shipped toy world (``vllm_align.toy.shipped``; ``--world-dir`` for another), trains with ``vllm_align.toy.agent.ToySettings``,
evaluates plain greedy decoding, MARA with the untrained agent and MARA with
the trained agent on the 64 held-out prompts, and writes into ``--docs``:
``metrics.csv`` (one row per rollout), ``learning_curve.png`` and ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

from vllm_align.train.metrics import plot_curve
from vllm_align.toy.shipped import ASSETS_DIR
from vllm_align.toy.agent import ToySettings, run_toy
from vllm_align.toy.cache import cache_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(cache_dir("mara-toy")))
    parser.add_argument("--world-dir", default=str(ASSETS_DIR))
    parser.add_argument("--docs", default="docs/mara-training")
    args = parser.parse_args()
    out, docs = Path(args.out_dir), Path(args.docs)
    shutil.rmtree(out, ignore_errors=True)
    docs.mkdir(parents=True, exist_ok=True)
    settings = ToySettings()
    started = time.monotonic()
    res = run_toy(out, args.world_dir, settings)
    wall = time.monotonic() - started
    shutil.copy(res["result"].metrics_csv, docs / "metrics.csv")
    r = {k: v["reward"] for k, v in res["eval"].items()}
    baselines = {f"held-out: {name} ({r[key]:.2f})": r[key] for name, key in (
        ("plain sampling", "plain sampling"), ("untrained MARA, sampled", "untrained sampled"),
        ("trained MARA, sampled", "trained sampled"))}
    plot_curve(docs / "metrics.csv", docs / "learning_curve.png",
               columns=("reward", "kl", "accept_rate"), baselines=baselines,
               title="MARA SAC on the toy politeness task (training rollouts: sampled decisions)")
    ev = res["eval"]
    samples = "\n".join(f"| {p} | {s} | {g} |" for p, s, g in zip(
        ev["plain greedy"]["responses"][:6], ev["trained sampled"]["responses"][:6],
        ev["trained greedy"]["responses"][:6]))
    labels = {"plain greedy": "plain greedy decoding of the LLM",
              "plain sampling": "plain top-k/top-p sampling of the LLM (4 seeds)",
              "untrained sampled": "MARA, untrained agent, sampled decisions (4 seeds)",
              "trained sampled": "MARA, trained agent, sampled decisions (4 seeds)",
              "untrained greedy": "MARA, untrained agent, greedy decisions",
              "trained greedy": "MARA, trained agent, greedy decisions"}
    table = "\n".join(f"| {labels[k]} | {v['reward']:.3f} | "
                      f"{'-' if k.startswith('plain') else format(v['accept_rate'], '.2f')} |"
                      for k, v in ev.items())
    settings_rows = "\n".join(f"| `{k}` | {v} |" for k, v in dataclasses.asdict(settings).items())
    result = res["result"]
    (docs / "RESULTS.md").write_text(f"""# MARA SAC on the toy politeness task

`python benchmarks/train_mara_toy.py`: {wall:.0f} s wall on a shared 2-core CPU (training
{result.elapsed_s:.0f} s: {result.episodes} episodes, {result.transitions} transitions,
{result.updates} SAC updates; rollouts in a vLLM engine serving the SFT model, the learner on one torch
thread).

LLM: the toy world's SFT model (`vllm_align/toy/world.py`). Reward R: the number of polite words in
the response (`vllm_align.toy.world:polite_count`), α_r = 1, no cost. Training prompts: 512 of the
world's training requests; evaluation: its 64 held-out prompts. Top-k 40, top-p 0.95, fallback
"last", response limit {settings.max_response_len} tokens, KL coefficient 0.1.

| decoding (64 held-out prompts) | mean polite words | accept rate |
| --- | --- | --- |
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

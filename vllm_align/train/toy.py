"""A toy MARA task that trains in minutes on a CPU: politeness on the toy world's SFT model.

The LLM is the toy world's SFT model (``vllm_align.toy.world``): its answers
have four style slots (opener, two lead-ins, closer), each written plain or
polite; greedy decoding is polite in about 3% of the words. The reward is the
world's rule, the fraction of polite words in the response. Polite variants
are often among the top-k/top-p candidates but rarely first, so an agent that
learns to reject the plain openers/closers/lead-ins raises the reward; the KL
term keeps it from wandering into improbable text.

``run_toy`` trains on the world's training requests and evaluates on its 64
held-out prompts, greedy decisions (as served): plain greedy decoding of the
LLM, MARA with the untrained agent (the SAC actor at initialisation, same
seed) and MARA with the trained agent. ``benchmarks/train_mara_toy.py`` runs it
and writes the learning curve.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from statistics import fmean
from typing import Any, Optional

from vllm_align.toy import world as toy_world

DEFAULT_WORLD_DIR = Path(__file__).resolve().parents[2] / ".cache" / "toy-world"


def polite_reward(prompt: str, response: str) -> float:
    """R(x, y) = fraction of the response's words that are polite (the toy world's rule)."""
    return toy_world.polite_reward(response)


def train_records(seed: int = 0, num: int = 512) -> list[dict]:
    """``num`` distinct chat prompts from the world's training requests (never the held-out ones)."""
    seen: dict[str, None] = {}
    for prompt, _ in toy_world.toy_corpus(num * 4, seed=seed + 100):
        seen.setdefault(prompt, None)
        if len(seen) == num:
            break
    return [{"id": i, "messages": toy_world.chat_messages(p)} for i, p in enumerate(seen)]


def eval_records(seed: int = 0) -> list[dict]:
    return [{"id": f"eval-{i}", "messages": toy_world.chat_messages(p)}
            for i, p in enumerate(toy_world.eval_prompts(seed))]


@dataclasses.dataclass
class ToySettings:
    """The toy run: table-6 SAC except where a few minutes of CPU call for less."""

    episodes: int = 1536  # training episodes
    rollout_batch: int = 64
    batch_size: int = 256  # SAC batch (table 6: 1024; 256 is 4x cheaper on 2 cores)
    updates_per_step: float = 1.0
    learning_starts: int = 2048
    alpha_r: float = 10.0  # R is a fraction (~0.03 → 0.2); scaled against the KL term
    kl_coef: float = 0.1  # table 6
    max_response_len: int = 64  # toy answers are ~35 tokens
    target_entropy_ratio: float = 0.5
    init_alpha: float = 0.8  # table 6
    tau: float = 0.005  # table 6
    alpha_lr: float = 3e-4  # table 6
    seed: int = 0
    threads: int = 2
    num_train_prompts: int = 512

    def train_config(self, world_dir: Path, out_dir: Path, **overrides: Any):
        from vllm_align.train.config import SACConfig, TrainConfig

        sac = SACConfig(training_episodes=self.episodes, batch_size=self.batch_size,
                        updates_per_step=self.updates_per_step,
                        learning_starts=self.learning_starts, alpha_r=self.alpha_r,
                        kl_coef=self.kl_coef, max_response_len=self.max_response_len,
                        target_entropy_ratio=self.target_entropy_ratio, seed=self.seed,
                        init_alpha=self.init_alpha, alpha_lr=self.alpha_lr, tau=self.tau,
                        buffer_size=200_000)
        fields = dict(model=str(world_dir / "sft"), prompts=train_records(
            self.seed, self.num_train_prompts), output_dir=str(out_dir),
            reward="vllm_align.train.toy:polite_reward", sac=sac,
            rollout_batch=self.rollout_batch, checkpoint_every=512, threads=self.threads,
            progress=False, log_every=4)
        fields.update(overrides)
        return TrainConfig(**fields).validate()


def evaluate(model_path: str, agents: dict[str, Optional[dict]], *, seed: int = 0,
             max_response_len: int = 64, top_k: int = 40, top_p: float = 0.95) -> dict[str, Any]:
    """Mean polite reward on the 64 held-out prompts per agent (None = plain greedy decoding).

    Greedy decisions (accept when P(accept) > 0.5), fallback "last": the
    served rule. Returns {name: {"reward": mean, "responses": [...]}}.
    """
    from vllm_align.train.prompts import load_prompts
    from vllm_align.train.rewards import CallableScorer, TerminalReward
    from vllm_align.train.rollout import HFRollout, load_causal_lm

    model, tokenizer = load_causal_lm(model_path)
    prompts = load_prompts(eval_records(seed), tokenizer)
    rollout = HFRollout(model, tokenizer, TerminalReward(CallableScorer(polite_reward), None),
                        top_k=top_k, top_p=top_p, max_response_len=max_response_len)
    out = {}
    for name, state in agents.items():
        batch = rollout.collect(prompts, state, decisions="plain" if state is None else "greedy")
        out[name] = {"reward": fmean(e.reward for e in batch.episodes),
                     "accept_rate": (sum(e.num_accepts for e in batch.episodes)
                                     / max(1, sum(e.num_decisions for e in batch.episodes))),
                     "responses": [e.response for e in batch.episodes]}
    return out


def run_toy(out_dir: os.PathLike, world_dir: os.PathLike = DEFAULT_WORLD_DIR,
            settings: ToySettings = ToySettings(), log=print) -> dict[str, Any]:
    """Build/reuse the toy world, train an agent, evaluate plain / untrained / trained.

    Returns {"plain", "untrained", "trained": mean held-out reward, "result": TrainResult,
    "eval": the full evaluation}.
    """
    import torch

    from vllm_align.train.sac import SACState
    from vllm_align.train.trainer import train_mara

    world_dir, out_dir = Path(world_dir), Path(out_dir)
    toy_world.build_toy_world(world_dir, seed=0, log=log)
    torch.set_num_threads(settings.threads)
    cfg = settings.train_config(world_dir, out_dir)
    from transformers import AutoConfig

    d = AutoConfig.from_pretrained(cfg.model).hidden_size
    untrained = SACState.create(d, cfg.sac).actor.state_dict()  # the run's initial actor
    result = train_mara(cfg)
    trained = torch.load(result.checkpoint / "trainer.pt", weights_only=True)["sac"]["actor"]
    ev = evaluate(cfg.model, {"plain": None, "untrained": untrained, "trained": trained},
                  max_response_len=settings.max_response_len)
    summary = {k: v["reward"] for k, v in ev.items()}
    log(f"held-out mean polite reward: plain {summary['plain']:.4f}  "
        f"untrained MARA {summary['untrained']:.4f}  trained MARA {summary['trained']:.4f}")
    return {**summary, "result": result, "eval": ev}

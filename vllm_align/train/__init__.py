"""MARA trainer: discrete Soft Actor-Critic for accept/reject agents.

No serving code here, and vLLM only inside ``engine_rollout`` (imported when a
run rolls out in an engine): ``config`` (typed hyper-parameters, paper table 6
defaults, and the run's ``TrainConfig``), ``sac`` (networks and the standalone
update), ``replay`` (fixed-capacity replay buffer), ``rollout`` (the MDP: its
types, the rollout's configuration, its transitions), ``hf_rollout`` (the
batched HF reference rollout), ``engine_rollout`` (the same episodes in a vLLM
engine, the actor installed as its agent), ``terminal`` (the terminal reward
from the shared reward/cost scorers, ``data.rewards``), ``trainer`` (the loop,
checkpoints, metrics; the prompt order is ``data.prompts.PromptSampler``),
``distributed`` (Ray rollout workers).

Names are imported lazily, so ``vllm_align.train.config`` loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SACConfig": "config", "TrainConfig": "config",
    "ReplayBuffer": "replay",
    "Batch": "sac", "Critic": "sac", "MaraActor": "sac", "SACState": "sac",
    "critic_target": "sac", "polyak_update": "sac", "sac_update": "sac",
    "HFRollout": "hf_rollout", "Rollout": "rollout", "RolloutBatch": "rollout",
    "RolloutSpec": "rollout", "Episode": "rollout", "EngineRollout": "engine_rollout",
    "MaraTrainer": "trainer", "TrainResult": "trainer", "train_mara": "trainer",
    "load_scorer": "terminal", "TerminalReward": "terminal",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vllm_align.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vllm_align.train.{_EXPORTS[name]}"), name)

"""MARA trainer: discrete Soft Actor-Critic for accept/reject agents.

No serving code and no vLLM imports here: ``config`` (typed hyper-parameters,
paper table 6 defaults), ``sac`` (networks and the standalone update),
``replay`` (fixed-capacity replay buffer).
"""

from vllm_align.train.config import SACConfig
from vllm_align.train.replay import ReplayBuffer
from vllm_align.train.sac import (Batch, Critic, MaraActor, SACState, critic_target,
                                  polyak_update, sac_update)

__all__ = ["SACConfig", "ReplayBuffer", "Batch", "Critic", "MaraActor", "SACState",
           "critic_target", "polyak_update", "sac_update"]

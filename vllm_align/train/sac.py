"""Discrete Soft Actor-Critic for MARA accept/reject agents (no vLLM imports).

Action 0 = reject, action 1 = accept (the MARA agent's output index 1). The
actor is the MARA agent network itself, so a trained actor's ``state_dict()``
is the inference checkpoint (keys ``ln.*``, ``linear1.*``, ``linear2.*``,
``output_linear.*``). Its ``forward`` returns logits; ``softmax`` of them are
the agent's (reject, accept) probabilities.

``sac_update`` is one update with exact expectations over the two actions
(no action sampling anywhere):

* critic target  y = r + γ·(1−done)·Σ_a π(a|s')·[min(Q1', Q2')(s', a) − α·log π(a|s')]
* critic loss    MSE(Q1(s, a), y) + MSE(Q2(s, a), y) on the taken action a
* actor loss     Σ_a π(a|s)·[α·log π(a|s) − min(Q1, Q2)(s, a)]
* alpha loss     log α · (H(π(·|s)) − H_target)   (α falls while entropy is above target)
* targets        θ' ← (1−τ)·θ' + τ·θ after every update

``done`` marks the last transition of an episode (the response ended: EOS
accepted or the response limit reached). Its reward already holds the terminal
reward α_r·R − α_c·C added by the environment, and nothing is bootstrapped
past it; its ``next_state`` is ignored (any finite vector).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from vllm_align.mara.agent import WIDTHS, MaraAgent
from vllm_align.train.config import SACConfig


class MaraActor(MaraAgent):
    """The MARA agent network as SAC trains it: ``forward`` returns the logits over
    (reject, accept) ``[N, 2]`` (``MaraAgent.logits``), not probabilities.

    The inference agent applies softmax and accepts when P(accept) > 0.5, i.e.
    when logit[1] > logit[0]; ``state_dict()`` has the released checkpoints' keys.
    """

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.logits(state)


class Critic(MaraActor):
    """Q-network: state [N, d] → Q-values of (reject, accept) [N, 2]; the agent's network."""


class Batch(NamedTuple):
    """A batch of transitions; the replay buffer samples these."""

    state: torch.Tensor  # [N, d] float32
    action: torch.Tensor  # [N] int64 in {0, 1}
    reward: torch.Tensor  # [N] float32
    next_state: torch.Tensor  # [N, d] float32
    done: torch.Tensor  # [N] float32 in {0, 1}


BatchLike = Union[Batch, Mapping[str, torch.Tensor]]


def _as_batch(batch: BatchLike) -> Batch:
    if isinstance(batch, Batch):
        return batch
    return Batch(**{name: batch[name] for name in Batch._fields})


@dataclass
class SACState:
    """Everything a SAC learner owns: networks, entropy coefficient, optimisers, counters."""

    actor: nn.Module
    q1: nn.Module
    q2: nn.Module
    q1_target: nn.Module
    q2_target: nn.Module
    log_alpha: torch.Tensor  # scalar, requires_grad when α is tuned
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer  # over q1 and q2
    alpha_opt: torch.optim.Optimizer
    target_entropy: float  # nats
    num_updates: int = 0

    @classmethod
    def create(cls, state_dim: int, cfg: SACConfig, device: Union[str, torch.device] = "cpu",
               hidden: tuple[int, int] = WIDTHS) -> "SACState":
        """Fresh networks seeded by ``cfg.seed`` (the global RNG is left as it was)."""
        cfg.validate()
        if isinstance(state_dim, bool) or not isinstance(state_dim, int) or state_dim < 1:
            raise ValueError(f"state_dim must be a positive int, got {state_dim!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            actor = MaraActor(state_dim, hidden).to(device)
            q1 = Critic(state_dim, hidden).to(device)
            q2 = Critic(state_dim, hidden).to(device)
            q1_target = Critic(state_dim, hidden).to(device)
            q2_target = Critic(state_dim, hidden).to(device)
        q1_target.load_state_dict(q1.state_dict())
        q2_target.load_state_dict(q2.state_dict())
        for p in (*q1_target.parameters(), *q2_target.parameters()):
            p.requires_grad_(False)
        log_alpha = torch.tensor(math.log(cfg.init_alpha), device=device,
                                 requires_grad=cfg.autotune_entropy)
        return cls(
            actor=actor, q1=q1, q2=q2, q1_target=q1_target, q2_target=q2_target,
            log_alpha=log_alpha,
            actor_opt=torch.optim.Adam(actor.parameters(), lr=cfg.actor_lr),
            critic_opt=torch.optim.Adam([*q1.parameters(), *q2.parameters()], lr=cfg.critic_lr),
            alpha_opt=torch.optim.Adam([log_alpha], lr=cfg.alpha_lr),
            target_entropy=cfg.target_entropy,
        )

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (the actor's part is the inference checkpoint)."""
        return {
            "actor": self.actor.state_dict(),
            "q1": self.q1.state_dict(), "q2": self.q2.state_dict(),
            "q1_target": self.q1_target.state_dict(), "q2_target": self.q2_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict(),
            "target_entropy": self.target_entropy,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        for name in ("actor", "q1", "q2", "q1_target", "q2_target"):
            getattr(self, name).load_state_dict(sd[name])
        with torch.no_grad():
            self.log_alpha.copy_(sd["log_alpha"])
        # Optimizer.load_state_dict keeps the given state tensors (no copy): copy them so
        # that loading from a live state_dict does not alias the two learners' moments.
        self.actor_opt.load_state_dict(copy.deepcopy(sd["actor_opt"]))
        self.critic_opt.load_state_dict(copy.deepcopy(sd["critic_opt"]))
        self.alpha_opt.load_state_dict(copy.deepcopy(sd["alpha_opt"]))
        self.target_entropy = float(sd["target_entropy"])
        self.num_updates = int(sd["num_updates"])


@torch.no_grad()
def critic_target(state: SACState, batch: BatchLike, gamma: float) -> torch.Tensor:
    """y = r + γ(1−done)·Σ_a π(a|s')[min(Q1',Q2')(s',a) − α log π(a|s')], shape [N]."""
    b = _as_batch(batch)
    alpha = state.log_alpha.detach().exp()
    next_logp = F.log_softmax(state.actor(b.next_state), dim=-1)
    next_q = torch.min(state.q1_target(b.next_state), state.q2_target(b.next_state))
    next_v = (next_logp.exp() * (next_q - alpha * next_logp)).sum(dim=-1)
    return b.reward + gamma * (1.0 - b.done) * next_v


def _clip(params, max_norm: Optional[float]) -> torch.Tensor:
    """Clip to ``max_norm`` (None: don't); returns the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(list(params), math.inf if max_norm is None else max_norm)


@torch.no_grad()
def polyak_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    """target ← (1−τ)·target + τ·online for parameters; buffers (none in these nets) are copied."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o, tau)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


def sac_update(state: SACState, batch: BatchLike, cfg: SACConfig) -> dict[str, float]:
    """One discrete SAC update (critics, actor, α, targets) on ``batch``; returns metrics.

    ``batch`` holds state [N, d], action [N] (0 reject / 1 accept), reward [N],
    next_state [N, d] and done [N] (1 on the last transition of an episode).
    """
    b = _as_batch(batch)
    action = b.action.long().view(-1, 1)
    reward = b.reward.float().view(-1)
    done = b.done.float().view(-1)
    b = Batch(b.state, action, reward, b.next_state, done)
    alpha = state.log_alpha.detach().exp()

    # --- critics ------------------------------------------------------------
    y = critic_target(state, b, cfg.gamma)
    q1_all = state.q1(b.state)
    q2_all = state.q2(b.state)
    q1_a = q1_all.gather(1, action).squeeze(1)
    q2_a = q2_all.gather(1, action).squeeze(1)
    q1_loss = F.mse_loss(q1_a, y)
    q2_loss = F.mse_loss(q2_a, y)
    critic_loss = q1_loss + q2_loss
    state.critic_opt.zero_grad(set_to_none=True)
    critic_loss.backward()
    q1_gn = _clip(state.q1.parameters(), cfg.max_grad_norm)
    q2_gn = _clip(state.q2.parameters(), cfg.max_grad_norm)
    state.critic_opt.step()

    # --- actor (against the freshly updated critics) -------------------------
    logp = F.log_softmax(state.actor(b.state), dim=-1)
    probs = logp.exp()
    with torch.no_grad():
        min_q = torch.min(state.q1(b.state), state.q2(b.state))
    actor_loss = (probs * (alpha * logp - min_q)).sum(dim=-1).mean()
    state.actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()
    actor_gn = _clip(state.actor.parameters(), cfg.max_grad_norm)
    state.actor_opt.step()

    # --- entropy coefficient ---------------------------------------------------
    entropy = -(probs.detach() * logp.detach()).sum(dim=-1)
    alpha_loss = state.log_alpha * (entropy.mean() - state.target_entropy)
    if cfg.autotune_entropy:
        state.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        state.alpha_opt.step()

    # --- targets -----------------------------------------------------------------
    polyak_update(state.q1, state.q1_target, cfg.tau)
    polyak_update(state.q2, state.q2_target, cfg.tau)
    state.num_updates += 1

    return {
        "critic_loss": float(critic_loss.detach()),
        "q1_loss": float(q1_loss.detach()),
        "q2_loss": float(q2_loss.detach()),
        "actor_loss": float(actor_loss.detach()),
        "alpha_loss": float(alpha_loss.detach()),
        "alpha": state.alpha,
        "entropy": float(entropy.mean()),
        "mean_q": float(((q1_a + q2_a) / 2).detach().mean()),
        "target_q": float(y.mean()),
        "accept_prob": float(probs.detach()[:, 1].mean()),
        "critic_grad_norm": float(torch.max(q1_gn, q2_gn)),
        "actor_grad_norm": float(actor_gn),
    }

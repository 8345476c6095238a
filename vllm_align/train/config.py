"""Typed configuration of the MARA SAC trainer.

Defaults are the MARA paper's appendix table 6 wherever the table gives a
value; the rest (entropy target, gradient clipping, learning starts, ...) are
ours and documented where they are defined. ``SACConfig.validate()`` raises
``ValueError`` naming the field and the bad value.

Target entropy. The paper sets the entropy threshold to 2 "based on the action
space dimension", but a two-action policy has at most log 2 ≈ 0.693 nats of
entropy: a target of 2 can never be met, and automatic tuning would raise the
entropy coefficient without bound. We therefore express the target as a
fraction of the maximum, ``target_entropy = target_entropy_ratio · log 2``
(the usual discrete-SAC convention). The default 0.5 (≈ 0.347 nats, the entropy
of a 0.89/0.11 accept decision) keeps exploration alive while letting the
agent become clearly decisive: at inference the agent is read greedily
(accept when P(accept) > 0.5), so only the side of 0.5 matters there, but the
KL token reward depends on the accept probabilities themselves.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class SACConfig:
    """Hyper-parameters of discrete SAC for MARA accept/reject agents."""

    # --- paper, table 6 -------------------------------------------------
    batch_size: int = 1024  # transitions per SAC update (table 6)
    actor_lr: float = 3e-4  # Adam learning rate of the actor, i.e. the MARA agent (table 6)
    critic_lr: float = 3e-4  # Adam learning rate of both critics (table 6)
    alpha_lr: float = 3e-4  # Adam learning rate of log(entropy coefficient) (table 6)
    gamma: float = 0.99  # discount factor (table 6)
    tau: float = 0.005  # Polyak rate of the target critics: target ← (1−τ)·target + τ·online (table 6)
    buffer_size: int = 1_000_000  # replay buffer capacity in transitions (table 6)
    kl_coef: float = 0.1  # λ of the token reward −λ·(log π_θ(t) − log π_ref(t)) (table 6)
    max_response_len: int = 512  # response limit in tokens; reaching it ends the episode (table 6)
    top_k: int = 40  # candidate top-k, as at inference (released scripts; table 6 says 50)
    top_p: float = 0.95  # candidate top-p (nucleus), as at inference (table 6)
    init_alpha: float = 0.8  # initial entropy coefficient α (table 6)
    training_episodes: int = 20_000  # episodes (responses) to roll out in total (table 6)

    # --- entropy ------------------------------------------------------------
    autotune_entropy: bool = True  # learn α so the policy entropy tracks the target (else α fixed)
    target_entropy_ratio: float = 0.5  # target entropy as a fraction of log 2, in [0, 1) (module doc)

    # --- ours ----------------------------------------------------------------
    max_grad_norm: Optional[float] = 10.0  # clip each network's gradient norm to this; None = no clipping
    learning_starts: int = 10_000  # transitions in the buffer before the first update
    updates_per_step: int = 1  # SAC updates per environment step (one batched rollout step)
    seed: int = 0  # seed of network initialisation, replay sampling and rollouts
    alpha_r: float = 1.0  # weight of the reward model in the terminal reward α_r·R − α_c·C
    alpha_c: float = 1.0  # weight of the cost model in the terminal reward α_r·R − α_c·C
    num_workers: int = 1  # rollout workers; 1 = single process, > 1 = Ray actors
    buffer_fp16: bool = False  # store replay states as float16 (half the memory; sampled as float32)

    @property
    def target_entropy(self) -> float:
        """Target policy entropy in nats: ``target_entropy_ratio · log 2``."""
        return self.target_entropy_ratio * math.log(2.0)

    def validate(self) -> "SACConfig":
        """Check every field; raise ``ValueError`` naming the first bad one. Returns self."""
        _int(self, "batch_size", lo=1)
        _int(self, "buffer_size", lo=1)
        _int(self, "max_response_len", lo=1)
        _int(self, "top_k", lo=1)
        _int(self, "training_episodes", lo=1)
        _int(self, "learning_starts", lo=0)
        _int(self, "updates_per_step", lo=1)
        _int(self, "num_workers", lo=1)
        _int(self, "seed", lo=0)
        for name in ("actor_lr", "critic_lr", "alpha_lr", "init_alpha"):
            _float(self, name, lo=0.0, lo_open=True)
        _float(self, "gamma", lo=0.0, hi=1.0)
        _float(self, "tau", lo=0.0, hi=1.0, lo_open=True)
        _float(self, "top_p", lo=0.0, hi=1.0, lo_open=True)
        _float(self, "kl_coef", lo=0.0)
        _float(self, "alpha_r", lo=0.0)
        _float(self, "alpha_c", lo=0.0)
        _float(self, "target_entropy_ratio", lo=0.0, hi=1.0, hi_open=True)
        if self.max_grad_norm is not None:
            _float(self, "max_grad_norm", lo=0.0, lo_open=True)
        for name in ("autotune_entropy", "buffer_fp16"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SACConfig.{name} must be a bool, got {getattr(self, name)!r}")
        return self

    def replace(self, **changes: Any) -> "SACConfig":
        """A copy with ``changes`` applied, validated."""
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SACConfig":
        """Build from a plain dict (e.g. a checkpoint); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SACConfig: unknown field(s) {', '.join(map(repr, unknown))}")
        return cls(**data).validate()


def _int(cfg: SACConfig, name: str, lo: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"SACConfig.{name} must be an int, got {value!r}")
    if value < lo:
        raise ValueError(f"SACConfig.{name} must be >= {lo}, got {value!r}")


def _float(cfg: SACConfig, name: str, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"SACConfig.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"SACConfig.{name} must be finite, got {value!r}")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ValueError(f"SACConfig.{name} must be in {left}{lo_s}, {hi_s}{right}, got {value!r}")

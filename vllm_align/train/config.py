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
import os
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
    updates_per_step: float = 1  # SAC updates per environment step (TrainConfig.rollout_batch transitions); may be fractional
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
        _int(self, "num_workers", lo=1)
        _int(self, "seed", lo=0)
        for name in ("actor_lr", "critic_lr", "alpha_lr", "init_alpha"):
            _float(self, name, lo=0.0, lo_open=True)
        _float(self, "gamma", lo=0.0, hi=1.0)
        _float(self, "tau", lo=0.0, hi=1.0, lo_open=True)
        _float(self, "top_p", lo=0.0, hi=1.0, lo_open=True)
        _float(self, "kl_coef", lo=0.0)
        _float(self, "updates_per_step", lo=0.0, lo_open=True)
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


# ---------------------------------------------------------------------------
# The training run
# ---------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """A MARA training run: the LLM, prompts, reward sources, SAC settings, bookkeeping.

    ``reward`` and ``cost`` are ``vllm_align.train.rewards.load_scorer`` specs:
    a Hugging Face sequence-classification directory with a 1-output score
    head, ``MODULE:FUNCTION`` / ``FILE.py:FUNCTION`` naming
    ``fn(prompt, response) -> float``, or such a callable. The terminal reward
    is ``sac.alpha_r·R − sac.alpha_c·C``.
    """

    model: str  # the LLM (HF checkpoint): candidates, π_ref and the agent's state come from it
    prompts: Any  # JSONL file ('prompt' or chat 'messages'), a `datasets` directory, or a list
    output_dir: str  # checkpoints, agent.safetensors, metrics.csv
    reward: Any = None  # R(x, y): reward model directory, MODULE:FN, FILE.py:FN or callable
    cost: Any = None  # C(x, y): same kinds; None = no cost
    sac: SACConfig = dataclasses.field(default_factory=SACConfig)  # SAC/MDP hyper-parameters
    rollout_batch: int = 64  # episodes rolled out together (per worker); one environment step = this many transitions
    checkpoint_every: int = 1000  # episodes between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    save_replay: bool = False  # put the replay buffer in checkpoints (exact resume; large)
    resume: bool = False  # continue from the newest checkpoint in output_dir
    dtype: str = "float32"  # LLM dtype; states are stored and fed to the agent as float32
    device: str = "cpu"  # device of the LLM, the reward models and the learner
    threads: Optional[int] = None  # torch threads per process (None: torch's default)
    reward_batch_size: int = 16  # pairs per reward/cost model forward
    progress: bool = True  # tqdm progress bar
    log_every: int = 10  # a console metrics line every this many rollouts
    tensorboard: bool = False  # also log to output_dir/tensorboard (needs the tensorboard package)

    def validate(self) -> "TrainConfig":
        """Check every field; raise ``ValueError`` naming the first bad one. Returns self."""
        if not isinstance(self.sac, SACConfig):
            raise ValueError(f"TrainConfig.sac must be a SACConfig, got {self.sac!r:.80}")
        self.sac.validate()
        for name in ("model", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
                raise ValueError(f"TrainConfig.{name} must be a non-empty path, got {value!r}")
        if not isinstance(self.prompts, (str, os.PathLike, list, tuple)) or \
                (isinstance(self.prompts, (list, tuple)) and not self.prompts):
            raise ValueError("TrainConfig.prompts must be a JSONL path, a datasets directory or "
                             f"a non-empty list, got {self.prompts!r:.80}")
        for name in ("reward", "cost"):
            value = getattr(self, name)
            if value is not None and not callable(value) and not (
                    isinstance(value, (str, os.PathLike)) and os.fspath(value)):
                raise ValueError(f"TrainConfig.{name} must be None, a path/spec string or a "
                                 f"callable, got {value!r}")
        if self.reward is None and self.cost is None:
            raise ValueError("TrainConfig needs a reward or a cost source (reward=..., cost=...); "
                             "both are None")
        for name in ("rollout_batch", "checkpoint_every", "keep_checkpoints",
                     "reward_batch_size", "log_every"):
            _int(self, name, lo=1)
        if self.threads is not None:
            _int(self, "threads", lo=1)
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"TrainConfig.device must be a device string, got {self.device!r}")
        for name in ("save_replay", "resume", "progress", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be a bool, got {getattr(self, name)!r}")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this run (JSON-able).

        Everything that changes the learning problem or its state: the LLM,
        prompts, reward sources and the SAC settings except the episode budget
        and the number of workers (a run may be extended or re-scaled).
        """
        sac = {k: v for k, v in self.sac.to_dict().items()
               if k not in ("training_episodes", "num_workers")}
        return {"model": os.fspath(self.model), "prompts": _spec_name(self.prompts),
                "reward": _spec_name(self.reward), "cost": _spec_name(self.cost),
                "rollout_batch": self.rollout_batch, "dtype": self.dtype, "sac": sac}


def _spec_name(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return f"<list of {len(value)}>"
    return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', repr(value))}"

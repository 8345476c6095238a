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
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from vllm_align.fields import option


@dataclass
class SACConfig:
    """Hyper-parameters of discrete SAC for MARA accept/reject agents."""

    # --- paper, table 6 -------------------------------------------------
    batch_size: int = option(1024, "transitions per SAC update (table 6)")
    actor_lr: float = option(3e-4, "Adam learning rate of the actor, i.e. the MARA agent "
                                   "(table 6)")
    critic_lr: float = option(3e-4, "Adam learning rate of both critics (table 6)")
    alpha_lr: float = option(3e-4, "Adam learning rate of log(entropy coefficient) (table 6)")
    gamma: float = option(0.99, "discount factor (table 6)")
    tau: float = option(0.005, "Polyak rate of the target critics: "
                               "target ← (1−τ)·target + τ·online (table 6)")
    buffer_size: int = option(1_000_000, "replay buffer capacity in transitions (table 6)")
    kl_coef: float = option(0.1, "λ of the token reward −λ·(log π_θ(t) − log π_ref(t)) (table 6)")
    max_response_len: int = option(512, "response limit in tokens; reaching it ends the "
                                        "episode (table 6)")
    top_k: int = option(40, "candidate top-k, as at inference (released scripts; table 6 "
                            "says 50)")
    top_p: float = option(0.95, "candidate top-p (nucleus), as at inference (table 6)")
    init_alpha: float = option(0.8, "initial entropy coefficient α (table 6)")
    training_episodes: int = option(20_000, "episodes (responses) to roll out in total "
                                            "(table 6)", flag="--episodes")

    # --- entropy ------------------------------------------------------------
    autotune_entropy: bool = option(True, "keep the entropy coefficient fixed at "
                                          "--init-alpha (default: learn α so the policy "
                                          "entropy tracks the target)")
    target_entropy_ratio: float = option(0.5, "target entropy as a fraction of log 2, in "
                                              "[0, 1) (module doc)")

    # --- ours ----------------------------------------------------------------
    max_grad_norm: Optional[float] = option(10.0, "clip each network's gradient norm to this "
                                                  "(None in the API: no clipping)")
    learning_starts: int = option(10_000, "transitions in the buffer before the first update")
    updates_per_step: float = option(1, "SAC updates per environment step (rollout-batch "
                                        "transitions); may be fractional")
    seed: int = option(0, "seed of network initialisation, replay sampling, prompt order "
                          "and rollouts")
    alpha_r: float = option(1.0, "weight of R in the terminal reward α_r·R − α_c·C")
    alpha_c: float = option(1.0, "weight of C in the terminal reward α_r·R − α_c·C")
    num_workers: int = option(1, "rollout workers; 1 = single process, > 1 = Ray actors")
    buffer_fp16: bool = option(False, "store replay states as float16 (half the memory; "
                                      "sampled as float32)")

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
ROLLOUTS = ("engine", "hf")


@dataclass
class TrainConfig:
    """A MARA training run: the LLM, prompts, reward sources, SAC settings, bookkeeping.

    Each field's default and help are written once, in ``option(...)``:
    ``vllm-align train-mara`` generates its flags from them (``vllm_align.fields``).
    ``reward`` and ``cost`` are ``vllm_align.data.rewards.load_reward`` specs:
    a Hugging Face sequence-classification directory with a 1-output score
    head, ``MODULE:FUNCTION`` / ``FILE.py:FUNCTION`` naming
    ``fn(prompt, response) -> float``, or such a callable. The terminal reward
    is ``sac.alpha_r·R − sac.alpha_c·C``.
    """

    model: str = option(help="the LLM (Hugging Face checkpoint): candidates, π_ref and the "
                             "agent's state come from it")
    prompts: Any = option(help="JSONL ('prompt' or chat 'messages' per line), a `datasets` "
                               "directory, or (API) a list", metavar="PATH")
    output_dir: str = option(help="checkpoints/, agent.safetensors (the trained agent), "
                                  "metrics.csv")
    reward: Any = option(None, "R(x, y): a sequence-classification model (1-output score head; "
                               "chat-template input, vllm_align.data.rewards), or "
                               "MODULE:FUNCTION / FILE.py:FUNCTION with fn(prompt, response) -> "
                               "float (or, API, the callable)", metavar="SPEC")
    cost: Any = option(None, "C(x, y), same kinds as --reward; none = no cost", metavar="SPEC")
    sac: SACConfig = option(default_factory=SACConfig, cli=False)  # SAC/MDP hyper-parameters
    rollout_batch: int = option(64, "episodes rolled out together per worker; one "
                                    "environment step = this many transitions")
    checkpoint_every: int = option(1000, "episodes between checkpoints (one is always "
                                         "written at the end)")
    keep_checkpoints: int = option(2, "newest checkpoints kept on disk")
    save_replay: bool = option(False, "include the replay buffer in checkpoints (exact "
                                      "resume; large)")
    resume: bool = option(False, "continue from the newest checkpoint in --output-dir")
    dtype: str = option("float32", "LLM dtype; states are stored and fed to the agent as "
                                   "float32", choices=DTYPES)
    device: str = option("cpu", "device of the LLM, the reward models and the learner")
    rollout: str = option("engine", "where episodes are rolled out: 'engine' (a vLLM engine "
                                    "serving --model, the actor installed as its MARA agent) "
                                    "or 'hf' (the PyTorch/HF reference); the same transitions",
                          choices=ROLLOUTS)
    engine_args: Optional[dict] = option(None, "vLLM engine arguments of the rollout engine, "
                                               "as JSON, e.g. '{\"enforce_eager\": true}'",
                                         parse=json.loads, metavar="JSON")
    threads: Optional[int] = option(None, "torch threads per process (None: torch's default)")
    reward_batch_size: int = option(16, "pairs per reward/cost model forward")
    progress: bool = option(True, "no progress bar")
    log_every: int = option(10, "a console metrics line every N rollouts")
    tensorboard: bool = option(False, "also log to OUTPUT_DIR/tensorboard (needs the "
                                      "tensorboard package)")

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
        if self.rollout not in ROLLOUTS:
            raise ValueError(f"TrainConfig.rollout must be one of {list(ROLLOUTS)}, got "
                             f"{self.rollout!r}")
        if self.engine_args is not None and not (
                isinstance(self.engine_args, dict) and all(isinstance(k, str)
                                                           for k in self.engine_args)):
            raise ValueError("TrainConfig.engine_args must be a dict of vLLM engine arguments, "
                             f"got {self.engine_args!r:.80}")
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

"""The MARA training loop: rollouts → replay buffer → discrete SAC updates → checkpoints.

One learner owns the SAC state (actor = the MARA agent, twin critics and
targets, α) and the replay buffer. Rollouts come from ``Rollout.collect``:
in-process by default, or from Ray actors (``sac.num_workers > 1``,
``vllm_align.train.distributed``) that each hold a copy of the LLM and receive
the learner's newest actor weights with every request.

Per rollout batch of ``rollout_batch`` episodes with N transitions, the learner
adds them to the buffer and, once it holds ``learning_starts`` transitions,
runs ``updates_per_step · N / rollout_batch`` SAC updates (fractions carry
over): one "environment step" is one decision of each of ``rollout_batch``
episodes. With the table-6 batch of 1024 and 64 episodes per rollout each
transition is replayed about 16 times.

Reproducibility: networks, replay sampling, the prompt order and every
rollout's decisions are seeded from ``sac.seed`` (rollout r uses
``seed·1_000_003 + r``), so a single-process run that resumes from a
checkpoint with its replay buffer repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from vllm_align.train import checkpoint as ckpt
from vllm_align.train.config import TrainConfig
from vllm_align.train.metrics import MetricsLog, console_line, mean_sac, rollout_stats
from vllm_align.data.prompts import Prompt, PromptSampler, load_prompts
from vllm_align.train.replay import ReplayBuffer
from vllm_align.train.rollout import Rollout, RolloutBatch, RolloutSpec
from vllm_align.train.sac import SACState, sac_update

FORMAT_VERSION = 1


class TrainError(ValueError):
    """A run that cannot start or resume as asked (one line naming the problem)."""


@dataclass
class TrainResult:
    agent_path: Path  # output_dir/agent.safetensors, the trained agent (load_agent)
    checkpoint: Path  # the final checkpoint directory
    metrics_csv: Path
    episodes: int
    transitions: int
    updates: int
    elapsed_s: float
    last_rows: list = field(default_factory=list)  # the final metric rows


def rollout_seed(seed: int, rollout_index: int) -> int:
    return seed * 1_000_003 + rollout_index


class MaraTrainer:
    """Trains a MARA agent with discrete SAC (see the module doc).

    Args:
        cfg: the run; validated here.
        rollout: an in-process environment to use instead of building an
            ``cfg.rollout`` from ``cfg`` (single process only).
        prompts: already-encoded prompts to use instead of reading ``cfg.prompts``.
    """

    def __init__(self, cfg: TrainConfig, rollout: Optional[Rollout] = None,
                 prompts: Optional[list[Prompt]] = None) -> None:
        self.cfg = cfg.validate()
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self._rollout = rollout
        self._prompts = prompts

    # -- setup --------------------------------------------------------------------

    def _load_prompts(self) -> list[Prompt]:
        if self._prompts is not None:
            return self._prompts
        from transformers import AutoTokenizer

        return load_prompts(self.cfg.prompts, AutoTokenizer.from_pretrained(str(self.cfg.model)))

    def _hidden_size(self) -> int:
        if self._rollout is not None:
            return int(self._rollout.hidden_size)
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(str(self.cfg.model)).hidden_size)

    def _start(self) -> Optional[Path]:
        """Prepare output_dir; return the checkpoint to resume from, if any."""
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_temporary(self.ckpt_root)
        found = ckpt.latest(self.ckpt_root)
        if found is not None and not self.cfg.resume:
            raise TrainError(f"{self.out} already holds checkpoints (newest {found.name}); pass "
                             "--resume to continue that run or choose another --output-dir")
        if self.cfg.resume and found is None:
            print(f"train-mara: no checkpoint in {self.ckpt_root}; starting a new run",
                  file=sys.stderr)
        return found if self.cfg.resume else None

    def _counters(self) -> dict[str, Any]:
        return {"episodes": self.episodes, "transitions": self.transitions,
                "rollouts": self.rollouts, "update_credit": self.update_credit,
                "prompt_position": self.sampler.position, "elapsed_s": self._elapsed()}

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.t0)

    # -- checkpoints ----------------------------------------------------------------

    def save(self) -> Path:
        state = {"format": FORMAT_VERSION, "sac": self.sac.state_dict(),
                 "counters": self._counters(),
                 "fingerprint": json.dumps(self.cfg.fingerprint(), sort_keys=True)}
        replay = self.buffer.state_dict() if self.cfg.save_replay else None
        path = ckpt.write(self.ckpt_root, self.episodes, actor=self.sac.actor, trainer=state,
                          replay=replay, keep=self.cfg.keep_checkpoints)
        ckpt.publish_agent(self.sac.actor, self.out / "agent.safetensors")
        self.last_checkpoint = path
        return path

    def _restore(self, path: Path) -> None:
        state, replay = ckpt.read(path)
        if state.get("format") != FORMAT_VERSION:
            raise TrainError(f"{path}: checkpoint format {state.get('format')!r}, this trainer "
                             f"reads {FORMAT_VERSION}")
        saved = json.loads(state["fingerprint"])
        now = json.loads(json.dumps(self.cfg.fingerprint(), sort_keys=True))
        if saved != now:
            diff = _diff(saved, now)
            raise TrainError(f"cannot resume {path}: it was made with other settings ({diff}); "
                             "use the same settings or another --output-dir")
        self.sac.load_state_dict(state["sac"])
        c = state["counters"]
        self.episodes, self.transitions = int(c["episodes"]), int(c["transitions"])
        self.rollouts, self.update_credit = int(c["rollouts"]), float(c["update_credit"])
        self.sampler.position = int(c["prompt_position"])
        self.elapsed_before = float(c["elapsed_s"])
        if replay is not None:
            self.buffer.load_state_dict(replay)
        self.last_checkpoint = path

    # -- the loop ----------------------------------------------------------------------

    def consume(self, batch: RolloutBatch) -> dict[str, Any]:
        """Add one rollout batch to the buffer, run the SAC updates it pays for, log."""
        cfg, sac_cfg = self.cfg, self.cfg.sac
        t = batch.transitions
        if len(batch):
            self.buffer.add_batch(t.state, t.action, t.reward, t.next_state, t.done)
        self.episodes += len(batch.episodes)
        self.transitions += len(batch)
        metrics = []
        if len(self.buffer) >= sac_cfg.learning_starts:
            self.update_credit += sac_cfg.updates_per_step * len(batch) / cfg.rollout_batch
            todo = int(self.update_credit)
            self.update_credit -= todo
            for _ in range(todo):
                metrics.append(sac_update(self.sac, self.buffer.sample(sac_cfg.batch_size,
                                                                       self.device), sac_cfg))
        row = {"episodes": self.episodes, "transitions": self.transitions,
               "updates": self.sac.num_updates, "elapsed_s": self._elapsed(),
               "buffer_size": len(self.buffer), **rollout_stats(batch), **mean_sac(metrics)}
        if not metrics:
            row["alpha"] = self.sac.alpha
        self.log.write(row)
        self.rows.append(row)
        return row

    def actor_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").clone() for k, v in self.sac.actor.state_dict().items()}

    def _report(self, row: dict, bar) -> None:
        if bar is not None:
            bar.update(row["episodes"] - bar.n)
            bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.2f}",
                            acc=f"{row['accept_rate']:.2f}", refresh=False)
        if len(self.rows) % self.cfg.log_every == 0:
            (bar.write if bar is not None else print)(console_line(row))

    def maybe_checkpoint(self, since: int) -> int:
        every = self.cfg.checkpoint_every
        if self.episodes // every > since // every:
            self.save()
            return self.episodes
        return since

    def train(self) -> TrainResult:
        cfg, sac_cfg = self.cfg, self.cfg.sac
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        resume_from = self._start()
        self.device = torch.device(cfg.device)
        prompts = self._load_prompts()
        d = self._hidden_size()
        self.sac = SACState.create(d, sac_cfg, device=self.device)
        self.buffer = ReplayBuffer(sac_cfg.buffer_size, d, fp16=sac_cfg.buffer_fp16,
                                   seed=sac_cfg.seed)
        self.sampler = PromptSampler(len(prompts), sac_cfg.seed)
        self.episodes = self.transitions = self.rollouts = 0
        self.update_credit, self.elapsed_before = 0.0, 0.0
        self.last_checkpoint: Optional[Path] = None
        if resume_from is not None:
            self._restore(resume_from)
        self.t0 = time.monotonic()
        self.rows: list[dict] = []
        self.log = MetricsLog(self.out / "metrics.csv",
                              keep_until=self.episodes if resume_from is not None else None,
                              tensorboard_dir=self.out / "tensorboard" if cfg.tensorboard else None)
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=sac_cfg.training_episodes, initial=self.episodes, unit="ep",
                       desc="train-mara", dynamic_ncols=True)
        try:
            if sac_cfg.num_workers > 1:
                from vllm_align.train.distributed import run_workers

                # distributed.py drives this trainer through its methods only.
                run_workers(self, prompts, lambda row: self._report(row, bar))
            else:
                self._run_local(prompts, bar)
            if self.last_checkpoint is None or \
                    self.last_checkpoint.name != f"{ckpt.PREFIX}{self.episodes:09d}":
                self.save()
        finally:
            self.log.close()
            if bar is not None:
                bar.close()
        return TrainResult(agent_path=self.out / "agent.safetensors",
                           checkpoint=self.last_checkpoint, metrics_csv=self.out / "metrics.csv",
                           episodes=self.episodes, transitions=self.transitions,
                           updates=self.sac.num_updates, elapsed_s=self._elapsed(),
                           last_rows=self.rows[-5:])

    def next_rollout_seed(self) -> int:
        """The seed of the next rollout handed out (counts it)."""
        self.rollouts += 1
        return rollout_seed(self.cfg.sac.seed, self.rollouts - 1)

    def next_prompts(self, prompts: list[Prompt], handed_out: int) -> list[Prompt]:
        n = min(self.cfg.rollout_batch, self.cfg.sac.training_episodes - handed_out)
        return [prompts[i] for i in self.sampler.take(n)]

    def _run_local(self, prompts: list[Prompt], bar) -> None:
        from vllm_align.train.engine_rollout import open_rollout

        rollout = self._rollout or open_rollout(RolloutSpec.from_config(self.cfg, prompts))
        since = self.episodes
        while self.episodes < self.cfg.sac.training_episodes:
            batch_prompts = self.next_prompts(prompts, self.episodes)
            batch = rollout.collect(batch_prompts, self.actor_state(),
                                    seed=self.next_rollout_seed())
            row = self.consume(batch)
            self._report(row, bar)
            since = self.maybe_checkpoint(since)


def _diff(saved: dict, now: dict, prefix: str = "") -> str:
    parts = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _diff(a, b, f"{prefix}{key}.")
            if sub:
                parts.append(sub)
        elif a != b:
            parts.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return "; ".join(parts)


def train_mara(cfg: TrainConfig, **kwargs: Any) -> TrainResult:
    """Train a MARA agent; see ``MaraTrainer``."""
    return MaraTrainer(cfg, **kwargs).train()



"""The toy MARA agent: politeness on the toy world's SFT model, trained in minutes on a CPU.

The LLM is the toy world's SFT model (``vllm_align.toy.world``): its answers open with a
plain or polite opener ("Sure thing." / "Thank you.") and each sentence with a plain or
polite lead-in ("Note that" / "Please note"); greedy decoding is rarely polite, though
polite variants are often among the top-k/top-p candidates. The reward is the number of
polite words in the 16-token response (``toy.world.polite_count``); the SAC trainer
(``vllm_align.train``) learns to reject the plain variants there, its KL term keeps the
agent from wandering into improbable text elsewhere. Training prompts: 512 of the world's
training requests (never its held-out prompts).

``toy_agent`` trains it once per world directory, cached in ``WORLD_DIR/mara-agent``
(stamped and reused, ``vllm_align.toy.cache``); the repository ships one
(``vllm_align.toy.shipped``), which the demo and the tests decode.

A caveat on greedy decisions: with fallback "last", an agent that rejects (nearly)
everything emits the least probable candidate at every position, in this world often the
polite one; the untrained actor at seed 0 is nearly such an agent, so its greedy score is
high for a reason that has nothing to do with learning (its sampled score is plain-like).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from vllm_align.toy.cache import build_once, read_stamp, sha256
from vllm_align.toy.corpus import chat_messages, toy_corpus
from vllm_align.toy.world import build_toy_world


def train_records(seed: int = 0, num: int = 512) -> list[dict]:
    """``num`` distinct chat prompts from the world's training requests (never the held-out ones)."""
    seen: dict[str, None] = {}
    for prompt, _ in toy_corpus(num * 4, seed=seed + 100):
        seen.setdefault(prompt, None)
        if len(seen) == num:
            break
    return [{"id": i, "messages": chat_messages(p)} for i, p in enumerate(seen)]


@dataclasses.dataclass
class ToySettings:
    """The toy run. Table 6 where it fits; where it does not, why (one line each).

    The paper's settings are for 20k episodes of 512 tokens on 7 workers; this
    run has 2048 episodes of 16 tokens on one CPU core, so it replays each
    transition more often, learns faster and tracks its targets faster.
    """

    episodes: int = 2048  # training episodes (table 6: 20000)
    rollout_batch: int = 64  # episodes per rollout
    batch_size: int = 128  # SAC batch (table 6: 1024); smaller and more frequent updates
    updates_per_step: float = 8.0  # 8 updates per 64 transitions: each replayed ~16 times
    learning_starts: int = 512  # transitions before the first update
    alpha_r: float = 1.0  # R = number of polite words; one word outweighs the KL of reaching it
    kl_coef: float = 0.1  # λ_KL (table 6)
    max_response_len: int = 16  # the opener and the first lead-in, where politeness is decided
    target_entropy_ratio: float = 0.3  # target entropy 0.3·log 2: the agent may become decisive
    init_alpha: float = 0.05  # initial entropy coefficient (table 6: 0.8, for rewards ~10x larger)
    tau: float = 0.02  # Polyak rate (table 6: 0.005): targets keep up with fewer updates
    alpha_lr: float = 3e-4  # entropy-coefficient learning rate (table 6)
    lr: float = 1e-3  # actor and critic learning rate (table 6: 3e-4)
    seed: int = 0  # networks, replay sampling, prompt order, rollout decisions
    threads: int = 1  # torch threads (a tiny model: more threads mostly add overhead)
    num_train_prompts: int = 512  # distinct training requests
    rollout: str = "engine"  # episodes in a vLLM engine ("hf": the HF reference rollout)

    def train_config(self, world_dir: Path, out_dir: Path):
        """The trainer's ``TrainConfig`` for the SFT model in ``world_dir``, writing ``out_dir``."""
        from vllm_align.train.config import SACConfig, TrainConfig

        sac = SACConfig(training_episodes=self.episodes, batch_size=self.batch_size,
                        updates_per_step=self.updates_per_step,
                        learning_starts=self.learning_starts, alpha_r=self.alpha_r,
                        kl_coef=self.kl_coef, max_response_len=self.max_response_len,
                        target_entropy_ratio=self.target_entropy_ratio, seed=self.seed,
                        init_alpha=self.init_alpha, alpha_lr=self.alpha_lr, tau=self.tau,
                        actor_lr=self.lr, critic_lr=self.lr,
                        buffer_size=200_000)
        # One checkpoint, at the end: the cache keeps the agent, not a resumable run. The
        # rollout engine runs eager: a run this short never compiles.
        return TrainConfig(
            model=str(world_dir / "sft"), prompts=train_records(self.seed, self.num_train_prompts),
            output_dir=str(out_dir), reward="vllm_align.toy.world:polite_count", sac=sac,
            rollout_batch=self.rollout_batch, checkpoint_every=self.episodes,
            threads=self.threads, progress=False, log_every=4, rollout=self.rollout,
            engine_args={"max_model_len": 256}).validate()


# Bump when the training recipe changes in a way ToySettings does not record.
AGENT_RECIPE_VERSION = 2  # 2: engine rollouts, counter-based decision draws


@dataclasses.dataclass(frozen=True)
class ToyAgent:
    """A toy agent trained on the world's SFT model (what ``toy_agent`` returns).

    Both agent files are in the inference format (``mara.agent.load_agent``,
    ``additional_config["align"]["mara_agents"]``, ``--mara-agent``) and take
    the SFT model's hidden states ([N, 128]).
    """

    model: Path  # the LLM the agent was trained on (the world's SFT model)
    trained: Path  # the actor after training (the trainer's agent.safetensors)
    untrained: Path  # the same run's actor at initialisation (the "before")
    metrics_csv: Path  # one row per training rollout (the learning curve)
    stats: dict  # episodes, transitions, updates, train_seconds


def _agent_files(world_dir: Path) -> tuple[ToyAgent, Path, list[Path]]:
    """The agent cached for ``world_dir`` (stats unread), its stamp, the files it vouches for."""
    out = world_dir / "mara-agent"
    agent = ToyAgent(model=world_dir / "sft", trained=out / "agent.safetensors",
                     untrained=out / "untrained.safetensors", metrics_csv=out / "metrics.csv",
                     stats={})
    files = [agent.model / "model.safetensors", agent.trained, agent.untrained,
             agent.metrics_csv]
    return agent, out / "stamp.json", files


def _agent_key(agent: ToyAgent, settings: ToySettings) -> dict:
    return {"recipe_version": AGENT_RECIPE_VERSION, "settings": dataclasses.asdict(settings),
            "model_sha256": sha256(agent.model / "model.safetensors")}


def read_toy_agent(world_dir: os.PathLike,
                   settings: ToySettings = ToySettings()) -> Optional[ToyAgent]:
    """The agent trained by ``toy_agent(world_dir, settings)``, or None if there is none
    for these settings and SFT weights (read-only: no lock, no training)."""
    agent, stamp, files = _agent_files(Path(world_dir))
    stats = read_stamp(stamp, _agent_key(agent, settings), files)
    return None if stats is None else dataclasses.replace(agent, stats=stats)


def toy_agent(world_dir: os.PathLike, settings: ToySettings = ToySettings(),
              *, log: Optional[Callable[[str], None]] = None) -> ToyAgent:
    """Train (or reuse) the toy agent, cached in ``world_dir/mara-agent``.

    Stamped with the settings, the recipe version and the SFT weights' hash: a changed
    recipe or a rebuilt world retrains, an identical call returns at once. About 2 minutes
    on 2 idle CPU cores (after the world's own build if it is not built yet), byte for byte
    the same agent on a given machine; only the final checkpoint is kept. ``log`` receives
    progress lines (default: silent; the trainer's console lines go to stdout).
    """
    log = log or (lambda line: None)
    world_dir = Path(world_dir)
    build_toy_world(world_dir, seed=0, log=log)
    agent, stamp, files = _agent_files(world_dir)
    out = agent.trained.parent

    def train() -> dict:
        import torch
        from transformers import AutoConfig

        from vllm_align.mara.agent import save_agent
        from vllm_align.train.sac import SACState
        from vllm_align.train.trainer import train_mara

        shutil.rmtree(out, ignore_errors=True)  # stale or torn
        log(f"training the toy MARA agent into {out} ({settings.episodes} episodes)")
        cfg = settings.train_config(world_dir, out)
        out.mkdir(parents=True)
        hidden = AutoConfig.from_pretrained(cfg.model).hidden_size
        save_agent(SACState.create(hidden, cfg.sac).actor, agent.untrained)
        threads = torch.get_num_threads()
        try:
            result = train_mara(cfg)
        finally:
            torch.set_num_threads(threads)  # the trainer sets settings.threads
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # ~20 MB of replay buffer
        log(f"trained in {result.elapsed_s:.0f}s (cached for the next run)")
        return {"episodes": result.episodes, "transitions": result.transitions,
                "updates": result.updates, "train_seconds": round(result.elapsed_s, 1)}

    stats = build_once(stamp, _agent_key(agent, settings), files, train,
                       lock=world_dir / ".mara-agent.lock")
    return dataclasses.replace(agent, stats=stats)

"""The toy MARA agent's recipe: politeness on the toy world's SFT model, trained in
minutes on a CPU with the SAC trainer (``vllm_align.train``).

The LLM is the toy world's SFT model (``vllm_align.toy.world``): its answers
open with a plain or polite opener ("Sure thing." / "Thank you.") and each
sentence with a plain or polite lead-in ("Note that" / "Please note"); greedy
decoding is rarely polite. Polite variants are often among the top-k/top-p
candidates, but behind the plain ones. The reward is the number of polite
words in the (16-token) response, ``toy.world.polite_count``; an agent that learns to
reject the plain variants there raises it, the KL term keeps it from
wandering into improbable text elsewhere.

``run_toy`` trains on 512 of the world's training requests and evaluates on
its 64 held-out prompts: plain decoding of the LLM (greedy, and top-k/top-p
sampling), and MARA with the untrained agent (the SAC actor at
initialisation, same seed) and with the trained agent, each with sampled
decisions (the policy SAC optimises; 4 seeds) and greedy decisions (the
served default). ``benchmarks/train_mara_toy.py`` runs it and writes the
learning curve to ``docs/mara-training/``.

``toy_agent`` is the same training, cached next to the toy world
(``toy.cache.agent_dir``; stamped,
file-locked, reused): the agent the tests, the demo and ``vllm_align.toy.mara``
(the agent through the vLLM engine) share, trained once per cache.

A caveat on greedy decisions: with fallback "last", an agent that rejects
(nearly) everything emits the least probable candidate at every position, and
in this world the least probable candidate is often the polite one; the
untrained actor at seed 0 happens to be such an agent. Its greedy score is
therefore high for a reason that has nothing to do with learning (and its
sampled score, where its P(accept) ≈ 0.47 counts, is plain-like).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from statistics import fmean
from typing import Any, Callable, Optional, Sequence

from vllm_align.toy import models as toy_models
from vllm_align.toy import world as toy_world
from vllm_align.toy.cache import agent_dir
from vllm_align.toy.world import polite_count


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

    def train_config(self, world_dir: Path, out_dir: Path, **overrides: Any):
        from vllm_align.train.config import SACConfig, TrainConfig

        sac = SACConfig(training_episodes=self.episodes, batch_size=self.batch_size,
                        updates_per_step=self.updates_per_step,
                        learning_starts=self.learning_starts, alpha_r=self.alpha_r,
                        kl_coef=self.kl_coef, max_response_len=self.max_response_len,
                        target_entropy_ratio=self.target_entropy_ratio, seed=self.seed,
                        init_alpha=self.init_alpha, alpha_lr=self.alpha_lr, tau=self.tau,
                        actor_lr=self.lr, critic_lr=self.lr,
                        buffer_size=200_000)
        fields = dict(model=str(world_dir / "sft"), prompts=train_records(
            self.seed, self.num_train_prompts), output_dir=str(out_dir),
            reward="vllm_align.toy.world:polite_count", sac=sac,
            rollout_batch=self.rollout_batch, checkpoint_every=512, threads=self.threads,
            progress=False, log_every=4, rollout=self.rollout, engine_args=dict(TOY_ENGINE))
        fields.update(overrides)
        return TrainConfig(**fields).validate()


# The rollout engine of the toy runs (eager: a run this short never compiles).
TOY_ENGINE = {"max_model_len": 256}

EVAL_SEEDS = (1000, 1001, 1002, 1003)  # sampled evaluations: 4 x 64 held-out episodes


def evaluate(model_path: str, runs: dict[str, tuple[Optional[dict], str]], *,
             seeds: Sequence[int] = EVAL_SEEDS, max_response_len: int = 64, top_k: int = 40,
             top_p: float = 0.95) -> dict[str, dict[str, Any]]:
    """Mean polite reward on the 64 held-out prompts for each (actor state, decisions) run.

    ``decisions`` as in ``HFRollout.collect``: "sampled" / "greedy" MARA with
    the agent, or "plain" (greedy) / "reference" (top-k/top-p sampling) decoding
    of the LLM alone (state None). Greedy runs are decoded once, sampled ones
    once per seed. Returns {name: {"reward", "accept_rate", "responses"}}
    (responses of the first seed).
    """
    from vllm_align.data.prompts import load_prompts
    from vllm_align.data.rewards import load_reward
    from vllm_align.train.rollout import HFRollout, load_causal_lm
    from vllm_align.train.terminal import TerminalReward

    model, tokenizer = load_causal_lm(model_path)
    prompts = load_prompts(eval_records(), tokenizer)
    rollout = HFRollout(model, tokenizer, TerminalReward(load_reward(polite_count), None),
                        top_k=top_k, top_p=top_p, max_response_len=max_response_len)
    out = {}
    for name, (state, decisions) in runs.items():
        episodes, responses = [], None
        for seed in (seeds if decisions in ("sampled", "reference") else seeds[:1]):
            batch = rollout.collect(prompts, state, seed=seed, decisions=decisions)
            episodes += batch.episodes
            responses = responses or [e.response for e in batch.episodes]
        decided = sum(e.num_decisions for e in episodes)
        out[name] = {"reward": fmean(e.reward for e in episodes),
                     "accept_rate": sum(e.num_accepts for e in episodes) / max(1, decided),
                     "responses": responses}
    return out


# ---------------------------------------------------------------------------
# Training, fresh or cached
# ---------------------------------------------------------------------------

# Bump when the training recipe changes in a way ToySettings does not record.
AGENT_RECIPE_VERSION = 2  # 2: engine rollouts, counter-based decision draws
UNTRAINED_FILE = "untrained.safetensors"


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


def _train(world_dir: Path, out_dir: Path, settings: ToySettings, **overrides: Any):
    """Train into ``out_dir`` (which must hold no checkpoint); returns the ``TrainResult``.

    Also writes ``out_dir/untrained.safetensors``, the run's initial actor.
    """
    import torch
    from transformers import AutoConfig

    from vllm_align.mara.agent import save_agent
    from vllm_align.train.sac import SACState
    from vllm_align.train.trainer import train_mara

    cfg = settings.train_config(world_dir, out_dir, **overrides)
    d = AutoConfig.from_pretrained(cfg.model).hidden_size
    out_dir.mkdir(parents=True, exist_ok=True)
    save_agent(SACState.create(d, cfg.sac).actor, out_dir / UNTRAINED_FILE)
    threads = torch.get_num_threads()
    try:
        return train_mara(cfg)
    finally:
        torch.set_num_threads(threads)  # the trainer sets settings.threads


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()  # ~1 MB of weights


def _agent_files(world_dir: Path) -> ToyAgent:
    out = agent_dir(world_dir)
    return ToyAgent(model=world_dir / "sft", trained=out / "agent.safetensors",
                    untrained=out / UNTRAINED_FILE, metrics_csv=out / "metrics.csv", stats={})


def _agent_key(agent: ToyAgent, settings: ToySettings) -> dict:
    return {"recipe_version": AGENT_RECIPE_VERSION, "settings": dataclasses.asdict(settings),
            "model_sha256": _sha256(agent.model / "model.safetensors")}


def read_toy_agent(world_dir: os.PathLike,
                   settings: ToySettings = ToySettings()) -> Optional[ToyAgent]:
    """The agent trained by ``toy_agent(world_dir, settings)``, or None if there is none
    for these settings and SFT weights (read-only: no lock, no training)."""
    agent = _agent_files(Path(world_dir))
    try:
        saved = json.loads((agent.trained.parent / "stamp.json").read_text())
    except (OSError, ValueError):
        return None
    files = (agent.model / "model.safetensors", agent.trained, agent.untrained,
             agent.metrics_csv)
    if not all(f.is_file() for f in files) or saved.get("key") != _agent_key(agent, settings):
        return None
    return dataclasses.replace(agent, stats=saved.get("stats", {}))


def toy_agent(world_dir: os.PathLike, settings: ToySettings = ToySettings(),
              *, log: Optional[Callable[[str], None]] = None) -> ToyAgent:
    """Train (or reuse) the toy agent, cached in ``world_dir/mara-agent``.

    Like ``build_toy_world``: the directory is stamped with the settings, the
    recipe version and the SFT weights' hash, so a changed recipe or a rebuilt
    world retrains, and an identical call returns at once; a file lock makes
    concurrent callers wait for one training instead of racing. About 2
    minutes on 2 idle CPU cores (after the world's own 1.5-2.5 minutes if it
    is not built yet), byte for byte the same agent on a given machine. Only
    the final checkpoint is kept. ``log`` receives progress lines (default:
    silent; the trainer's own console lines go to stdout). The repository
    ships one trained agent (``vllm_align.toy.shipped``).
    """
    agent = read_toy_agent(world_dir, settings)
    if agent is not None:
        return agent
    log = log or (lambda line: None)
    world_dir = Path(world_dir)
    toy_world.build_toy_world(world_dir, seed=0, log=log)
    agent = _agent_files(world_dir)
    out = agent.trained.parent
    with toy_models._locked(world_dir / ".mara-agent.lock"):
        done = read_toy_agent(world_dir, settings)  # another process may have trained it
        if done is not None:
            return done
        shutil.rmtree(out, ignore_errors=True)  # stale or torn: the stamp is written last
        log(f"training the toy MARA agent into {out} ({settings.episodes} episodes)")
        # One checkpoint, at the end: the cache keeps the agent, not a resumable run.
        result = _train(world_dir, out, settings, checkpoint_every=settings.episodes)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # ~20 MB of replay buffer
        stats = {"episodes": result.episodes, "transitions": result.transitions,
                 "updates": result.updates, "train_seconds": round(result.elapsed_s, 1)}
        (out / "stamp.json").write_text(json.dumps(
            {"key": _agent_key(agent, settings), "stats": stats}, indent=2, sort_keys=True)
            + "\n")
        log(f"trained in {result.elapsed_s:.0f}s (cached for the next run)")
    return dataclasses.replace(agent, stats=stats)


EVAL_RUNS = ("plain greedy", "plain sampling", "untrained sampled", "trained sampled",
             "untrained greedy", "trained greedy")


def evaluate_agent(agent: ToyAgent, settings: ToySettings = ToySettings(), *,
                   runs: Sequence[str] = EVAL_RUNS,
                   seeds: Sequence[int] = EVAL_SEEDS) -> dict[str, dict[str, Any]]:
    """``evaluate`` the named ``EVAL_RUNS`` on the held-out prompts with the HF rollout.

    "plain" runs decode the LLM alone, the others MARA with the untrained or
    trained agent; "sampled"/"plain sampling" runs once per seed.
    """
    import torch

    from vllm_align.mara.agent import load_agent

    if set(runs) - set(EVAL_RUNS):
        raise ValueError(f"unknown toy evaluation run(s) {sorted(set(runs) - set(EVAL_RUNS))}; "
                         f"known: {list(EVAL_RUNS)}")
    states = {"trained": load_agent(agent.trained).state_dict(),
              "untrained": load_agent(agent.untrained).state_dict()}
    decisions = {"plain greedy": "plain", "plain sampling": "reference"}
    table = {name: (states.get(name.split()[0]), decisions.get(name, name.split()[1]))
             for name in runs}
    sac = settings.train_config(agent.model.parent, agent.trained.parent).sac
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)  # tiny forwards: extra threads cost ~20x on a busy box
    try:
        return evaluate(str(agent.model), table, seeds=seeds,
                        max_response_len=settings.max_response_len, top_k=sac.top_k,
                        top_p=sac.top_p)
    finally:
        torch.set_num_threads(threads)


def run_toy(out_dir: os.PathLike, world_dir: os.PathLike,
            settings: ToySettings = ToySettings(), log=print) -> dict[str, Any]:
    """Build/reuse the toy world, train a FRESH agent into ``out_dir``, evaluate it.

    What ``benchmarks/train_mara_toy.py`` times; ``toy_agent`` is the cached
    equivalent. Returns {run name: mean held-out reward, "result": TrainResult,
    "eval": the full evaluation}.
    """
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    world = toy_world.build_toy_world(world_dir, seed=0, log=log)
    result = _train(world_dir, out_dir, settings)
    ev = evaluate_agent(ToyAgent(model=Path(world.sft_path), trained=result.agent_path,
                                 untrained=out_dir / UNTRAINED_FILE,
                                 metrics_csv=result.metrics_csv, stats={}), settings)
    summary = {k: v["reward"] for k, v in ev.items()}
    log("held-out mean polite reward: " + "  ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    return {**summary, "result": result, "eval": ev}

"""MARA rollouts: the trainer's environment, what every rollout shares.

The MDP (MARA paper §3.1-3.3). At response position i the LLM's candidates
``t_1..t_n`` (top-k then top-p, descending probability; ``rules.candidate_set``)
are walked in order:

* state ``s`` = the LLM's final hidden state (after the final norm) at the
  candidate's position, after feeding prompt + prefix + candidate: exactly
  what the agent reads at inference (``tests/hf_mara_reference.py``);
* action 1 = accept (emit the candidate, next state = the first candidate of
  position i+1), 0 = reject (next state = the next candidate of position i);
* the last candidate is forced (fallback "last", never asked), a lone
  candidate is emitted without asking; such steps have no decision, so the
  transition of the preceding decision leads to the next *decision* state and
  collects the rewards in between;
* token reward, on the transition that emits token t:
  ``−λ_KL·(log π_θ(t) − log π_ref(t))`` with ``π_θ(t_k) = a_k·Π_{j<k}(1−a_j)``
  (a = the actor's accept probabilities; ``a_k`` → 1 for a forced token) and
  ``π_ref(t)`` the LLM's probability of t over the whole vocabulary;
* terminal reward ``α_r·R(x, y) − α_c·C(x, y)`` added to the episode's last
  transition, ``done = 1`` there (EOS emitted or the response limit reached).
  Rewards before an episode's first decision are not attributable and dropped.

Sampled decisions accept when ``u < a``, ``u = rules.decision_uniform(seed,
position, index)`` with the episode's seed (``episode_seeds``): a pure function
of where the decision is made, so every rollout of the same episode, here or
in the engine (``engine_rollout``), draws the same values. Every rollout
records its walk as ``WalkRecords``; ``assemble`` turns those into
transitions, so equal walks give equal transitions.

Here: those types (``Episode``, ``WalkRecords``, ``RolloutBatch``, the
``Rollout`` protocol), the rollout's configuration (``RolloutSpec``) and
``assemble``. The rollouts: ``hf_rollout.HFRollout`` (the reference, with a
Hugging Face LM) and ``engine_rollout.EngineRollout`` (in a vLLM engine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence, Union

import torch

from vllm_align.data.prompts import Prompt
from vllm_align.train.config import TrainConfig
from vllm_align.train.sac import Batch
from vllm_align.train.terminal import TerminalReward, load_scorer

DECISION_MODES = ("sampled", "greedy", "plain", "reference")


@dataclass
class Episode:
    """One finished response and its statistics.

    Attributes:
        prompt_id: the prompt's id.
        token_ids: the emitted tokens (EOS included when emitted).
        response: ``token_ids`` decoded without special tokens.
        chosen: per emitted token, its position in the candidate walk.
        reward, cost, terminal: R, C and ``α_r·R − α_c·C``.
        kl: Σ over emitted tokens of ``log π_θ(t) − log π_ref(t)``.
        num_decisions, num_accepts, num_fallbacks: agent decisions, accepts
            among them, positions where the forced last candidate was emitted.
        episode_return: Σ of this episode's transition rewards.
    """

    prompt_id: Union[str, int]
    token_ids: list[int]
    response: str
    chosen: list[int]
    reward: float
    cost: float
    terminal: float
    kl: float
    num_decisions: int
    num_accepts: int
    num_fallbacks: int
    episode_return: float = 0.0


@dataclass
class RolloutBatch:
    """Transitions for the replay buffer (float32 CPU tensors) and per-episode stats."""

    transitions: Batch
    episodes: list[Episode]
    forwards: int = 0  # one-token LLM forwards summed over rows (prefill not counted)
    worker: int = 0

    def __len__(self) -> int:
        return int(self.transitions.action.numel())


@dataclass
class WalkRecords:
    """A rollout's walk, flat: what every rollout (HF or engine) records.

    Keys order an episode's candidates as walked: ``position · KEY_SPAN + index``
    (tokens emitted before the candidate, its place in the candidate list).

    Attributes:
        dec_episode, dec_key: [M] int64, each agent decision's episode and key;
        state: [M, d] float32 its state; action: [M] int64 (1 = accept).
        ev_episode, ev_key: [E] int64, each emitted token's episode and key;
        ev_diff: [E] float32 its ``log π_θ(t) − log π_ref(t)``.
    """

    dec_episode: torch.Tensor
    dec_key: torch.Tensor
    state: torch.Tensor
    action: torch.Tensor
    ev_episode: torch.Tensor
    ev_key: torch.Tensor
    ev_diff: torch.Tensor


def episode_seeds(rollout_seed: int, n: int) -> list[int]:
    """The seed of each of a rollout's ``n`` episodes: distinct, in [0, 2^63).

    An episode's sampled decisions are ``rules.decision_uniform(seed, ...)``
    draws in every rollout; the engine rollout passes it as the request's seed.
    """
    import hashlib

    def one(b: int) -> int:
        digest = hashlib.blake2b(f"{int(rollout_seed)}/{b}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") >> 1

    seeds = [one(b) for b in range(n)]
    if len(set(seeds)) != n:  # 64-bit hashes of a few thousand ids: never in practice
        raise RuntimeError(f"episode seeds of rollout {rollout_seed} collide")
    return seeds


class Rollout(Protocol):
    """What the trainer needs from an environment."""

    hidden_size: int

    def collect(self, prompts: Sequence[Prompt], actor_state: Optional[Mapping[str, torch.Tensor]],
                *, seed: int, decisions: str = "sampled") -> RolloutBatch:
        """Roll out one episode per prompt with the actor of ``actor_state``.

        ``decisions``: "sampled" (accept with probability a, training),
        "greedy" (accept when a > threshold, as served), or without an agent
        (``actor_state`` ignored, no transitions, KL columns meaningless):
        "plain" (always the first candidate: greedy decoding of the LLM) or
        "reference" (sampling from the LLM over the candidate set, i.e. plain
        top-k/top-p sampling).
        """
        ...


@dataclass(frozen=True)
class RolloutSpec:
    """Everything a (possibly remote) rollout (``EngineRollout`` or ``HFRollout``) is built
    from; picklable."""

    model: str
    reward: Any = None  # data.rewards.load_reward spec (a callable must be picklable for Ray)
    cost: Any = None
    alpha_r: float = 1.0
    alpha_c: float = 1.0
    kl_coef: float = 0.1
    top_k: int = 40
    top_p: float = 0.95
    max_response_len: int = 512
    threshold: float = 0.5  # greedy decisions only
    dtype: str = "float32"
    device: str = "cpu"
    reward_batch_size: int = 16
    rollout: str = "engine"  # "engine" (train.engine_rollout) or "hf" (train.hf_rollout)
    engine_args: Mapping[str, Any] = field(default_factory=dict)  # the engine's LLM(...) kwargs
    # The job's size, from which the engine's defaults are chosen (engine_rollout.engine_kwargs):
    episodes: int = 0  # episodes this rollout will roll out in all (0: unknown, a short job)
    batch: int = 0  # episodes per collect (0: unknown)
    prompt_len: int = 0  # tokens of the longest prompt (0: unknown)

    @classmethod
    def from_config(cls, cfg: TrainConfig, prompts: Sequence[Prompt] = ()) -> "RolloutSpec":
        """The rollout of a training run (every worker builds the same one), for ``prompts``."""
        s = cfg.sac
        return cls(model=str(cfg.model), reward=cfg.reward, cost=cfg.cost, alpha_r=s.alpha_r,
                   alpha_c=s.alpha_c, kl_coef=s.kl_coef, top_k=s.top_k, top_p=s.top_p,
                   max_response_len=s.max_response_len, dtype=cfg.dtype, device=cfg.device,
                   reward_batch_size=cfg.reward_batch_size, rollout=cfg.rollout,
                   engine_args=dict(cfg.engine_args or {}),
                   episodes=-(-s.training_episodes // s.num_workers), batch=cfg.rollout_batch,
                   prompt_len=max((len(p.token_ids) for p in prompts), default=0))

    def terminal(self) -> TerminalReward:
        """The terminal reward of these rollouts, its scorers loaded."""
        kw = dict(batch_size=self.reward_batch_size, device=self.device)
        return TerminalReward(load_scorer(self.reward, **kw), load_scorer(self.cost, **kw),
                              self.alpha_r, self.alpha_c)


def walk_order(*pairs: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """One int64 per record whose order is (episode, key), for each (episode [N], key [N]) pair.

    Keys are replaced by their rank among all the pairs' keys, so that
    ``episode · (ranks + 1) + rank`` cannot overflow whatever the keys' range.
    """
    ranks = torch.unique(torch.cat([key for _, key in pairs]))  # sorted
    span = ranks.numel() + 1
    return [episode * span + torch.searchsorted(ranks, key) for episode, key in pairs]


def assemble(prompts: Sequence[Prompt], token_lists: list[list[int]],
             chosen_lists: list[list[int]], fallbacks: list[int], records: WalkRecords,
             tokenizer, terminal: Optional[TerminalReward], kl_coef: float) -> RolloutBatch:
    """A rollout's episodes → transitions with next states, folded rewards and done flags.

    Each decision's transition collects the token rewards ``−kl_coef·diff`` of
    the tokens emitted from it up to (not including) the episode's next
    decision; the episode's last decision also gets the terminal reward and
    ``done = 1``. Shared by every rollout, so that equal walks give equal
    transitions.
    """
    n_ep = len(prompts)
    responses = [tokenizer.decode(t, skip_special_tokens=True) for t in token_lists]
    if terminal is not None:
        r, c, term = terminal(prompts, responses)
    else:
        r = c = term = [0.0] * n_ep
    terminal_t = torch.tensor(term, dtype=torch.float32)
    rec = records
    kl = torch.zeros(n_ep).index_add_(0, rec.ev_episode, rec.ev_diff.float())

    dec_order, ev_order = walk_order((rec.dec_episode, rec.dec_key), (rec.ev_episode, rec.ev_key))
    dec_order, order = torch.sort(dec_order)
    dec_ep, state, action = rec.dec_episode[order], rec.state[order], rec.action[order]
    n = dec_ep.numel()

    # Each token reward goes to the latest decision of its episode at or before it.
    reward = torch.zeros(n)
    if n:
        owner = torch.searchsorted(dec_order, ev_order, right=True) - 1
        ok = (owner >= 0) & (dec_ep[owner.clamp(min=0)] == rec.ev_episode)
        reward.index_add_(0, owner[ok], -kl_coef * rec.ev_diff.float()[ok])
    last = torch.ones(n, dtype=torch.bool)  # an episode's last decision: done
    last[:-1] = dec_ep[1:] != dec_ep[:-1]
    reward[last] += terminal_t[dec_ep[last]]
    next_state = torch.zeros_like(state)
    next_state[:-1] = state[1:]
    next_state[last] = 0.0
    returns = torch.zeros(n_ep).index_add_(0, dec_ep, reward)
    n_dec = torch.bincount(dec_ep, minlength=n_ep)
    n_acc = torch.bincount(dec_ep, weights=action.float(), minlength=n_ep)

    episodes = [Episode(
        prompt_id=prompts[b].id, token_ids=token_lists[b], response=responses[b],
        chosen=list(chosen_lists[b]), reward=float(r[b]), cost=float(c[b]),
        terminal=float(term[b]), kl=float(kl[b]), num_decisions=int(n_dec[b]),
        num_accepts=int(n_acc[b]), num_fallbacks=int(fallbacks[b]),
        episode_return=float(returns[b])) for b in range(n_ep)]
    batch = Batch(state=state.float(), action=action.long(), reward=reward.float(),
                  next_state=next_state.float(), done=last.float())
    return RolloutBatch(batch, episodes)

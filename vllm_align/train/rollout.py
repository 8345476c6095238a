"""MARA rollouts: the trainer's environment, batched over episodes with a Hugging Face LM.

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

``HFRollout.collect`` (the reference) runs B episodes in lockstep, one forward
of ``[B, 1]`` tokens per micro-step: each row feeds its current candidate (the
next candidate after a reject, the first candidate of the next position after
an emit). The KV cache is an HF ``DynamicCache`` that grows by one column per
micro-step; a rejected candidate's column is masked out of the attention mask
afterwards, so every kept state equals the one computed over prompt + prefix +
candidate alone (up to float rounding). Finished rows leave the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence, Union

import torch

from vllm_align.mara.agent import ACCEPT, MaraAgent
from vllm_align.mara.rules import (KEY_SPAN, candidate_set, decision_uniform, walk_log_ratio,
                                   walk_step)
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
    """Everything a (possibly remote) ``HFRollout`` is built from; picklable."""

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
    rollout: str = "engine"  # "engine" (train.engine_rollout) or "hf" (HFRollout)
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


def quiet_load(load, *args, **kwargs):
    """Call a ``from_pretrained`` without transformers' per-load progress bar."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load(*args, **kwargs)
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu"):
    """(model in eval mode without gradients, tokenizer) from an HF checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = quiet_load(AutoModelForCausalLM.from_pretrained, path, dtype=getattr(torch, dtype))
    return model.to(device).eval().requires_grad_(False), AutoTokenizer.from_pretrained(path)


def _check_model(model) -> None:
    cfg = model.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise ValueError(f"{cfg.model_type} uses sliding-window attention; the MARA rollout "
                         "masks rejected candidates' cache columns, which a window would count")


class HFRollout:
    """Batched MARA rollouts with a Hugging Face causal LM (see the module doc).

    Args:
        model: an HF causal LM whose ``hidden_states[-1]`` is the final-norm
            output read by its LM head (checked on the first forward).
        tokenizer: its tokenizer (decoding responses; pad/EOS ids).
        terminal: the terminal reward; None = 0 (evaluation without rewards).
        kl_coef, top_k, top_p, max_response_len, threshold: as in ``SACConfig``
            / ``MaraParams``.
    """

    def __init__(self, model, tokenizer, terminal: Optional[TerminalReward] = None, *,
                 kl_coef: float = 0.1, top_k: int = 40, top_p: float = 0.95,
                 max_response_len: int = 512, threshold: float = 0.5) -> None:
        _check_model(model)
        self.model, self.tokenizer, self.terminal = model, tokenizer, terminal
        self.kl_coef, self.top_k, self.top_p = float(kl_coef), int(top_k), float(top_p)
        self.max_response_len, self.threshold = int(max_response_len), float(threshold)
        self.hidden_size = int(model.config.hidden_size)
        self.device = next(model.parameters()).device
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_id or 0))
        self.agent = MaraAgent(self.hidden_size).to(self.device).eval().requires_grad_(False)
        self._checked = False

    @classmethod
    def from_spec(cls, spec: RolloutSpec) -> "HFRollout":
        model, tokenizer = load_causal_lm(spec.model, spec.dtype, spec.device)
        return cls(model, tokenizer, spec.terminal(), kl_coef=spec.kl_coef, top_k=spec.top_k,
                   top_p=spec.top_p, max_response_len=spec.max_response_len,
                   threshold=spec.threshold)

    # -- LLM ------------------------------------------------------------------

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        """→ (final hidden [B, d] float32, next-token logits [B, V] float32)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True,
                         output_hidden_states=True)
        hidden, logits = out.hidden_states[-1][:, -1], out.logits[:, -1]
        if not self._checked:
            again = self.model.get_output_embeddings()(hidden)
            if not torch.allclose(again.float(), logits.float(), rtol=1e-3, atol=1e-3):
                raise ValueError("this model's hidden_states[-1] is not what its LM head reads "
                                 "(the final-norm output); it cannot give MARA's state")
            self._checked = True
        return hidden.float(), logits.float()

    def _prefill(self, prompts: Sequence[Prompt]):
        from transformers import DynamicCache

        lengths = torch.tensor([len(p.token_ids) for p in prompts])
        width = int(lengths.max())
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: every row ends at the last column
            ids[b, width - len(p.token_ids):] = torch.tensor(p.token_ids)
            mask[b, width - len(p.token_ids):] = 1
        position = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        _, logits = self._forward(ids.to(self.device), mask.to(self.device),
                                  position.to(self.device), cache)
        return cache, mask.to(self.device), lengths.to(self.device), logits

    def _candidates(self, logits: torch.Tensor):
        b = logits.shape[0]
        return candidate_set(logits, torch.full((b,), self.top_k, device=logits.device),
                             torch.full((b,), self.top_p, device=logits.device), self.top_k)

    # -- episodes ---------------------------------------------------------------

    @torch.no_grad()
    def collect(self, prompts: Sequence[Prompt], actor_state: Optional[Mapping[str, torch.Tensor]],
                *, seed: int = 0, decisions: str = "sampled") -> RolloutBatch:
        if decisions not in DECISION_MODES:
            raise ValueError(f"decisions must be one of {list(DECISION_MODES)}, got {decisions!r}")
        if decisions in ("sampled", "greedy"):
            if actor_state is None:
                raise ValueError(f"decisions={decisions!r} needs actor weights")
            self.agent.load_state_dict(actor_state)
        dev, n_ep, max_len = self.device, len(prompts), self.max_response_len
        seeds = torch.tensor(episode_seeds(seed, n_ep), dtype=torch.long, device=dev)

        cache, mask, pos, logits = self._prefill(prompts)
        cand, cand_p, valid = self._candidates(logits)
        n_valid = valid.sum(1)
        rows = torch.arange(n_ep, device=dev)  # episode index of each live row
        idx = torch.zeros(n_ep, dtype=torch.long, device=dev)  # current candidate index
        log_reject = torch.zeros(n_ep, device=dev)  # Σ_{j<idx} log(1 − a_j)
        n_tok = torch.zeros(n_ep, dtype=torch.long, device=dev)
        tokens = torch.full((n_ep, max_len), self.pad_id, dtype=torch.long, device=dev)
        chosen = torch.zeros((n_ep, max_len), dtype=torch.long, device=dev)
        fallbacks = torch.zeros(n_ep, dtype=torch.long, device=dev)
        lengths = torch.zeros(n_ep, dtype=torch.long, device=dev)
        row_forwards = 0
        decisions_log: list[tuple] = []  # (episode, key, state, action) per asked row
        events: list[tuple] = []  # (episode, key, log π_θ − log π_ref) per emit
        while rows.numel():
            tok = cand.gather(1, idx[:, None])  # [B, 1]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            hidden, next_logits = self._forward(tok, mask, pos[:, None], cache)
            key = n_tok * KEY_SPAN + idx
            u = decision_uniform(seeds[rows], n_tok, idx)

            # Decisions, then the one walk (rules.walk_step; fallback "last").
            b = rows.numel()
            p_k = cand_p.gather(1, idx[:, None]).squeeze(1)
            log_decision = torch.zeros(b, 2, device=dev)  # no agent: a_k = 1 where asked
            if decisions == "plain":  # the LLM's own choice: accept the first candidate
                accept_prob = torch.ones(b, device=dev)
            elif decisions == "reference":  # a_k = p_k / Σ_{j≥k} p_j: π_θ(t_k) = p_k / Σ_j p_j
                col = torch.arange(cand_p.shape[1], device=dev)
                tail = torch.where(col >= idx[:, None], cand_p, 0.0).sum(1)
                accept_prob = (u * tail < p_k).float()  # decided here, applied by the walk
            else:
                agent_logits = self.agent.logits(hidden)
                log_decision = torch.log_softmax(agent_logits, dim=-1)
                accept_prob = torch.softmax(agent_logits, dim=-1)[:, ACCEPT]  # as MaraAgent
            sampled = torch.full((b,), decisions == "sampled", device=dev)
            threshold = torch.full((b,), self.threshold, device=dev)
            last = torch.ones(b, dtype=torch.bool, device=dev)
            step = walk_step(idx, n_valid, accept_prob, threshold, last, sampled, u)
            asked, emit = step.asked, step.done
            if decisions in ("sampled", "greedy"):
                decisions_log.append((rows[asked], key[asked], hidden[asked],
                                      step.accepted[asked].long()))
            forced = ~asked & (n_valid > 1)  # the last candidate, all before it rejected
            fallbacks.index_add_(0, rows[forced], torch.ones_like(rows[forced]))
            row_forwards += b

            # The emitted token's log π_θ(t) − log π_ref(t) (its reward's KL term).
            ratio = walk_log_ratio(log_reject, log_decision, asked, p_k, emit)
            if emit.any():
                events.append((rows[emit], key[emit], ratio.diff[emit]))

            # Rejected candidates leave the context; emitted ones stay.
            mask[:, -1] = emit.long()
            slot = n_tok.clamp(max=max_len - 1)
            tokens[rows[emit], slot[emit]] = tok[emit, 0]
            chosen[rows[emit], slot[emit]] = idx[emit]
            n_tok = n_tok + emit.long()
            pos = pos + emit.long()
            if emit.any():  # next position's candidates, for the rows that moved on
                moved = emit.nonzero().squeeze(1)
                cand[moved], cand_p[moved], valid[moved] = self._candidates(next_logits[moved])
                n_valid = valid.sum(1)
            idx = torch.where(emit, torch.zeros_like(idx), step.next_index)
            log_reject = ratio.log_reject

            finished = emit & ((tok[:, 0] == self.eos_id) | (n_tok >= max_len))
            if finished.any():
                lengths[rows[finished]] = n_tok[finished]
                keep = (~finished).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, mask, pos, idx, log_reject, n_tok = (
                    t[keep] for t in (rows, mask, pos, idx, log_reject, n_tok))
                cand, cand_p, valid, n_valid = cand[keep], cand_p[keep], valid[keep], n_valid[keep]
        tokens, chosen, lengths = tokens.cpu(), chosen.cpu(), lengths.cpu()
        out = assemble(
            prompts, [tokens[b, :lengths[b]].tolist() for b in range(n_ep)],
            [chosen[b, :lengths[b]].tolist() for b in range(n_ep)], fallbacks.cpu().tolist(),
            _records(decisions_log, events, self.hidden_size), self.tokenizer, self.terminal,
            self.kl_coef)
        out.forwards = row_forwards
        return out


def _records(decisions_log: list[tuple], events: list[tuple], d: int) -> WalkRecords:
    """``WalkRecords`` from the HF rollout's per-micro-step lists."""
    def column(log, i, empty):
        return torch.cat([x[i].cpu() for x in log]) if log else empty
    long0 = torch.zeros(0, dtype=torch.long)
    return WalkRecords(column(decisions_log, 0, long0), column(decisions_log, 1, long0),
                       column(decisions_log, 2, torch.zeros(0, d)),
                       column(decisions_log, 3, long0), column(events, 0, long0),
                       column(events, 1, long0), column(events, 2, torch.zeros(0)))


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

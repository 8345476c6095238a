"""The reference MARA rollout: batched episodes with a Hugging Face causal LM.

The MDP it walks, its types and ``assemble`` are ``rollout``'s; ``load_causal_lm``
loads the model.

``HFRollout.collect`` (the reference) runs B episodes in lockstep, one forward
of ``[B, 1]`` tokens per micro-step: each row feeds its current candidate (the
next candidate after a reject, the first candidate of the next position after
an emit). The KV cache is an HF ``DynamicCache`` that grows by one column per
micro-step; a rejected candidate's column is masked out of the attention mask
afterwards, so every kept state equals the one computed over prompt + prefix +
candidate alone (up to float rounding). Finished rows leave the batch.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from vllm_align.mara.agent import ACCEPT, MaraAgent
from vllm_align.mara.rules import (KEY_SPAN, candidate_set, decision_uniform, walk_log_ratio,
                                   walk_step)
from vllm_align.data.prompts import Prompt
from vllm_align.train.rollout import (DECISION_MODES, RolloutBatch, RolloutSpec, WalkRecords,
                                      assemble, episode_seeds)
from vllm_align.train.terminal import TerminalReward


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

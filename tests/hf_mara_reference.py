"""Slow, obviously-correct MARA greedy decoder for engine tests (not a test file).

One prompt, batch 1, in the released MARA code's style: at every position it
takes the LLM's next-token distribution, forms the candidate list, and for
each candidate in order runs ONE Hugging Face forward over
``prompt + prefix + candidate`` (full recompute, no KV cache) with
``output_hidden_states=True``; the agent reads ``hidden_states[-1][0, -1]``
and the first accepted candidate is emitted. It deliberately does not import
``vllm_align.mara.rules``: it is what that code and the engine are checked
against.

The rule, exactly as implemented here (the MARA paper §3.2 and its released code;
``docs/mara-engine.md``, "The rule"):

* ``π = softmax(logits)`` in float64 from the model's float32 logits;
  tokens sorted by descending logit, ties to the lower token id;
* top-k: the first ``min(k, V)`` of them; top-p: the shortest prefix of
  those whose mass, renormalised over the top-k set, reaches ``p`` (a token
  is kept while the renormalised mass before it is ``< p``; ``p = 1`` keeps
  every top-k token of nonzero probability); the first token is always kept.
  This is the released code's ``TopKLogitsWarper`` + ``TopPLogitsWarper``;
* a lone candidate is emitted without asking the agent;
* greedy decisions: accept when ``P(accept) > threshold``;
* all rejected: "last" (paper) emits the last candidate, which is never
  asked; "first" (released evaluation) asks every candidate and emits the
  first.

``hidden_states[-1]`` of a Hugging Face Llama is the output of the final
norm (transformers replaces the last recorded layer output by
``last_hidden_state``, which is ``model.norm(...)``); the decoder checks this
on its first forward (``lm_head(hidden_states[-1]) == logits``) and refuses a
model where it does not hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class MaraStep:
    """One emitted token, for diagnosing a divergence from the engine.

    Attributes:
        token: the emitted token id.
        candidates: the candidate ids in walk order.
        accept_probs: the agent's P(accept) for each candidate it was asked
            about, in order (empty for a lone candidate).
        chosen_index: the emitted candidate's position in ``candidates``.
        fallback: True when every asked candidate was rejected.
        margin: the smallest ``|P(accept) − threshold|`` over the asked
            candidates (inf if none): a tiny margin is a near-tie that
            rounding in another implementation may legitimately flip.
        set_margin: how close the candidate set came to changing size: the
            smallest relative gap, in the top-p test, between the mass before
            a candidate and ``p`` times the top-k mass (inf when p = 1).
    """

    token: int
    candidates: list[int]
    accept_probs: list[float] = field(default_factory=list)
    chosen_index: int = 0
    fallback: bool = False
    margin: float = math.inf
    set_margin: float = math.inf


def load_model(path: str):
    """A float32 eval-mode ``AutoModelForCausalLM`` from a local checkpoint."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def forward_last(model, token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token logits [V], final hidden state [d]) at the last position; full recompute."""
    input_ids = torch.tensor([list(token_ids)], dtype=torch.long)
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                use_cache=False, output_hidden_states=True)
    return out.logits[0, -1].float(), out.hidden_states[-1][0, -1].float()


@torch.no_grad()
def check_post_norm(model, logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """Refuse a model whose ``hidden_states[-1]`` is not what its LM head reads."""
    again = model.get_output_embeddings()(hidden.unsqueeze(0))[0].float()
    if not torch.allclose(again, logits, rtol=1e-4, atol=1e-4):
        raise RuntimeError("hidden_states[-1] is not the final-norm output for this model "
                           "(lm_head(hidden_states[-1]) != logits)")


def candidates(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[list[int], float]:
    """(candidate ids in walk order, the top-p set margin) for one position."""
    probs = torch.softmax(logits.double(), dim=-1).tolist()
    values = logits.float().tolist()
    # Descending logit, lower id first on ties: sort ids by (-logit, id).
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    top = order[:min(top_k, len(order))]
    total = sum(probs[i] for i in top)
    kept, before, margin = [], 0.0, math.inf
    for j, token in enumerate(top):
        p_token = probs[token]
        if j > 0:
            if p_token <= 0.0:
                break
            if top_p < 1.0:
                gap = before / total - top_p
                margin = min(margin, abs(gap))
                if not before < top_p * total:
                    break
        kept.append(token)
        before += p_token
    return kept, margin


@torch.no_grad()
def mara_greedy_decode(model, agent, prompt_ids: Sequence[int], *, max_new_tokens: int,
                       top_k: int = 40, top_p: float = 0.95, threshold: float = 0.5,
                       fallback: str = "last", eos_token_id: int | None = None) -> list[MaraStep]:
    """Decode ``max_new_tokens`` tokens (or up to EOS) with MARA; one step per token.

    Args:
        model: a Hugging Face causal LM (float32, eval).
        agent: a ``MaraAgent`` (anything with ``accept_prob([N, d]) -> [N]``).
        prompt_ids: the prompt's token ids (with BOS if the model expects it).
        top_k, top_p, threshold, fallback: the request's MARA parameters.
        eos_token_id: stop after emitting this token.
    Returns:
        One ``MaraStep`` per emitted token.
    """
    if fallback not in ("last", "first"):
        raise ValueError(f"fallback must be 'last' or 'first', got {fallback!r}")
    seq = list(prompt_ids)
    logits, hidden = forward_last(model, seq)
    check_post_norm(model, logits, hidden)
    steps: list[MaraStep] = []
    while len(steps) < max_new_tokens:
        cands, set_margin = candidates(logits, top_k, top_p)
        step = MaraStep(token=-1, candidates=cands, set_margin=set_margin)
        outputs = []  # (logits, hidden) after each fed candidate, in order
        chosen = None
        for j, token in enumerate(cands):
            outputs.append(forward_last(model, seq + [token]))
            lone = len(cands) == 1
            forced_last = fallback == "last" and j == len(cands) - 1
            if lone or forced_last:
                chosen = j
                step.fallback = not lone
                break
            a = float(agent.accept_prob(outputs[-1][1].unsqueeze(0))[0])
            step.accept_probs.append(a)
            step.margin = min(step.margin, abs(a - threshold))
            if a > threshold:
                chosen = j
                break
        if chosen is None:  # "first": every candidate asked and rejected
            chosen = 0
            step.fallback = True
        step.chosen_index = chosen
        step.token = cands[chosen]
        steps.append(step)
        seq.append(step.token)
        logits, _ = outputs[chosen]
        if step.token == eos_token_id:
            break
    return steps


def tokens(steps: Sequence[MaraStep]) -> list[int]:
    return [s.token for s in steps]

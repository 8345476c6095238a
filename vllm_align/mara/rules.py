"""MARA's decision rule as batched tensor ops (no vLLM imports, no per-row loops).

One MARA step for a sequence (paper §3.2; ``docs/mara-engine.md``, "The rule"):

1. **Candidates.** From the LLM's next-token distribution ``π = softmax(h)``
   take the top-k tokens, then the nucleus (top-p) of that set, sorted by
   descending probability: ``t_1, …, t_n`` (``n ≥ 1``).
2. **Walk.** Feed ``t_1``; the agent reads the LLM's final hidden state at
   ``t_1``'s position and returns ``a_1 = P(accept)``; accept → emit ``t_1``,
   reject → try ``t_2``, and so on.
3. **Fallback.** If every judged candidate is rejected: "last" (the paper)
   forces the last candidate ``t_n``; "first" (the released evaluation code)
   forces ``t_1``.

Conventions shared by every function here:

* candidate columns are a *prefix*: ``valid[b, j]`` is True exactly for
  ``j < n_b``, and ``n_b ≥ 1`` (``candidate_set`` guarantees both);
* a lone candidate (``n = 1``) is emitted without asking the agent;
* with fallback "last" the last candidate is never asked either: once the
  walk reaches it, it is emitted whatever the agent would say (the paper's
  ``a_{t_n} ∈ {1}``), so asking would only cost an agent call. With fallback
  "first" every candidate of a set of two or more may be asked;
* greedy decisions accept when ``a > threshold``; sampled decisions (as in
  training) accept when ``u < a`` with ``u ~ U[0, 1)`` drawn by the caller
  (the threshold is unused).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_align.mara.agent import ACCEPT, REJECT


# ---------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------

def _order_key(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] int64 keys whose descending order is (logit desc, token id asc), all distinct.

    The float32 bits, mapped so that signed-integer order is float order
    (negative floats have their magnitude bits flipped; ``+ 0.0`` folds -0.0
    into +0.0, which compare equal), fill the high 32 bits; ``2^32 - 1 - id``
    fills the low 32 bits, so equal logits rank the lower id first. Sorting or
    ``topk`` on the keys is exact with no tie to resolve, and needs no host sync.
    """
    bits = (logits.float() + 0.0).view(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # flip the magnitude bits of negatives
    low = 0xFFFFFFFF - torch.arange(logits.shape[-1], device=logits.device, dtype=torch.long)
    return torch.add(low, bits.long(), alpha=1 << 32)


def _sorted_top(logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``width`` largest logits per row, descending, ties to the lower token id.

    ``torch.topk`` is far cheaper than a full sort (on 2 CPU cores, [32, 32000]:
    ~8 ms against ~110 ms) but leaves tie order unspecified; on ``_order_key``
    there are no ties.
    """
    key = _order_key(logits)
    if width >= logits.shape[-1]:
        ids = torch.sort(key, dim=-1, descending=True).indices
    else:
        ids = torch.topk(key, width, dim=-1, sorted=True).indices
    return logits.gather(1, ids), ids


def candidate_set(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  max_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MARA candidates: top-k, then top-p over the renormalised top-k, sorted.

    With ``π = softmax(logits)`` and the tokens sorted by descending logit
    (ties: lower token id first), ``p_(1) ≥ p_(2) ≥ …``, row b keeps the j-th
    token (0-based) iff::

        j < min(k_b, K)                                   # top-k
        and (j == 0  or  Σ_{i<j} p_(i) < p_b · Σ_{i<k_b} p_(i)   or  p_b ≥ 1)
                                                          # top-p on the top-k set
        and (j == 0  or  p_(j) > 0)                       # never a masked token

    i.e. the smallest prefix of the top-k list whose *renormalised* mass
    reaches ``p``. This is what the released MARA code computes: it applies
    Hugging Face's ``TopKLogitsWarper`` then ``TopPLogitsWarper``, and the
    latter takes its softmax over the already top-k-masked scores (removing a
    token when the renormalised mass at or below it is ≤ 1 − p, the same set
    up to rounding at the boundary). Two deliberate differences: HF's top-k
    keeps every token tied with the k-th, we keep exactly k (lower ids win a
    tie); and the first candidate is always kept (HF's ``min_tokens_to_keep=1``).

    Temperature does not change the set (the released code applies it after
    top-p); pass the untempered logits to match the released code.

    Args:
        logits: [B, V] next-token logits (any float dtype; math in float32).
        top_k: [B] int, k ≥ 1; values above ``max_k`` act as ``max_k``.
        top_p: [B] float in (0, 1].
        max_k: K, the number of candidate columns (the batch's largest k;
            capped at V).
    Returns:
        ids: [B, K] int64 token ids in walk order (meaningful where valid).
        probs: [B, K] float32 ``π(t_j)`` over the full vocabulary (not
            renormalised; the trainer's KL reward needs these), 0 where not valid.
        valid: [B, K] bool, a prefix of each row, at least one True.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k!r}")
    logits = logits.float()
    num_cols = min(int(max_k), logits.shape[-1])
    vals, ids = _sorted_top(logits, num_cols)
    probs = torch.exp(vals - torch.logsumexp(logits, dim=-1, keepdim=True))

    col = torch.arange(num_cols, device=logits.device)
    k = top_k.to(device=logits.device, dtype=torch.long).clamp(1, num_cols).unsqueeze(1)
    p = top_p.to(device=logits.device, dtype=torch.float32).unsqueeze(1)
    in_k = col < k
    mass = torch.where(in_k, probs, 0.0)
    cum = torch.cumsum(mass, dim=1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)  # Σ_{i<j} p_(i)
    in_p = (before < p * cum[:, -1:]) | (p >= 1.0)
    valid = in_k & in_p & (probs > 0)
    valid[:, 0] = True
    return ids, torch.where(valid, probs, 0.0), valid


# ---------------------------------------------------------------------------
# Walking the candidates
# ---------------------------------------------------------------------------

def _accepts(accept_prob: torch.Tensor, threshold: torch.Tensor, sampled: torch.Tensor,
             uniform: torch.Tensor) -> torch.Tensor:
    """Agent decisions: ``u < a`` where sampled, ``a > threshold`` elsewhere (broadcasts)."""
    return torch.where(sampled, uniform < accept_prob, accept_prob > threshold)


def _num_asked(n_valid: torch.Tensor, fallback_last: torch.Tensor) -> torch.Tensor:
    """How many leading candidates may be asked: 0 if n=1, n−1 ("last") or n ("first")."""
    asked = torch.where(fallback_last, n_valid - 1, n_valid)
    return torch.where(n_valid > 1, asked, torch.zeros_like(asked))


class WalkStep(NamedTuple):
    """One candidate judged per row: the walk, one step at a time.

    Attributes:
        done: [B] bool, the row emits a token this step.
        chosen_index: [B] int64, the emitted candidate where done (else the
            current index).
        next_index: [B] int64, the candidate to feed next where not done.
        asked: [B] bool, whether the agent's verdict at this index was used
            (a candidate the agent was asked about).
        accepted: [B] bool, asked and accepted (the decision's action).
    """

    done: torch.Tensor
    chosen_index: torch.Tensor
    next_index: torch.Tensor
    asked: torch.Tensor
    accepted: torch.Tensor


def walk_step(index: torch.Tensor, n_valid: torch.Tensor, accept_prob: torch.Tensor,
              threshold: torch.Tensor, fallback_last: torch.Tensor, sampled: torch.Tensor,
              uniform: torch.Tensor) -> WalkStep:
    """Judge candidate ``index`` of each row; emit it, move on, or fall back.

    The one MARA walk: the engine (``engine/mara_rows.py``) and the trainer's
    HF rollout both iterate it from index 0 until ``done``, one judged
    candidate per row per call. With ``n`` valid candidates, ``m`` askable
    ones (0 if ``n = 1``, ``n − 1`` for "last", ``n`` for "first") and
    ``acc_j = (u_j < a_j) if sampled else (a_j > threshold)``, the walk emits::

        min{j < m : acc_j}                    if any
        n − 1 ("last")  or  0 ("first")       otherwise

    Args:
        index: [B] int64 current candidate position, ``0 ≤ index < n_valid``.
        n_valid: [B] int64 number of valid candidates (≥ 1).
        accept_prob: [B] float, ``a`` at the current candidate (ignored where
            not asked).
        threshold: [B] float in [0, 1), for greedy rows.
        fallback_last: [B] bool, True = "last" (paper), False = "first".
        sampled: [B] bool, True = draw each decision from ``a``.
        uniform: [B] float U[0, 1) draws for sampled rows.
    Returns:
        ``WalkStep``. A row whose forced choice is "first" after rejecting
        its last candidate gets ``chosen_index = 0 ≠ index``: that token's
        KV must be fed again.
    """
    asked = index < _num_asked(n_valid, fallback_last)
    accepted = asked & _accepts(accept_prob, threshold, sampled, uniform)
    exhausted = ~asked | (index + 1 >= n_valid)  # not asked: lone, or the forced "last"
    done = accepted | exhausted
    forced = torch.where(fallback_last, n_valid - 1, torch.zeros_like(n_valid))
    chosen = torch.where(accepted, index, torch.where(exhausted, forced, index))
    return WalkStep(done, chosen, torch.where(done, index, index + 1), asked, accepted)


class LogRatio(NamedTuple):
    """The walk's ``log π_θ − log π_ref`` bookkeeping after one judged candidate.

    Attributes:
        diff: [B] float32, the judged candidate's ``log π_θ(t) − log π_ref(t)``
            were it emitted now (meaningful where the row emits).
        log_reject: [B] float32, ``Σ log(1 − a_j)`` over the position's
            rejections so far, reset to 0 where the position ends.
    """

    diff: torch.Tensor
    log_reject: torch.Tensor


def walk_log_ratio(log_reject: torch.Tensor, log_decision: torch.Tensor, asked: torch.Tensor,
                   p_ref: torch.Tensor, restart: torch.Tensor) -> LogRatio:
    """The KL term of a token's reward (the trainer's ``r − β·(log π_θ − log π_ref)``).

    For the candidate ``t`` judged at walk index ``i`` of a position::

        log π_θ(t) = Σ_{j<i} log(1 − a_j) + (log a_i if asked else 0)
        diff       = log π_θ(t) − log max(p_ref(t), 1e-30)

    (an unasked candidate, lone or the forced "last", has ``a_i = 1``), and the
    running rejection sum moves on by ``log(1 − a_i)`` where asked.

    Args:
        log_reject: [B] float32, ``Σ_{j<i} log(1 − a_j)``.
        log_decision: [B, 2] float32 log-softmax of the agent's decision
            logits at the candidate (columns ``agent.REJECT``, ``agent.ACCEPT``);
            zeros when no agent decides.
        asked: [B] bool, the agent's verdict was used (``WalkStep.asked``).
        p_ref: [B] float32, the candidate's probability under the LLM.
        restart: [B] bool, the position ends (an emit, or a fresh candidate list).
    Returns:
        ``LogRatio(diff, log_reject)``.
    """
    zero = torch.zeros_like(log_reject)
    log_pi = log_reject + torch.where(asked, log_decision[:, ACCEPT], zero)
    diff = log_pi - p_ref.clamp_min(1e-30).log()
    moved = log_reject + torch.where(asked, log_decision[:, REJECT], zero)
    return LogRatio(diff, torch.where(restart, zero, moved))


# ---------------------------------------------------------------------------
# Seeded decisions
# ---------------------------------------------------------------------------

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64's constants, as signed int64
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
# Walk-order key of a candidate: position * KEY_SPAN + index (index < 2^32).
KEY_SPAN = 1 << 32


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 tensors (wrapping arithmetic mod 2^64)."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def decision_uniform(seed: torch.Tensor, position: torch.Tensor,
                     index: torch.Tensor) -> torch.Tensor:
    """The U[0, 1) draw of a seeded sampled decision, a pure function of where it is made.

    ``u = top24(splitmix64(splitmix64(splitmix64(seed) + position) + index)) / 2^24``

    for the candidate at walk ``index`` of response ``position`` (tokens
    emitted before it) of a sequence seeded ``seed``. A counter-based draw
    depends on nothing else: not on the batch, the step, preemption (a
    recomputed walk redraws the same values) or any generator's state; the
    engine and the trainer's HF rollout therefore make the same decisions.

    Args:
        seed, position, index: [B] int64 (broadcastable).
    Returns:
        [B] float32 in [0, 1), multiples of 2^-24 (exact in float32).
    """
    h = _splitmix64(_splitmix64(_splitmix64(seed.long()) + position.long()) + index.long())
    return _shift_right(h, 40).float() * (1.0 / (1 << 24))

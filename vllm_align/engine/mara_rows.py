"""MARA's per-row engine state and its one-candidate-per-step walk.

Design (pipelined candidates; see ``docs/mara-engine.md``). Every engine
step feeds each MARA row exactly ONE candidate token ``c`` at the row's next
position ``p``. That forward yields both what the agent judges (the LLM's
final hidden state at ``c``) and, should ``c`` be accepted, the next-token
distribution at ``p + 1`` and ``c``'s KV. So:

* accept (or forced "last"): ``c`` is emitted; the candidates for ``p + 1``
  come from this very step's logits; the next step feeds the first of them;
* reject: nothing is emitted; the next step feeds the next candidate at
  ``p`` (its KV slot is overwritten);
* fallback "first" after rejecting all: the first candidate is fed once
  more (its KV was overwritten) and emitted without asking.

Cost per emitted token: one forward per candidate fed, i.e.
``1 + (accepted position)`` forwards (``n`` for a forced "last", ``n + 1``
for a forced "first"); a lone candidate costs one. With most accepts on the
first candidate that is ~1.3-1.5 forwards per token, and rows never wait for
each other: a rejecting row simply emits nothing this step. Re-entry after
prefill or preemption costs one forward that emits nothing (the step that
produces the first candidate list).

The tensors here mirror vLLM's persistent batch (row i = slot i, moved from
``BatchUpdate`` diffs by ``AlignBatchState``). ``step`` is batched tensor code
with no host sync; the runner copies its small ``[B]`` results to the host
once per step (``StepResult``).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from vllm_align.engine.mara_trace import DecisionTrace
from vllm_align.mara.agent import ACCEPT, MaraAgent
from vllm_align.mara.rules import (KEY_SPAN, candidate_set, decision_uniform, walk_log_ratio,
                                   walk_step)


def move_row(tensors: Sequence[torch.Tensor], src: int, dst: int, swap: bool) -> None:
    """Row ``src`` of every tensor moves to ``dst`` (or the two rows swap): a batch diff."""
    for t in tensors:
        if swap:
            t[[src, dst]] = t[[dst, src]]
        else:
            t[dst] = t[src]


class StepResult(NamedTuple):
    """One step's outcome per row (all [B]; meaningful where ``is_mara``).

    Attributes:
        is_mara: the row is a MARA row that was judged or (re)started this step
            (False for partial-prefill rows, whose output vLLM discards).
        emit: the row emits a token this step (True for non-MARA rows).
        position: where ``emit``: the emitted candidate's 0-based position in
            its list (the paper's accepted position, Figure 3).
        evaluated: where ``emit``: candidates the agent was asked about for it.
        next_input: the token the row feeds next step (its pending candidate).
    """

    is_mara: torch.Tensor
    emit: torch.Tensor
    position: torch.Tensor
    evaluated: torch.Tensor
    next_input: torch.Tensor


class MaraRows:
    """Per-row MARA parameters and walk state for ``num_rows`` batch slots.

    Parameters (host tensors, copied to the device by ``sync_params``):
        agent: [N] int64 index into the engine's agents; top_k [N] int64;
        top_p, threshold: [N] float32; fallback_last, sampled: [N] bool;
        seed: [N] int64 the request's seed, seeded: [N] bool it has one
        (its sampled decisions are ``rules.decision_uniform`` draws).
    Walk state (device):
        cand: [N, K] int64 candidate ids of the row's current position;
        cand_prob: [N, K] float32 their probabilities under the LLM;
        n_valid: [N] int64 candidates in the list; index: [N] int64 the one
        fed this step; pending: [N] bool a candidate list exists; forced:
        [N] bool the fed candidate is emitted unasked (fallback "first");
        asked: [N] int64 agent verdicts used so far at this position;
        log_reject: [N] float32 ``Σ log(1 − a_j)`` over the rejections at this
        position (kept while a ``DecisionTrace`` records).
    Host mirrors (for the runner, which must place ``next_input`` before the
    step's forward): pending_cpu [N] bool, next_input_cpu [N] int64.
    """

    def __init__(self, num_rows: int, vocab_size: int, device: torch.device,
                 pin_memory: bool, agent_names: Sequence[str]):
        n = num_rows
        self.vocab_size = vocab_size
        self.device = device
        self.agent_index = {name: i for i, name in enumerate(agent_names)}
        self.params_cpu = {
            "agent": torch.zeros(n, dtype=torch.int64),
            "top_k": torch.ones(n, dtype=torch.int64),
            "top_p": torch.ones(n, dtype=torch.float32),
            "threshold": torch.full((n,), 0.5, dtype=torch.float32),
            "fallback_last": torch.ones(n, dtype=torch.bool),
            "sampled": torch.zeros(n, dtype=torch.bool),
            "seed": torch.zeros(n, dtype=torch.int64),
            "seeded": torch.zeros(n, dtype=torch.bool),
        }
        if pin_memory:
            self.params_cpu = {k: v.pin_memory() for k, v in self.params_cpu.items()}
        self.params = {k: v.to(device) for k, v in self.params_cpu.items()}
        self.max_k = 1
        self.state = {
            "cand": torch.zeros(n, 1, dtype=torch.int64, device=device),
            "cand_prob": torch.zeros(n, 1, dtype=torch.float32, device=device),
            "n_valid": torch.ones(n, dtype=torch.int64, device=device),
            "index": torch.zeros(n, dtype=torch.int64, device=device),
            "pending": torch.zeros(n, dtype=torch.bool, device=device),
            "forced": torch.zeros(n, dtype=torch.bool, device=device),
            "asked": torch.zeros(n, dtype=torch.int64, device=device),
            "log_reject": torch.zeros(n, dtype=torch.float32, device=device),
        }
        self.pending_cpu = torch.zeros(n, dtype=torch.bool)
        self.next_input_cpu = torch.zeros(n, dtype=torch.int64)
        # Set by a trainer that rolls out in this engine (engine/training.py).
        self.trace: DecisionTrace | None = None

    # -- batch layout (from BatchUpdate diffs) ----------------------------
    def write_row(self, index: int, mara, seed: int | None) -> None:
        """A request joined slot ``index``; ``mara`` is its MaraParams or None,
        ``seed`` its ``SamplingParams.seed``."""
        if mara is not None:
            p = self.params_cpu
            p["seed"][index] = 0 if seed is None else seed
            p["seeded"][index] = seed is not None
            p["agent"][index] = self.agent_index[mara.agent]
            p["top_k"][index] = min(mara.top_k, self.vocab_size)
            p["top_p"][index] = mara.top_p
            p["threshold"][index] = mara.threshold
            p["fallback_last"][index] = mara.fallback_last
            p["sampled"][index] = mara.sampled
            self._grow(min(mara.top_k, self.vocab_size))
        # A new (or re-added) request starts without candidates: its next
        # forward (prefill, or a re-feed of its last token) produces them.
        self.state["pending"][index] = False
        self.state["forced"][index] = False
        self.pending_cpu[index] = False

    def move(self, src: int, dst: int, swap: bool) -> None:
        move_row([*self.params_cpu.values(), *self.state.values(), self.pending_cpu,
                  self.next_input_cpu], src, dst, swap)

    def sync_params(self) -> None:
        for k, t in self.params_cpu.items():
            self.params[k].copy_(t, non_blocking=True)

    def _grow(self, k: int) -> None:
        if k <= self.max_k:
            return
        for name in ("cand", "cand_prob"):
            old = self.state[name]
            new = torch.zeros(old.shape[0], k, dtype=old.dtype, device=old.device)
            new[:, : old.shape[1]] = old
            self.state[name] = new
        self.max_k = k

    # -- one engine step ---------------------------------------------------
    def decision_uniforms(self, num_rows: int, position: torch.Tensor) -> torch.Tensor:
        """[B] U[0, 1) draws for sampled decisions.

        A seeded row's draw is ``rules.decision_uniform(seed, position, index)``:
        its decisions depend on its seed alone, whatever else shares the batch;
        unseeded rows share one draw from the global generator.

        Args:
            num_rows: B; position: [B] int64 tokens each row has emitted so far.
        """
        p, index = self.params, self.state["index"][:num_rows]
        seeded = decision_uniform(p["seed"][:num_rows], position, index)
        return torch.where(p["seeded"][:num_rows], seeded,
                           torch.rand(num_rows, device=self.device))

    def step(self, logits: torch.Tensor, hidden: torch.Tensor, is_mara: torch.Tensor,
             is_mara_cpu: torch.Tensor, agents: Sequence[MaraAgent], others: torch.Tensor,
             position: torch.Tensor) -> tuple[torch.Tensor, StepResult]:
        """Judge each MARA row's fed candidate and choose what it feeds next.

        Args:
            logits: [B, V] the served LLM's logits at each row's last fed token.
            hidden: [B, d] its final hidden states there (the agent's state).
            is_mara: [B] bool, MARA rows whose output this step is kept;
                is_mara_cpu: the same on the host.
            agents: the engine's agents, indexed by the ``agent`` codes.
            others: [B, V] float32 logits for the non-MARA rows (their rules).
            position: [B] int64 tokens each row has emitted so far.
        Returns:
            ``(out, result)``: ``out`` [B, V] float32 logits, one-hot (0 at the
            token to sample, −inf elsewhere) on MARA rows so that vLLM's sampler
            returns the emitted token, ``others`` elsewhere; and the
            ``StepResult``.
        """
        b = logits.shape[0]
        p = {k: v[:b] for k, v in self.params.items()}
        s = {k: v[:b] for k, v in self.state.items()}
        judging = is_mara & s["pending"]

        decision_logits = None
        for code, agent in enumerate(agents):
            # One agent: every row at once, no host sync to gather its rows.
            x = agent.decision_logits(hidden)
            decision_logits = x if decision_logits is None else torch.where(
                (p["agent"] == code).unsqueeze(1), x, decision_logits)
        accept_prob = torch.softmax(decision_logits, dim=-1)[:, ACCEPT]
        walk = walk_step(s["index"], s["n_valid"], accept_prob, p["threshold"],
                         p["fallback_last"], p["sampled"], self.decision_uniforms(b, position))
        done = walk.done | s["forced"]
        chosen = torch.where(s["forced"], s["index"], walk.chosen_index)
        asked_now = walk.asked & ~s["forced"]
        asked = torch.where(judging, s["asked"] + asked_now.long(), s["asked"])

        emit = judging & done & (chosen == s["index"])
        refeed = judging & done & ~emit  # fallback "first": feed the first candidate again
        emitted = s["cand"].gather(1, s["index"].unsqueeze(1)).squeeze(1)
        position_in_list, evaluated = s["index"].clone(), asked.clone()

        # New candidate lists: after prefill / re-entry, and after each emit.
        fresh = is_mara & (~s["pending"] | emit)
        if self.trace is not None:
            self._record(is_mara_cpu, s, hidden, decision_logits, position, asked_now,
                         walk.accepted, emit, fresh)

        index = torch.where(judging & ~done, walk.next_index, s["index"])
        index = torch.where(refeed, chosen, index)
        forced = torch.where(judging, refeed, s["forced"])
        ids, probs, valid = candidate_set(logits, p["top_k"], p["top_p"], self.max_k)
        cand = torch.where(fresh.unsqueeze(1), ids, s["cand"])
        cand_prob = torch.where(fresh.unsqueeze(1), probs, s["cand_prob"])
        n_valid = torch.where(fresh, valid.sum(dim=1), s["n_valid"])
        index = torch.where(fresh, 0, index)
        forced = forced & ~fresh
        asked = torch.where(fresh, 0, asked)
        pending = s["pending"] | is_mara

        for name, value in (("cand", cand), ("cand_prob", cand_prob), ("n_valid", n_valid),
                            ("index", index), ("forced", forced), ("asked", asked),
                            ("pending", pending)):
            s[name].copy_(value)
        next_input = cand.gather(1, index.unsqueeze(1)).squeeze(1)

        token = torch.where(emit, emitted, next_input)
        one_hot = torch.full_like(others, float("-inf"))
        one_hot.scatter_(1, token.unsqueeze(1), 0.0)
        out = torch.where(is_mara.unsqueeze(1), one_hot, others)
        return out, StepResult(is_mara, emit | ~is_mara, position_in_list, evaluated, next_input)

    def _record(self, is_mara_cpu, s, hidden, decision_logits, position, asked, accepted, emit,
                fresh) -> None:
        """Add this step's judged candidates of seeded rows to ``self.trace``.

        The emitted token's ``log π_θ(t) − log π_ref(t)`` (the trainer's KL
        term) is ``log_reject + log a`` (``a`` → 1 unasked) minus the log of
        its probability under the LLM; ``log_reject`` accumulates
        ``log(1 − a_j)`` over the position's rejections.
        """
        b = hidden.shape[0]
        rows = (is_mara_cpu & self.pending_cpu[:b] & self.params_cpu["seeded"][:b]).nonzero()
        p_ref = s["cand_prob"].gather(1, s["index"].unsqueeze(1)).squeeze(1)
        diff, log_reject = walk_log_ratio(s["log_reject"], torch.log_softmax(decision_logits, -1),
                                          asked, p_ref, fresh | emit)
        s["log_reject"].copy_(log_reject)
        if rows.numel():
            rows = rows.squeeze(1).to(hidden.device, non_blocking=True)
            self.trace.record(rows, seed=self.params["seed"], key=position * KEY_SPAN + s["index"],
                              asked=asked, accepted=accepted, emit=emit, diff=diff,
                              state=hidden.float())

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

from vllm_align.engine.batch_rows import move_row
from vllm_align.mara.agent import ACCEPT, MaraAgent
from vllm_align.mara.rules import WalkStep, candidate_set, decision_uniform, walk_step


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
        asked: [N] int64 agent verdicts used so far at this position.
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
        }
        self.pending_cpu = torch.zeros(n, dtype=torch.bool)
        self.next_input_cpu = torch.zeros(n, dtype=torch.int64)

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
             agents: Sequence[MaraAgent], others: torch.Tensor,
             position: torch.Tensor) -> tuple[torch.Tensor, StepResult]:
        """Judge each MARA row's fed candidate and choose what it feeds next.

        Args:
            logits: [B, V] the served LLM's logits at each row's last fed token.
            hidden: [B, d] its final hidden states there (the agent's state).
            is_mara: [B] bool, MARA rows whose output this step is kept.
            agents: the engine's agents, indexed by the ``agent`` codes.
            others: [B, V] float32 logits for the non-MARA rows (their rules).
            position: [B] int64 tokens each row has emitted so far.
        Returns:
            ``(out, result)``: ``out`` [B, V] float32 logits, one-hot (0 at the
            token to sample, −inf elsewhere) on MARA rows so that vLLM's sampler
            returns the emitted token, ``others`` elsewhere; and the
            ``StepResult``.
        """
        return self.advance(self.judge(hidden, is_mara, agents, position), logits, others)

    def judge(self, hidden: torch.Tensor, is_mara: torch.Tensor, agents: Sequence[MaraAgent],
              position: torch.Tensor) -> "Judgement":
        """The agents' verdicts on the fed candidates (state unchanged; see ``step``)."""
        b = hidden.shape[0]
        p = {k: v[:b] for k, v in self.params.items()}
        s = {k: v[:b] for k, v in self.state.items()}
        decision_logits = None
        for code, agent in enumerate(agents):
            # One agent: every row at once, no host sync to gather its rows.
            x = agent.decision_logits(hidden)
            decision_logits = x if decision_logits is None else torch.where(
                (p["agent"] == code).unsqueeze(1), x, decision_logits)
        accept_prob = torch.softmax(decision_logits, dim=-1)[:, ACCEPT]
        walk = walk_step(s["index"], s["n_valid"], accept_prob, p["threshold"],
                         p["fallback_last"], p["sampled"], self.decision_uniforms(b, position))
        judging = is_mara & s["pending"]
        done = walk.done | s["forced"]
        chosen = torch.where(s["forced"], s["index"], walk.chosen_index)
        emit = judging & done & (chosen == s["index"])
        return Judgement(is_mara, judging, decision_logits, walk, walk.asked & ~s["forced"],
                         done, chosen, emit, is_mara & (~s["pending"] | emit))

    def advance(self, j: "Judgement", logits: torch.Tensor,
                others: torch.Tensor) -> tuple[torch.Tensor, StepResult]:
        """Apply a ``Judgement``: the rows' next candidates and the step's logits."""
        b = logits.shape[0]
        p = {k: v[:b] for k, v in self.params.items()}
        s = {k: v[:b] for k, v in self.state.items()}
        asked = torch.where(j.judging, s["asked"] + j.asked.long(), s["asked"])
        refeed = j.judging & j.done & ~j.emit  # fallback "first": feed the first candidate again
        emitted = s["cand"].gather(1, s["index"].unsqueeze(1)).squeeze(1)
        position_in_list, evaluated = s["index"].clone(), asked.clone()

        # New candidate lists: after prefill / re-entry, and after each emit.
        fresh = j.fresh
        index = torch.where(j.judging & ~j.done, j.walk.next_index, s["index"])
        index = torch.where(refeed, j.chosen, index)
        forced = torch.where(j.judging, refeed, s["forced"])
        ids, probs, valid = candidate_set(logits, p["top_k"], p["top_p"], self.max_k)
        cand = torch.where(fresh.unsqueeze(1), ids, s["cand"])
        cand_prob = torch.where(fresh.unsqueeze(1), probs, s["cand_prob"])
        n_valid = torch.where(fresh, valid.sum(dim=1), s["n_valid"])
        index = torch.where(fresh, 0, index)
        forced = forced & ~fresh
        asked = torch.where(fresh, 0, asked)
        pending = s["pending"] | j.is_mara

        for name, value in (("cand", cand), ("cand_prob", cand_prob), ("n_valid", n_valid),
                            ("index", index), ("forced", forced), ("asked", asked),
                            ("pending", pending)):
            s[name].copy_(value)
        next_input = cand.gather(1, index.unsqueeze(1)).squeeze(1)

        token = torch.where(j.emit, emitted, next_input)
        one_hot = torch.full_like(others, float("-inf"))
        one_hot.scatter_(1, token.unsqueeze(1), 0.0)
        out = torch.where(j.is_mara.unsqueeze(1), one_hot, others)
        return out, StepResult(j.is_mara, j.emit | ~j.is_mara, position_in_list, evaluated,
                               next_input)


class Judgement(NamedTuple):
    """The agents' verdicts of one step, before the walk state moves on (all [B]).

    Attributes:
        is_mara: MARA rows whose output this step is kept.
        judging: those with a fed candidate to judge (not a fresh start).
        decision_logits: [B, 2] the row's agent's (reject, accept) logits.
        walk: the walk's ``WalkStep`` at each row's index.
        asked: the agent's verdict was used (not a forced re-feed).
        done: the position ends (an emit, or a re-feed of the first candidate).
        chosen: the candidate the walk chose where done.
        emit: the row emits its fed candidate.
        fresh: the row gets a new candidate list (a start, or after an emit).
    """

    is_mara: torch.Tensor
    judging: torch.Tensor
    decision_logits: torch.Tensor
    walk: WalkStep
    asked: torch.Tensor
    done: torch.Tensor
    chosen: torch.Tensor
    emit: torch.Tensor
    fresh: torch.Tensor

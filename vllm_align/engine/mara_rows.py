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
``BatchUpdate`` diffs by ``AlignBatchState``). A step's work follows its own
rows: the batch state hands ``step`` the M MARA rows whose output is kept
(their indices known on the host), each agent judges its own rows, the
candidate lists are ranked over those M rows only, ``candidate_width``
columns wide (the largest ``top_k`` among the live MARA rows: it shrinks when
a large-``top_k`` request leaves), and the emitted tokens are written into
those rows of the step's logits. ``step`` is batched tensor code with no host
sync; the runner copies its small ``[M]`` results to the host once per step
(``StepResult``).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from vllm_align.engine.batch_rows import move_row
from vllm_align.mara.agent import ACCEPT, MaraAgent
from vllm_align.mara.rules import WalkStep, candidate_set, decision_uniform, walk_step


class StepResult(NamedTuple):
    """One step's outcome for the M MARA rows it judged or (re)started.

    Attributes:
        rows: [M] int64 host numpy, their persistent-batch rows (partial
            prefills, whose output vLLM discards, are not among them).
        emit: [M] bool, the row emits a token this step.
        position: [M] int64, where ``emit``: the emitted candidate's 0-based
            position in its list (the paper's accepted position, Figure 3).
        evaluated: [M] int64, where ``emit``: candidates the agent was asked about.
        next_input: [M] int64, the token the row feeds next step (its pending candidate).
    """

    rows: np.ndarray
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
    Walk state (device; K_cap columns, the largest width used so far, of
    which the first ``candidate_width`` are read):
        cand: [N, K_cap] int64 candidate ids of the row's current position;
        cand_prob: [N, K_cap] float32 their probabilities under the LLM;
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
        self.candidate_width = 1
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
        # A new (or re-added) request starts without candidates: its next
        # forward (prefill, or a re-feed of its last token) produces them.
        self.state["pending"][index] = False
        self.state["forced"][index] = False
        self.pending_cpu[index] = False

    def move(self, src: int, dst: int, swap: bool) -> None:
        move_row([*self.params_cpu.values(), *self.state.values(), self.pending_cpu,
                  self.next_input_cpu], src, dst, swap)

    def sync_params(self, mara_rows: np.ndarray) -> None:
        """After a batch update: the parameters to the device, and the candidate width
        for the live MARA rows ``mara_rows`` ([M] host int)."""
        for k, t in self.params_cpu.items():
            self.params[k].copy_(t, non_blocking=True)
        top_k = self.params_cpu["top_k"].numpy()[mara_rows]
        self.candidate_width = int(top_k.max()) if top_k.size else 1
        capacity = self.state["cand"].shape[1]
        if self.candidate_width > capacity:  # storage grows; the width read follows the batch
            for name in ("cand", "cand_prob"):
                old = self.state[name]
                new = torch.zeros(old.shape[0], self.candidate_width, dtype=old.dtype,
                                  device=old.device)
                new[:, :capacity] = old
                self.state[name] = new

    # -- one engine step ---------------------------------------------------
    def step(self, logits: torch.Tensor, hidden: torch.Tensor, rows: np.ndarray,
             at: torch.Tensor, agents: Sequence[MaraAgent], out: torch.Tensor,
             position: torch.Tensor) -> StepResult:
        """Judge the MARA rows' fed candidates, choose what they feed next, and write
        the tokens they sample into ``out``.

        Args:
            logits: [M, V] the served LLM's logits at each MARA row's last fed token.
            hidden: [M, d] its final hidden states there (the agent's state).
            rows: [M] host int, those rows' persistent-batch rows (kept output only);
                at: [M] int64, the same on the device.
            agents: the engine's agents, indexed by the ``agent`` codes.
            out: [B, V] float32 logits of the step, changed in place: one-hot (0 at
                the token to sample, −inf elsewhere) on the MARA rows, so that vLLM's
                sampler returns the emitted token (or the next candidate to feed).
            position: [M] int64 tokens each row has emitted so far.
        """
        return self.advance(self.judge(hidden, rows, at, agents, position), logits, out)

    def judge(self, hidden: torch.Tensor, rows: np.ndarray, at: torch.Tensor,
              agents: Sequence[MaraAgent], position: torch.Tensor) -> "Judgement":
        """The agents' verdicts on the fed candidates (state unchanged; see ``step``)."""
        p = {k: v.index_select(0, at) for k, v in self.params.items()}
        s = {k: self.state[k].index_select(0, at)
             for k in ("n_valid", "index", "pending", "forced")}
        codes = self.params_cpu["agent"].numpy()[rows]
        if len(agents) == 1 or (codes == codes[0]).all():  # one agent: no gather
            decision_logits = agents[int(codes[0])].decision_logits(hidden)
        else:
            decision_logits = hidden.new_empty(hidden.shape[0], 2, dtype=torch.float32)
            for code in np.unique(codes):  # each agent on its own rows
                mine = torch.from_numpy(np.flatnonzero(codes == code)).to(
                    hidden.device, non_blocking=True)
                decision_logits.index_copy_(0, mine, agents[int(code)].decision_logits(
                    hidden.index_select(0, mine)).float())
        accept_prob = torch.softmax(decision_logits, dim=-1)[:, ACCEPT]
        # A seeded row's draw is ``rules.decision_uniform(seed, position, index)``: its
        # decisions depend on its seed alone; unseeded rows share the global generator.
        uniform = torch.where(p["seeded"], decision_uniform(p["seed"], position, s["index"]),
                              torch.rand(len(rows), device=self.device))
        walk = walk_step(s["index"], s["n_valid"], accept_prob, p["threshold"],
                         p["fallback_last"], p["sampled"], uniform)
        judging = s["pending"]
        done = walk.done | s["forced"]
        chosen = torch.where(s["forced"], s["index"], walk.chosen_index)
        emit = judging & done & (chosen == s["index"])
        return Judgement(rows, at, judging, decision_logits, walk, walk.asked & ~s["forced"],
                         done, chosen, emit, ~s["pending"] | emit)

    def advance(self, j: "Judgement", logits: torch.Tensor, out: torch.Tensor) -> StepResult:
        """Apply a ``Judgement``: the rows' next candidates and their tokens in ``out``."""
        at, width = j.at, self.candidate_width
        p = {k: self.params[k].index_select(0, at) for k in ("top_k", "top_p")}
        s = {k: v.index_select(0, at) for k, v in self.state.items()}
        s["cand"], s["cand_prob"] = s["cand"][:, :width], s["cand_prob"][:, :width]
        asked = torch.where(j.judging, s["asked"] + j.asked.long(), s["asked"])
        refeed = j.judging & j.done & ~j.emit  # fallback "first": feed the first candidate again
        emitted = s["cand"].gather(1, s["index"].unsqueeze(1)).squeeze(1)
        position_in_list, evaluated = s["index"], asked

        # New candidate lists: after prefill / re-entry, and after each emit.
        fresh = j.fresh
        index = torch.where(j.judging & ~j.done, j.walk.next_index, s["index"])
        index = torch.where(refeed, j.chosen, index)
        forced = torch.where(j.judging, refeed, s["forced"]) & ~fresh
        ids, probs, valid = candidate_set(logits, p["top_k"], p["top_p"], width)
        cand = torch.where(fresh.unsqueeze(1), ids, s["cand"])
        cand_prob = torch.where(fresh.unsqueeze(1), probs, s["cand_prob"])
        n_valid = torch.where(fresh, valid.sum(dim=1), s["n_valid"])
        index = torch.where(fresh, 0, index)
        asked = torch.where(fresh, 0, asked)

        state = self.state
        for name, value in (("n_valid", n_valid), ("index", index), ("forced", forced),
                            ("asked", asked), ("pending", torch.ones_like(s["pending"]))):
            state[name].index_copy_(0, at, value)
        for name, value in (("cand", cand), ("cand_prob", cand_prob)):
            state[name][:, :width].index_copy_(0, at, value)
        next_input = cand.gather(1, index.unsqueeze(1)).squeeze(1)

        token = torch.where(j.emit, emitted, next_input)
        out.index_fill_(0, at, float("-inf"))
        out[at, token] = 0.0
        return StepResult(j.rows, j.emit, position_in_list, evaluated, next_input)


class Judgement(NamedTuple):
    """The agents' verdicts of one step, before the walk state moves on (all [M]).

    Attributes:
        rows: [M] host int, the MARA rows; at: [M] device int64, the same.
        judging: rows with a fed candidate to judge (not a fresh start).
        decision_logits: [M, 2] float32, the row's agent's (reject, accept) logits.
        walk: the walk's ``WalkStep`` at each row's index.
        asked: the agent's verdict was used (not a forced re-feed).
        done: the position ends (an emit, or a re-feed of the first candidate).
        chosen: the candidate the walk chose where done.
        emit: the row emits its fed candidate.
        fresh: the row gets a new candidate list (a start, or after an emit).
    """

    rows: np.ndarray
    at: torch.Tensor
    judging: torch.Tensor
    decision_logits: torch.Tensor
    walk: WalkStep
    asked: torch.Tensor
    done: torch.Tensor
    chosen: torch.Tensor
    emit: torch.Tensor
    fresh: torch.Tensor

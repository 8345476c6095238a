"""What a trainer runs inside the workers of an engine it rolls out in.

vLLM's public way to run code in an engine's workers is a worker extension
(``LLM(..., worker_extension_cls=WORKER_EXTENSION)``), whose methods
``LLM.collective_rpc(name, args=...)`` calls on every worker. Three are added:

* ``vllm_align_set_agent(name, weights)``: new weights (a safetensors blob)
  for a served MARA agent, copied into the loaded network in place: no
  restart, the LLM stays loaded (an agent is a few MB; the SAC learner sends
  its actor each rollout);
* ``vllm_align_record(on)``: start (or stop) recording the decisions of seeded
  MARA rows: the batch's ``MaraRows`` is replaced by a ``RecordingMaraRows``
  holding the same state (and back);
* ``vllm_align_take_records()``: the records since the last call (a
  safetensors blob; empty when there are none).

Arguments and results travel as bytes: the engine core re-pickles arguments for
its workers, which tensors it received zero-copy refuse, and vLLM returns a
utility call's tensors untyped unless insecure serialization is allowed.

Serving engines load no extension: their ``MaraRows`` keeps no trace and runs
no record step. A recording engine records its seeded rows only (every episode
of a rollout has its own seed, which keys its records). With tensor
parallelism every rank walks the same candidates; the trainer reads the first
rank's records.

Records (one per judged candidate, in step order; M rows):
    seed: [M] int64, the request's seed (the episode).
    key: [M] int64, ``position · KEY_SPAN + index``: the candidate's response
        position (tokens emitted before it) and place in the walk; walk order.
    asked: [M] bool, the agent decided (a lone or forced candidate is not asked).
    accepted: [M] bool, the action where asked.
    emit: [M] bool, the candidate was emitted.
    diff: [M] float32, where emitted: ``log π_θ(t) − log π_ref(t)``.
    state: [M, d] float32, the LLM's final hidden state at the candidate.

A preempted request walks its position again with the same seeded draws, so a
key may appear twice with (numerically) the same record; readers keep one.
"""

from __future__ import annotations

import torch

from vllm_align.engine.batch_rows import move_row
from vllm_align.engine.batch_state import align_state
from vllm_align.engine.mara_rows import MaraRows
from vllm_align.mara.rules import KEY_SPAN, walk_log_ratio

WORKER_EXTENSION = "vllm_align.engine.rollout_worker.RolloutWorkerExtension"
FIELDS = ("seed", "key", "asked", "accepted", "emit", "diff", "state")


class RecordingMaraRows(MaraRows):
    """``MaraRows`` that also records each step's judged candidates of seeded rows.

    Extra state: log_reject [N] float32 device, ``Σ log(1 − a_j)`` over the
    rejections at the row's position (the KL term's running part); the
    records, kept on the device until ``take``.
    """

    @classmethod
    def adopt(cls, rows: MaraRows) -> "RecordingMaraRows":
        """A recorder holding ``rows``' state (tensors shared, not copied)."""
        new = cls.__new__(cls)
        new.__dict__.update(rows.__dict__)
        new.log_reject = torch.zeros(rows.pending_cpu.shape[0], device=rows.device)
        new._steps = []
        return new

    def plain(self) -> MaraRows:
        """The same state as a serving ``MaraRows`` (the records are dropped)."""
        rows = MaraRows.__new__(MaraRows)
        rows.__dict__.update({k: v for k, v in self.__dict__.items()
                              if k not in ("log_reject", "_steps")})
        return rows

    def move(self, src: int, dst: int, swap: bool) -> None:
        super().move(src, dst, swap)
        move_row([self.log_reject], src, dst, swap)

    def step(self, logits, hidden, rows, at, agents, out, position):
        j = self.judge(hidden, rows, at, agents, position)
        self._record(j, hidden, position)
        return self.advance(j, logits, out)

    def _record(self, j, hidden: torch.Tensor, position: torch.Tensor) -> None:
        """The emitted token's ``log π_θ(t) − log π_ref(t)`` (``rules.walk_log_ratio``)
        and this step's judged candidates of seeded rows (all [M], the step's MARA rows)."""
        index = self.state["index"].index_select(0, j.at)
        p_ref = self.state["cand_prob"].index_select(0, j.at).gather(
            1, index.unsqueeze(1)).squeeze(1)
        diff, log_reject = walk_log_ratio(self.log_reject.index_select(0, j.at),
                                          torch.log_softmax(j.decision_logits, -1), j.asked,
                                          p_ref, j.fresh | j.emit)
        self.log_reject.index_copy_(0, j.at, log_reject)
        # Judged (pending) and seeded, from the host mirrors: no device sync.
        keep = (self.pending_cpu.numpy()[j.rows] & self.params_cpu["seeded"].numpy()[j.rows])
        picked = torch.from_numpy(keep.nonzero()[0]).to(hidden.device, non_blocking=True)
        if picked.numel():
            fields = dict(seed=self.params["seed"].index_select(0, j.at),
                          key=position * KEY_SPAN + index, asked=j.asked,
                          accepted=j.walk.accepted, emit=j.emit, diff=diff,
                          state=hidden.float())
            self._steps.append(tuple(fields[name].index_select(0, picked) for name in FIELDS))

    def take(self) -> dict[str, torch.Tensor]:
        """Everything recorded since the last call, concatenated on the host."""
        steps, self._steps = self._steps, []
        if not steps:
            return {}
        return {name: torch.cat(column).cpu() for name, column in zip(FIELDS, zip(*steps))}


class RolloutWorkerExtension:
    """Mixed into vLLM's worker class by ``worker_extension_cls`` (``self`` is the worker)."""

    def _vllm_align_mara(self):
        state = align_state(self.model_runner)
        if state is None or state.mara is None:
            raise ValueError("this engine serves no MARA agent (additional_config "
                             "align.mara_agents)")
        return state

    def vllm_align_set_agent(self, name: str, weights: bytes) -> None:
        from safetensors.torch import load

        index = self._vllm_align_mara().mara.agent_index.get(name)
        if index is None:
            raise ValueError(f"unknown MARA agent {name!r}")
        agent = self.model_runner.get_model().agents[index]
        with torch.no_grad():
            agent.load_state_dict(load(weights))

    def vllm_align_record(self, on: bool) -> None:
        state = self._vllm_align_mara()
        recording = isinstance(state.mara, RecordingMaraRows)
        if on and not recording:
            state.mara = RecordingMaraRows.adopt(state.mara)
        elif not on and recording:
            state.mara = state.mara.plain()

    def vllm_align_take_records(self) -> bytes:
        from safetensors.torch import save

        mara = self._vllm_align_mara().mara
        records = mara.take() if isinstance(mara, RecordingMaraRows) else {}
        return save(records) if records else b""

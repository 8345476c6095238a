"""What a trainer runs inside the workers of an engine it rolls out in.

vLLM's public way to run code in an engine's workers is a worker extension
(``LLM(..., worker_extension_cls=WORKER_EXTENSION)``), whose methods
``LLM.collective_rpc(name, args=...)`` calls on every worker. Three are added:

* ``vllm_align_set_agent(name, weights)``: new weights (a safetensors blob)
  for a served MARA agent, copied into the loaded network in place: no
  restart, the LLM stays loaded (an agent is a few MB; the SAC learner sends
  its actor each rollout);
* ``vllm_align_record(on)``: start (or stop) recording the decisions of seeded
  MARA rows (``engine/mara_trace.py``);
* ``vllm_align_take_records()``: the records since the last call (a
  safetensors blob; empty when there are none).

Arguments and results travel as bytes: the engine core re-pickles arguments for
its workers, which tensors it received zero-copy refuse, and vLLM returns a
utility call's tensors untyped unless insecure serialization is allowed.

Serving engines load no extension and never record; recording costs an engine
nothing for its unseeded rows. With tensor parallelism every rank walks the same
candidates; the trainer reads the first rank's records.
"""

from __future__ import annotations

import torch

from vllm_align.engine.mara_trace import DecisionTrace
from vllm_align.patches.model_runner import align_state

WORKER_EXTENSION = "vllm_align.engine.training.RolloutWorkerExtension"


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
        self._vllm_align_mara().mara.trace = DecisionTrace() if on else None

    def vllm_align_take_records(self) -> bytes:
        from safetensors.torch import save

        trace = self._vllm_align_mara().mara.trace
        records = trace.take() if trace is not None else {}
        return save(records) if records else b""

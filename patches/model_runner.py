"""``GPUModelRunner`` (also the CPU runner's base): MARA's candidate feeding.

Three sites, each around the stock method (``vllm_align/engine/mara_rows.py``
has the design):

* ``_prepare_inputs``: before it, each MARA row that has a pending candidate
  is moved one position ahead: its KV is complete up to its last emitted
  token, so it feeds the candidate at ``num_tokens`` rather than re-feeding
  the last token (the scheduler counts as for plain decode). After it, the
  step's partial-prefill mask (rows whose output vLLM drops) is handed to the
  batch state, so those rows are left alone.
* ``_bookkeeping_sync``: MARA rows that emit nothing this step are added to
  vLLM's discard mask (no token appended, none returned); the step's small
  per-row results come to the host here, in one copy, where vLLM syncs anyway.
* ``sample_tokens``: the step's MARA report rides on the ``ModelRunnerOutput``
  to the scheduler (rollback of non-emitting rows, acceptance statistics).

Written for vLLM 0.32 (V1 runner, no async scheduling: the engine disables it
when MARA agents are configured).
"""

from __future__ import annotations

import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_align.engine.batch_state import state_for
from vllm_align.engine.stats import MARA_REPORT_ATTR
from vllm_align.patches.base import VllmPatch


def _mara_state(runner):
    state = state_for(runner.vllm_config)
    return state if state is not None and state.mara is not None else None


class ModelRunnerPatch(VllmPatch):
    target = GPUModelRunner
    replaces = ("_prepare_inputs", "_bookkeeping_sync", "sample_tokens")

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        state = _mara_state(self)
        if state is not None:
            n = self.input_batch.num_reqs
            batch = self.input_batch
            rows = state.mara.pending_cpu[:n].nonzero().squeeze(1).numpy()
            if rows.size:
                ends = batch.num_tokens_no_spec[rows]
                batch.token_ids_cpu[rows, ends] = state.mara.next_input_cpu[:n].numpy()[rows]
                batch.num_computed_tokens_cpu[rows] += 1
        out = ModelRunnerPatch.original("_prepare_inputs")(
            self, scheduler_output, num_scheduled_tokens)
        if state is not None:
            state.discard = self.discard_request_mask.gpu[: self.input_batch.num_reqs]
        return out

    def _bookkeeping_sync(self, scheduler_output, sampler_output, *args, **kwargs):
        state = _mara_state(self)
        self._vllm_align_report = None
        result = state.mara_result if state is not None else None
        if result is not None:
            n = self.input_batch.num_reqs
            host = torch.stack([result.is_mara.long(), result.emit.long(), result.position,
                                result.evaluated, result.next_input]).cpu().numpy()
            is_mara, emit = host[0].astype(bool), host[1].astype(bool)
            self.discard_request_mask.np[:n] |= is_mara & ~emit
            mara = state.mara
            mara.pending_cpu[:n] |= torch.from_numpy(is_mara)
            mara.next_input_cpu[:n] = torch.from_numpy(host[4])
            rows = is_mara.nonzero()[0]
            req_ids = self.input_batch.req_ids
            self._vllm_align_report = ([req_ids[i] for i in rows], emit[rows].tolist(),
                                       host[2][rows].tolist(), host[3][rows].tolist())
            # vLLM rewinds a discarded row's seeded generator (its sample is
            # redrawn later); a MARA row's sample is its one-hot token, so
            # there is nothing to rewind, and CPU generators cannot rewind.
            generators = self.input_batch.generators
            held = {i: generators.pop(i) for i in rows.tolist() if i in generators}
            try:
                return ModelRunnerPatch.original("_bookkeeping_sync")(
                    self, scheduler_output, sampler_output, *args, **kwargs)
            finally:
                generators.update(held)
        return ModelRunnerPatch.original("_bookkeeping_sync")(
            self, scheduler_output, sampler_output, *args, **kwargs)

    def sample_tokens(self, *args, **kwargs):
        self._vllm_align_report = None
        output = ModelRunnerPatch.original("sample_tokens")(self, *args, **kwargs)
        report = getattr(self, "_vllm_align_report", None)
        if report is not None and output is not None:
            setattr(output, MARA_REPORT_ATTR, report)
        return output

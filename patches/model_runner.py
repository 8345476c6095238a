"""``GPUModelRunner`` (also the CPU runner's base): MARA's candidate feeding, seeded rewinds.

Four sites, each around the stock method, all inert on an engine without
alignment configuration (no batch state; ``vllm_align/engine/mara_rows.py``
has the MARA design):

* ``_prepare_inputs``: before it, each MARA row that has a pending candidate
  is moved one position ahead: its KV is complete up to its last emitted
  token, so it feeds the candidate at ``num_tokens`` rather than re-feeding
  the last token (the scheduler counts as for plain decode). After it, the
  step's partial-prefill mask (rows whose output vLLM drops) and each row's
  response position (which seeded MARA decisions are drawn at) are handed to
  the batch state. It also marks the step as a
  model step, whose reference rows ``patches/attention_metadata.py`` plans, and
  binds the batch state to the pair model (which reads it in its forward).
* ``_sample``: vLLM samples a token for every row, also a partial prefill
  whose token it then discards, and rewinds that row's seeded generator with
  ``Generator.set_offset``. CPU generators have no offset ("CPU Generator
  does not use offset": the engine died on a seeded request whose prompt was
  prefilled in chunks). Here the states of those generators are saved
  before sampling and restored after it: the same rewind, for any generator.
* ``_bookkeeping_sync``: MARA rows that emit nothing this step are added to
  vLLM's discard mask (no token appended, none returned); the step's small
  per-row results come to the host here, in one copy, where vLLM syncs anyway.
  Generators that must not be rewound by offset (those restored in
  ``_sample``, and MARA rows', whose one-hot draw stands) are held out of
  vLLM's rewind.
* ``sample_tokens``: the step's MARA report rides on the ``ModelRunnerOutput``
  to the scheduler (rollback of non-emitting rows, acceptance statistics).

Written for vLLM 0.32 (V1 runner, no async scheduling: the engine disables it
when MARA agents are configured).
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_align.engine.batch_state import align_state
from vllm_align.engine.mara_stats import MARA_REPORT_ATTR
from vllm_align.patches.base import VllmPatch


def _mara_state(runner):
    state = align_state(runner)
    return state if state is not None and state.mara is not None else None


def _discarded_generators(runner) -> dict[int, torch.Generator]:
    """{row: seeded generator} of the rows whose sampled token vLLM discards this step."""
    n = runner.input_batch.num_reqs
    generators = runner.input_batch.generators
    if not generators:
        return {}
    discard = runner.discard_request_mask.np[:n]
    return {i: g for i, g in generators.items() if i < n and discard[i]}


class ModelRunnerPatch(VllmPatch):
    target = GPUModelRunner
    replaces = ("_prepare_inputs", "_sample", "_bookkeeping_sync", "sample_tokens")

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        align = align_state(self)
        if align is not None:  # a model step: its reference rows are planned next
            align.begin_step()
            model = self.get_model()
            if hasattr(model, "align_state"):  # the pair model reads it in its forward
                model.align_state = align
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
            n = self.input_batch.num_reqs
            batch = self.input_batch
            position = batch.num_tokens_no_spec[:n] - batch.num_prompt_tokens[:n]
            state.set_step_inputs(self.discard_request_mask.np[:n], position.astype(np.int64))
        return out

    def _sample(self, *args, **kwargs):
        restore = {}
        if align_state(self) is not None:
            restore = {g: g.get_state() for g in _discarded_generators(self).values()
                       if g.device.type == "cpu"}
        try:
            return ModelRunnerPatch.original("_sample")(self, *args, **kwargs)
        finally:
            for generator, saved in restore.items():
                generator.set_state(saved)

    def _bookkeeping_sync(self, scheduler_output, sampler_output, *args, **kwargs):
        if align_state(self) is None:
            return ModelRunnerPatch.original("_bookkeeping_sync")(
                self, scheduler_output, sampler_output, *args, **kwargs)
        state = _mara_state(self)
        self._vllm_align_report = None
        result = state.mara_result if state is not None else None
        held_rows: set[int] = set()
        if result is not None:
            rows = result.rows
            host = torch.stack([result.emit.long(), result.position, result.evaluated,
                                result.next_input]).cpu().numpy()
            emit = host[0].astype(bool)
            self.discard_request_mask.np[rows[~emit]] = True
            mara = state.mara
            mara.pending_cpu[rows] = True
            mara.next_input_cpu[rows] = torch.from_numpy(host[3])
            req_ids = self.input_batch.req_ids
            self._vllm_align_report = ([req_ids[i] for i in rows], emit.tolist(),
                                       host[1].tolist(), host[2].tolist())
            # vLLM rewinds a discarded row's seeded generator (its sample is
            # redrawn later); a MARA row's sample is its one-hot token, so
            # there is nothing to rewind.
            held_rows.update(rows.tolist())
        # CPU generators were rewound in _sample already (they have no offset).
        held_rows.update(i for i, g in _discarded_generators(self).items()
                         if g.device.type == "cpu")
        generators = self.input_batch.generators
        held = {i: generators.pop(i) for i in held_rows if i in generators}
        try:
            return ModelRunnerPatch.original("_bookkeeping_sync")(
                self, scheduler_output, sampler_output, *args, **kwargs)
        finally:
            generators.update(held)

    def sample_tokens(self, *args, **kwargs):
        self._vllm_align_report = None
        output = ModelRunnerPatch.original("sample_tokens")(self, *args, **kwargs)
        report = getattr(self, "_vllm_align_report", None)
        if report is not None and output is not None:
            setattr(output, MARA_REPORT_ATTR, report)
        return output

"""Per-sequence alignment parameters as preallocated batched tensors.

``AlignBatchState`` is a V1 ``LogitsProcessor``, loaded by engines with
alignment configuration only (``patches/engine_args.py`` adds it to their
``logits_processors``; a plain engine never loads it). It does not touch the
logits itself: vLLM computes raw logprobs *before* logits processors run, and
returned logprobs must describe the distribution actually used. So the rule is
applied inside the pair model's ``compute_logits`` (see ``align_model.py``),
which reads the tensors kept here. This class only:

* mirrors the persistent batch: rows are written when requests join, moved
  when vLLM condenses or reorders the batch, all from ``BatchUpdate`` diffs,
* flags the next ``compute_logits`` call of a step as the sampling call (the
  prompt-logprobs calls that may follow are one request's positions each, and
  get that request's rule through ``PromptSlice``),
* keeps the rows that read the reference model (DeRa, AAD), so that a step
  runs the reference for those rows only (``reference_rows.py``),
* gives prompt logprobs the rule of the row they belong to (``PromptHidden``,
  ``apply_row_rule``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.sample.logits_processor import (BatchUpdate, LogitsProcessor,
                                             MoveDirectionality)

from vllm_align import methods
from vllm_align.config import EXTRA_ARGS_KEY, AlignParams, EngineAlignConfig
from vllm_align.engine.batch_rows import move_row
from vllm_align.engine.mara_rows import MaraRows, StepResult
from vllm_align.engine.reference_rows import ReferencePlan

@dataclass
class PromptSlice:
    """Prompt positions of one row, as ``compute_logits`` gets them for prompt logprobs.

    Attributes:
        hidden: [n, H_aligned + H_ref] the step's hidden states at n consecutive
            positions of the row's prompt.
        row: the row's persistent-batch index (the batch state's row).
        lora_id: the row's LoRA adapter id (0: none).
    """

    hidden: torch.Tensor
    row: int
    lora_id: int = 0


class PromptHidden:
    """The step's hidden states, standing in for them in vLLM's prompt-logprobs loop.

    vLLM's ``GPUModelRunner._get_prompt_logprobs_dict`` slices the step's
    hidden states once per request asking for prompt logprobs,
    ``hidden_states[offset : offset + n]`` (``offset``: the request's first
    token in the step, ``query_start_loc[row]``), and hands the slice to the
    model's ``compute_logits``. Slicing this stand-in gives the same slice as a
    ``PromptSlice`` that also names the row, so that the pair model applies
    that row's rule (``patches/prompt_logprobs.py`` passes it in).

    Args:
        hidden: [T, H_aligned + H_ref] the step's hidden states.
        query_start_loc: [B + 1] host int, row b's tokens are
            ``query_start_loc[b]:query_start_loc[b + 1]`` of the step's T.
        lora_ids: [B] host int, row b's LoRA adapter id (0: none).
    """

    def __init__(self, hidden: torch.Tensor, query_start_loc: np.ndarray,
                 lora_ids: np.ndarray):
        self.hidden = hidden
        self._row_ends = query_start_loc[1:]
        self._lora_ids = lora_ids

    def __getitem__(self, index: slice) -> PromptSlice:
        start = index.start or 0
        # The row whose tokens start at ``start``: the first whose end lies past it.
        row = int(np.searchsorted(self._row_ends, start, side="right"))
        return PromptSlice(self.hidden[index], row, int(self._lora_ids[row]))


class AlignBatchState(LogitsProcessor):
    """Batched per-request method codes and parameters.

    Tensors (``max_num_seqs`` rows, row i = persistent-batch slot i):
        method: [N] int8 method codes (``methods.NONE``...).
        lam, alpha, entropy_threshold: [N] float32 (tau < 0 = disabled).
    Rows reading the reference (updated with the batch):
        reference_rows_np: [R] int64 host, sorted; reference_rows: [R] device.
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.config = EngineAlignConfig.parse(vllm_config.additional_config)
        n = vllm_config.scheduler_config.max_num_seqs
        self.device = device
        self._cpu = {
            "method": torch.zeros(n, dtype=torch.int8, pin_memory=is_pin_memory),
            "lam": torch.ones(n, dtype=torch.float32, pin_memory=is_pin_memory),
            "alpha": torch.ones(n, dtype=torch.float32, pin_memory=is_pin_memory),
            "entropy_threshold": torch.full((n,), -1.0, dtype=torch.float32,
                                            pin_memory=is_pin_memory),
        }
        self._dev = {k: v.to(device) for k, v in self._cpu.items()}
        self.num_reqs = 0
        self.has_dera = self.has_aad = self.has_mara = False
        self.sampling_call_pending = False
        self.has_reference_model = self.config.reference_model is not None
        self.reference_rows_np = np.zeros(0, dtype=np.int64)
        self.reference_rows = torch.zeros(0, dtype=torch.int64, device=device)
        self._step_rows_pending = False
        self.reference_plan: ReferencePlan | None = None
        # MARA (engines with agents): per-row walk state, the runner's
        # partial-prefill mask and response positions for the step, and the
        # step's result.
        self.mara = None if not self.config.mara_agents else MaraRows(
            n, vllm_config.model_config.get_vocab_size(), device, is_pin_memory,
            list(self.config.mara_agents))
        self.discard_cpu: np.ndarray | None = None
        self.mara_rows_np = np.zeros(0, dtype=np.int64)
        self.position: torch.Tensor | None = None
        self.mara_result: StepResult | None = None

    # -- LogitsProcessor interface -------------------------------------
    def is_argmax_invariant(self) -> bool:
        # The rule is applied in compute_logits; nothing left to do here.
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.sampling_call_pending = True
        self.mara_result = None
        if batch_update is None:
            return
        cpu = self._cpu
        for index, params, _, _ in batch_update.added:
            # Overwrite unconditionally: a slot refilled by a move may arrive
            # without a matching `removed` entry.
            # The rule's canonical form, written where the request entered
            # (patches/input_processor.py): read, not parsed again.
            spec = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
            rule = self.config.default if spec is None else AlignParams.from_json(spec)
            self._write_row(index, rule, params.seed)
        for src, dst, direction in batch_update.moved:
            swap = direction == MoveDirectionality.SWAP
            move_row(list(cpu.values()), src, dst, swap)
            if self.mara is not None:
                self.mara.move(src, dst, swap)
        self.num_reqs = batch_update.batch_size
        active = cpu["method"][: self.num_reqs]
        self.has_dera = bool((active == methods.DERA).any())
        self.has_aad = bool((active == methods.AAD).any())
        self.has_mara = bool((active == methods.MARA).any())
        reads = (active == methods.DERA) | (active == methods.AAD)
        self.reference_rows_np = reads.nonzero().squeeze(1).numpy()
        self.reference_rows = torch.from_numpy(self.reference_rows_np).to(
            self.device, non_blocking=True)
        for k, t in cpu.items():
            self._dev[k].copy_(t, non_blocking=True)
        if self.mara is not None:
            self.mara_rows_np = (active == methods.MARA).nonzero().squeeze(1).numpy()
            self.mara.sync_params(self.mara_rows_np)

    def _write_row(self, index: int, params: AlignParams, seed: int | None) -> None:
        cpu = self._cpu
        cpu["method"][index] = methods.METHOD_CODES[params.method]
        cpu["lam"][index] = params.lam
        cpu["alpha"][index] = params.alpha
        tau = params.entropy_threshold
        cpu["entropy_threshold"][index] = -1.0 if tau is None else tau
        if self.mara is not None:
            self.mara.write_row(index, params.mara, seed)

    # -- set by the runner each step (patches/) ------------------------------
    def begin_step(self) -> None:
        """A model step's inputs are being prepared (not a dummy or warm-up run)."""
        self._step_rows_pending = True
        self.reference_plan = None

    def take_step_reference_rows(self) -> np.ndarray | None:
        """[R] host rows reading the reference, once per model step (else None)."""
        if not self._step_rows_pending:
            return None
        self._step_rows_pending = False
        return self.reference_rows_np

    def take_reference_plan(self) -> ReferencePlan | None:
        """How this forward runs the reference; None: over every row."""
        plan, self.reference_plan = self.reference_plan, None
        return plan

    def set_step_inputs(self, discard: np.ndarray, position: np.ndarray) -> None:
        """The step's partial-prefill rows ([B] bool host) and each row's response
        position ([B] int64 host: tokens emitted so far)."""
        self.discard_cpu = discard
        self.position = torch.from_numpy(position).to(self.device, non_blocking=True)

    # -- used by the pair model -----------------------------------------
    @property
    def needs_reference(self) -> bool:
        return self.has_dera or self.has_aad

    def take_sampling_call(self, num_rows: int) -> bool:
        """True once per step, for the compute_logits call that samples."""
        if not self.sampling_call_pending or num_rows != self.num_reqs:
            return False
        self.sampling_call_pending = False
        return True

    def apply_rule(self, aligned: torch.Tensor,
                   reference: torch.Tensor | None) -> torch.Tensor:
        """Each row's rule.

        Args:
            aligned: [B, V] logits of the aligned model.
            reference: [R, V] reference logits of ``reference_rows``, or None
                when no row reads them.
        Returns:
            [B, V] float32 logits to sample; rows outside ``reference_rows``
            keep the aligned logits (MARA rows are decided later).
        """
        out = aligned.float()
        if reference is None:  # no row reads it: nothing to copy or mix
            return out
        rows, d = self.reference_rows, self._dev
        mixed = methods.align_logits(
            out[rows], reference, d["method"][rows], d["lam"][rows], d["alpha"][rows],
            d["entropy_threshold"][rows], has_dera=self.has_dera, has_aad=self.has_aad)
        return out.index_copy(0, rows, mixed)  # out of place: ``aligned`` stays as it was

    def reads_reference(self, row: int) -> bool:
        """Whether row ``row``'s rule reads the reference model (host; no device sync)."""
        return int(self._cpu["method"][row]) in (methods.DERA, methods.AAD)

    def apply_row_rule(self, aligned: torch.Tensor, reference: torch.Tensor | None,
                       row: int) -> torch.Tensor:
        """Row ``row``'s rule at n positions of its prompt (its prompt logprobs).

        The same rule, on the same per-row parameters, as the row's sampled
        tokens get from ``apply_rule``: DeRa's mixed logits, AAD's scores
        ``A`` over ``V_alpha``; a ``none`` row keeps the aligned logits.

        Args:
            aligned: [n, V] logits of the aligned model.
            reference: [n, V] logits of the reference model, or None when the
                row's rule does not read it.
        Returns:
            [n, V] float32 logits.
        """
        n, d = aligned.shape[0], self._dev
        code = int(self._cpu["method"][row])
        return methods.align_logits(
            aligned, reference, *(d[k][row:row + 1].expand(n) for k in
                                  ("method", "lam", "alpha", "entropy_threshold")),
            has_dera=code == methods.DERA, has_aad=code == methods.AAD)

    def apply_mara(self, aligned: torch.Tensor, hidden: torch.Tensor, out: torch.Tensor,
                   agents) -> torch.Tensor:
        """One MARA step on the batch's MARA rows (see ``mara_rows.MaraRows.step``).

        Args:
            aligned: [B, V] the served model's logits; hidden: [B, d] its final
                hidden states; out: [B, V] float32 logits of the other rows' rules,
                changed in place on the MARA rows.
        Returns:
            ``out``, one-hot on the MARA rows whose output this step is kept.
        """
        rows = self.mara_rows_np
        if self.discard_cpu is not None:  # partial prefills: vLLM drops their output
            rows = rows[~self.discard_cpu[rows]]
        if rows.size:
            at = torch.from_numpy(rows).to(aligned.device, non_blocking=True)
            self.mara_result = self.mara.step(aligned.index_select(0, at),
                                              hidden.index_select(0, at), rows, at, agents, out,
                                              self.position.index_select(0, at))
        return out


def align_state(runner) -> AlignBatchState | None:
    """The runner's batch state (one of its logits processors); None without alignment.

    Looked up again when vLLM rebuilds the input batch (it may, once the KV
    cache's block size is known), which rebuilds its logits processors.
    """
    batch = runner.input_batch
    cached = runner.__dict__.get("_vllm_align_state")
    if cached is None or cached[0] is not batch:
        state = next((p for p in batch.logitsprocs.all if isinstance(p, AlignBatchState)), None)
        cached = runner._vllm_align_state = (batch, state)
    return cached[1]

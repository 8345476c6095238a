"""``GPUModelRunner._build_attention_metadata`` (also the CPU runner's): the reference rows' metadata.

After vLLM builds the step's attention metadata, a pair engine whose batch
mixes rows that read the reference model (DeRa, AAD) with rows that do not
gets a second build for the reference layers, over the reading rows alone
(``vllm_align/engine/reference_rows.py`` has the design). The pair model
then runs the reference over those rows' tokens only. Steps where every row
or no row reads the reference need no second build.

The second build uses a private copy of each attention group (its own
metadata builder and kernel block table), so that a backend keeping
persistent buffers in its builder cannot have the main build's overwritten.
With CUDA graphs the captured forward has fixed shapes: the reference then
runs for every row, as before (one log line, at the first step that mixes both
kinds of rows). Written for vLLM 0.32.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager

import numpy as np
import torch
from vllm.config import CUDAGraphMode
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_align.engine.align_model import REFERENCE
from vllm_align.engine.batch_state import align_state
from vllm_align.engine.reference_rows import ReferencePlan, row_tokens
from vllm_align.patches.base import VllmPatch

logger = logging.getLogger("vllm.vllm_align")


@dataclasses.dataclass
class SubsetPlan(ReferencePlan):
    """A ``ReferencePlan`` over some rows, with their reference layers' metadata.

    Attributes:
        attn_metadata, slot_mapping: {reference layer name: value} for the
            reference rows alone, installed in the forward context while the
            reference runs.
    """

    attn_metadata: dict = dataclasses.field(default_factory=dict)
    slot_mapping: dict = dataclasses.field(default_factory=dict)

    @contextmanager
    def scope(self):
        """vLLM's attention ops look both up by layer name in the forward context
        (``get_attention_context``); the reference layers' entries are swapped for
        the reference rows' and restored afterwards."""
        from vllm.forward_context import get_forward_context

        ctx = get_forward_context()
        tables = ((ctx.attn_metadata, self.attn_metadata), (ctx.slot_mapping, self.slot_mapping))
        saved = [{name: table[name] for name in new} for table, new in tables]
        for table, new in tables:
            table.update(new)
        try:
            yield
        finally:
            for (table, _), old in zip(tables, saved):
                table.update(old)


def _subset_supported(runner) -> bool:
    """Whether this runner can run the reference over a subset of rows (checked once)."""
    ok = getattr(runner, "_vllm_align_subset_ok", None)
    if ok is None:
        mode = runner.compilation_config.cudagraph_mode
        ok = (mode in (None, CUDAGraphMode.NONE) and runner.dcp_world_size == 1
              and len(runner.kv_cache_config.kv_cache_groups) == 1)
        logger.info("vllm-align: the reference model runs for %s",
                    "DeRa/AAD rows only" if ok else
                    f"every row (cudagraph_mode={mode}, one KV-cache group and no "
                    "decode context parallelism are needed for DeRa/AAD rows only)")
        runner._vllm_align_subset_ok = ok
    return ok


def _reference_groups(runner) -> list:
    """Private copies of the attention groups holding reference layers (made once)."""
    groups = getattr(runner, "_vllm_align_reference_groups", None)
    if groups is None:
        groups = []
        for group in runner.attn_groups[0]:
            names = [n for n in group.layer_names if n.startswith(REFERENCE)]
            if not names:
                continue
            copy = dataclasses.replace(group, layer_names=names, metadata_builders=[],
                                       kernel_block_table=None, kernel_block_offsets=None)
            copy.create_metadata_builders(runner.vllm_config, runner.device,
                                          kernel_block_size=group.kernel_block_size)
            groups.append(copy)
        runner._vllm_align_reference_groups = groups
    return groups


def _subset_metadata(runner, rows: np.ndarray, num_reqs: int,
                     slot_mapping: torch.Tensor) -> SubsetPlan:
    """Attention metadata and slot mappings of the reference layers for ``rows`` only."""
    tokens_np, sub_qsl_np = row_tokens(runner.query_start_loc.np[: num_reqs + 1], rows)
    device = runner.device
    rows_cpu = torch.from_numpy(rows)
    rows_dev = rows_cpu.to(device, non_blocking=True)
    tokens = torch.from_numpy(tokens_np).to(device, non_blocking=True)
    sub_qsl_cpu = torch.from_numpy(sub_qsl_np)
    seq_upper = runner.optimistic_seq_lens_cpu[:num_reqs][rows_cpu]
    batch = runner.input_batch
    is_prefilling = (batch.num_computed_tokens_cpu_tensor[:num_reqs][rows_cpu]
                     < batch.num_prompt_tokens_cpu_tensor[:num_reqs][rows_cpu])
    sub_slots = slot_mapping[tokens]
    common = CommonAttentionMetadata(
        query_start_loc=sub_qsl_cpu.to(device, non_blocking=True),
        query_start_loc_cpu=sub_qsl_cpu,
        seq_lens=runner.seq_lens[:num_reqs][rows_dev],
        seq_lens_cpu_upper_bound=seq_upper,
        num_reqs=len(rows),
        num_actual_tokens=len(tokens_np),
        max_query_len=int(np.diff(sub_qsl_np).max()),
        max_seq_len=int(seq_upper.max()),
        block_table_tensor=batch.block_table[0].get_device_tensor(num_reqs)[rows_dev],
        slot_mapping=sub_slots,
        causal=True,
        is_prefilling=is_prefilling,
        positions=runner.positions[tokens],
    )
    plan = SubsetPlan(tokens)
    for group in _reference_groups(runner):
        metadata = group.build_metadata(common)
        for name in group.layer_names:
            plan.attn_metadata[name] = metadata
            plan.slot_mapping[name] = sub_slots
    return plan


class AttentionMetadataPatch(VllmPatch):
    target = GPUModelRunner
    replaces = ("_build_attention_metadata",)

    def _build_attention_metadata(self, *args, **kwargs):
        out = AttentionMetadataPatch.original("_build_attention_metadata")(self, *args, **kwargs)
        state = align_state(self)
        if state is None or not state.has_reference_model:
            return out
        rows = state.take_step_reference_rows()
        if rows is None or len(rows) == kwargs["num_reqs"] or not _subset_supported(self):
            return out  # not a model step, or every row reads it: the full forward
        if len(rows) == 0:
            state.reference_plan = ReferencePlan(None)
        elif kwargs.get("ubatch_slices") is None:
            state.reference_plan = _subset_metadata(self, rows, kwargs["num_reqs"],
                                                    kwargs["slot_mappings"][0])
        return out

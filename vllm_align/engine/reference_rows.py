"""The reference model only where a row's rule reads it.

In a pair engine every row is fed to the aligned model, but only DeRa and
AAD rows read the reference model. Per step, the reference's forward covers
the tokens of those rows alone (decode and chunked-prefill tokens alike):

    rows R (host, sorted) -> their tokens idx [T_R] within the step's [T]
    reference(input_ids[idx], positions[idx]) with attention metadata built
        for the R rows (``patches/attention_metadata.py``)
    h_ref [T, H] = 0, h_ref[idx] = that output   (rows outside R never read it)

KV: both models' layers share one KV-cache group, so a block computed by a
row outside R holds no valid reference KV. Prefix-cache hits must never
cross between the two kinds of rows; ``kv_cache_salt`` gives every request
that reads the reference a salt no other request can have, so their block
hashes differ from the first block on. Everything else (preemption, n > 1,
MARA's candidate feeding) recomputes or reuses only a request's own blocks.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

# Salts of requests that read the reference model start with this; every
# other request's own salt is moved under ``_ALIGNED_ONLY`` so that no client
# can choose a salt that collides with it.
_READS_REFERENCE = "vllm-align:reference:"
_ALIGNED_ONLY = "vllm-align:aligned:"


def kv_cache_salt(salt: str | None, reads_reference: bool) -> str | None:
    """The cache salt a request runs with on a pair engine.

    A request whose rule reads the reference gets ``_READS_REFERENCE + salt``;
    another keeps no salt (sharing blocks with plain requests) or gets
    ``_ALIGNED_ONLY + salt``. The two prefixes never collide, so blocks
    computed without the reference are never hit by a request that reads it,
    and the reverse.
    """
    if reads_reference:
        return _READS_REFERENCE + (salt or "")
    return None if salt is None else _ALIGNED_ONLY + salt


def row_tokens(query_start_loc: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The step's token indices of ``rows`` and their own query offsets.

    Args:
        query_start_loc: [B + 1] int, row b's tokens are
            ``query_start_loc[b]:query_start_loc[b + 1]`` of the step's [T].
        rows: [R] int, sorted row indices.
    Returns:
        (tokens [T_R] int64: the rows' token indices in order,
         sub_query_start_loc [R + 1] int32: the same offsets within ``tokens``).
    """
    starts = query_start_loc[rows].astype(np.int64)
    lens = query_start_loc[rows + 1].astype(np.int64) - starts
    sub = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lens, out=sub[1:])
    # Token j of the concatenation belongs to row r(j): idx = j - sub[r] + starts[r].
    tokens = np.arange(int(sub[-1]), dtype=np.int64) + np.repeat(starts - sub[:-1], lens)
    return tokens, sub


@dataclass
class ReferencePlan:
    """How one step's forward runs the reference model.

    Attributes:
        tokens: [T_R] int64 device indices of the reference rows' tokens, or
            None: no row reads the reference (its forward is skipped).
        attn_metadata, slot_mapping: {reference layer name: value} for the
            reference rows alone, installed in the forward context while the
            reference runs.
    """

    tokens: torch.Tensor | None
    attn_metadata: dict = field(default_factory=dict)
    slot_mapping: dict = field(default_factory=dict)


@contextmanager
def reference_forward_context(plan: ReferencePlan):
    """Install the plan's per-layer attention metadata and slot mappings.

    vLLM's attention ops look both up by layer name in the forward context
    (``get_attention_context``); the reference layers' entries are swapped
    for the reference rows' and restored afterwards.
    """
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    tables = ((ctx.attn_metadata, plan.attn_metadata), (ctx.slot_mapping, plan.slot_mapping))
    saved = [{name: table[name] for name in new} for table, new in tables]
    for table, new in tables:
        table.update(new)
    try:
        yield
    finally:
        for (table, _), old in zip(tables, saved):
            table.update(old)

"""The reference model only where a row's rule reads it.

In a pair engine every row is fed to the aligned model, but only DeRa and
AAD rows read the reference model. Per step, the reference's forward covers
the tokens of those rows alone (decode and chunked-prefill tokens alike):

    rows R (host, sorted) -> their tokens idx [T_R] within the step's [T]
    reference(input_ids[idx], positions[idx]) with attention metadata built
        for the R rows (``patches/attention_metadata.py``, ``ReferencePlan.scope``)
    h_ref [T, H] = 0, h_ref[idx] = that output   (rows outside R never read it)

KV: both models' layers share one KV-cache group, so a block computed by a
row outside R holds no valid reference KV. Prefix-cache hits must never
cross between the two kinds of rows; ``kv_cache_salt`` gives every request
that reads the reference a salt no other request can have, so their block
hashes differ from the first block on. Everything else (preemption, n > 1,
MARA's candidate feeding) recomputes or reuses only a request's own blocks.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

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

    ``scope()`` is the context the reference's forward over ``tokens`` runs
    in: the attention metadata of those rows alone, installed by the plan that
    ``patches/attention_metadata.py`` builds (vLLM's forward context is
    internal); here, nothing to install.
    """

    tokens: torch.Tensor | None

    def scope(self):
        return nullcontext()

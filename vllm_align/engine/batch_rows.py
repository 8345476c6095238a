"""Per-row tensors that mirror vLLM's persistent batch, kept in step with its diffs."""

from __future__ import annotations

from typing import Sequence

import torch


def move_row(tensors: Sequence[torch.Tensor], src: int, dst: int, swap: bool) -> None:
    """Row ``src`` of every tensor moves to ``dst`` (or the two rows swap): a batch diff."""
    for t in tensors:
        if swap:
            t[[src, dst]] = t[[dst, src]]
        else:
            t[dst] = t[src]

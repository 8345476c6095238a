"""MARA decisions recorded inside the engine, for a trainer that rolls out there.

A trainer (``vllm_align.train.engine_rollout``) turns recording on in an engine
it owns (``engine/training.py``); serving engines never record, and an engine
that records does so for seeded MARA rows only (every episode of a rollout has
its own seed, which keys its records). Each step, ``MaraRows.step`` hands over
the judged candidates of those rows; ``take`` returns everything recorded since
the last call, on the host, in one copy.

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

FIELDS = ("seed", "key", "asked", "accepted", "emit", "diff", "state")


class DecisionTrace:
    """Per-step records kept on the engine's device until ``take``."""

    def __init__(self) -> None:
        self._steps: list[tuple[torch.Tensor, ...]] = []

    def record(self, rows: torch.Tensor, **fields: torch.Tensor) -> None:
        """Keep rows ``rows`` ([R] int64, device) of each field ([B] or [B, d])."""
        self._steps.append(tuple(fields[name].index_select(0, rows) for name in FIELDS))

    def take(self) -> dict[str, torch.Tensor]:
        """Everything recorded since the last call, concatenated on the host."""
        steps, self._steps = self._steps, []
        if not steps:
            return {}
        return {name: torch.cat(column).cpu() for name, column in zip(FIELDS, zip(*steps))}

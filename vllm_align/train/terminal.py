"""The episode's terminal reward ``α_r·R(x, y) − α_c·C(x, y)`` (MARA paper §3.3).

R and C are the scorers every tool shares (``vllm_align.data.rewards``: a
sequence-classification checkpoint or a Python ``fn(prompt, response)``); either
may be absent (0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from vllm_align.data.prompts import Prompt
from vllm_align.data.rewards import RewardError, RewardFn, load_reward


def load_scorer(spec: Any, *, batch_size: int = 16, device: str = "cpu",
                dtype: str = "float32") -> Optional[RewardFn]:
    """``load_reward(spec)`` for the trainer's device; None (no source) stays None."""
    if spec is None:
        return None
    return load_reward(spec, batch_size=batch_size, device=device, dtype=dtype)


@dataclass
class TerminalReward:
    """``α_r·R(x, y) − α_c·C(x, y)`` for a batch; an absent scorer counts as 0."""

    reward: Optional[RewardFn]
    cost: Optional[RewardFn]
    alpha_r: float = 1.0
    alpha_c: float = 1.0

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]
                 ) -> tuple[list[float], list[float], list[float]]:
        """Returns (R, C, terminal), one float each per pair."""
        n = len(responses)
        r = self.reward(prompts, responses) if self.reward is not None else [0.0] * n
        c = self.cost(prompts, responses) if self.cost is not None else [0.0] * n
        if len(r) != n or len(c) != n:
            raise RewardError(f"a reward source returned {len(r)}/{len(c)} scores for "
                              f"{n} responses")
        return r, c, [self.alpha_r * a - self.alpha_c * b for a, b in zip(r, c)]

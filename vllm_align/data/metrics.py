"""Evaluation statistics as pure functions of score lists (no IO, no models).

* ``mean_sem``: mean and standard error of the mean, ``s / sqrt(n)`` with the
  sample standard deviation ``s`` (n - 1 in the denominator).
* ``win_rate`` (the AAD paper's W): over N prompts, the fraction where A's
  response gets a strictly higher reward than B's, ``W = N_{r_A > r_B} / N``.
  The paper computes it "via pairwise continuation comparisons" of oracle-reward
  scores and does not say how equal rewards count; here they count as no win
  (so W is not inflated by ties), the count of ties is reported, and so is the
  ties-as-half variant ``(N_w + N_e / 2) / N`` used by AlpacaEval-style judges.
* ``preference_rate`` (the MARA paper's w, after Aligner): A wins a prompt if
  it is better on both reward (higher) and cost (lower), loses if worse on
  both, and ties otherwise (including any equality);
  ``w = (N_w - N_l) / (N_w + N_e + N_l)``, in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence


def mean_sem(values: Sequence[float]) -> tuple[int, float, float]:
    """(n, mean, standard error of the mean); the SEM is NaN for n < 2, all NaN for n = 0."""
    n = len(values)
    if n == 0:
        return 0, math.nan, math.nan
    mean = math.fsum(values) / n
    if n < 2:
        return n, mean, math.nan
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return n, mean, math.sqrt(var / n)


def _same_length(*lists: Sequence[float]) -> int:
    n = len(lists[0])
    if any(len(x) != n for x in lists):
        raise ValueError(f"score lists differ in length: {[len(x) for x in lists]}")
    if n == 0:
        raise ValueError("no pairs to compare")
    return n


@dataclass(frozen=True)
class _Outcomes:
    """Per-prompt outcomes of A against B: ``n = wins + ties + losses``."""

    n: int
    wins: int
    ties: int
    losses: int


@dataclass(frozen=True)
class WinRate(_Outcomes):
    """AAD-paper win rate of A over B on one score (higher is better)."""

    @property
    def rate(self) -> float:
        """W = N_w / N (ties are not wins)."""
        return self.wins / self.n

    @property
    def rate_ties_half(self) -> float:
        """(N_w + N_e / 2) / N."""
        return (self.wins + 0.5 * self.ties) / self.n

    def to_json(self) -> dict:
        return {**asdict(self), "rate": self.rate, "rate_ties_half": self.rate_ties_half}


def win_rate(reward_a: Sequence[float], reward_b: Sequence[float]) -> WinRate:
    """Compare ``reward_a[i]`` with ``reward_b[i]`` for every prompt i."""
    n = _same_length(reward_a, reward_b)
    wins = sum(a > b for a, b in zip(reward_a, reward_b))
    losses = sum(a < b for a, b in zip(reward_a, reward_b))
    return WinRate(n=n, wins=wins, ties=n - wins - losses, losses=losses)


@dataclass(frozen=True)
class PreferenceRate(_Outcomes):
    """MARA-paper preference rate of A over B on (reward up, cost down)."""

    @property
    def rate(self) -> float:
        """w = (N_w - N_l) / (N_w + N_e + N_l)."""
        return (self.wins - self.losses) / self.n

    def to_json(self) -> dict:
        return {**asdict(self), "rate": self.rate}


def preference_rate(reward_a: Sequence[float], reward_b: Sequence[float],
                    cost_a: Sequence[float], cost_b: Sequence[float]) -> PreferenceRate:
    """Win: ``r_a > r_b and c_a < c_b``; lose: ``r_a < r_b and c_a > c_b``; else tie."""
    n = _same_length(reward_a, reward_b, cost_a, cost_b)
    wins = losses = 0
    for ra, rb, ca, cb in zip(reward_a, reward_b, cost_a, cost_b):
        if ra > rb and ca < cb:
            wins += 1
        elif ra < rb and ca > cb:
            losses += 1
    return PreferenceRate(n=n, wins=wins, ties=n - wins - losses, losses=losses)

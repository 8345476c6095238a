"""MARA acceptance statistics per sequence (the paper's Figure 3) and for Prometheus.

Path of the numbers: the runner reports, for each MARA row of a step, whether
it emitted a token, the emitted candidate's position in its list and how many
candidates the agent was asked about (``MARA_REPORT_ATTR`` on the
``ModelRunnerOutput``); the scheduler adds each emitted token to the
request's per-sequence acceptance record (vLLM's ``RequestSpecDecodeMetrics``,
filled by ``patches/scheduler.py``,
the record vLLM keeps per sequence for accept/reject decoding, otherwise
unused here since speculative decoding is refused with vllm-align), which
vLLM returns with the sequence's final output. ``mara_stats`` reads it back
offline; the server exports the same numbers as Prometheus metrics
(``patches/output_processor.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Attribute of ModelRunnerOutput carrying a step's MARA rows:
# (req_ids, emitted, position, evaluated), four lists of equal length.
MARA_REPORT_ATTR = "vllm_align_mara"
# Set in the process that configures an engine with MARA agents.
mara_engine_started = False


@dataclass(frozen=True)
class MaraStats:
    """One sequence's MARA decisions.

    Attributes:
        positions: per emitted token, the emitted candidate's 0-based position
            in its candidate list (0 = the LLM's most probable candidate).
        evaluated: per emitted token, candidates the agent was asked about
            (0 for a lone candidate; forced fallbacks count the asked ones).
    """

    positions: tuple[int, ...]
    evaluated: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.positions)

    @property
    def num_evaluated(self) -> int:
        return sum(self.evaluated)

    @property
    def position_histogram(self) -> list[int]:
        """Count of emitted tokens per position (the paper's Figure 3)."""
        hist = [0] * (max(self.positions, default=-1) + 1)
        for p in self.positions:
            hist[p] += 1
        return hist

    @property
    def first_rate(self) -> float:
        """Fraction of tokens emitted at position 0."""
        return self.positions.count(0) / len(self.positions) if self.positions else 0.0


def mara_stats(completion) -> MaraStats | None:
    """The MARA statistics of one finished ``CompletionOutput`` (None if not MARA)."""
    record = getattr(completion, "spec_decode_metrics", None)
    if record is None or len(record.per_step_accepted) != sum(record.histogram):
        return None
    return MaraStats(tuple(record.per_step_accepted), tuple(record.per_step_drafted))

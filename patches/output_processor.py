"""``OutputProcessor``: MARA acceptance statistics as Prometheus metrics.

A finished MARA sequence carries its acceptance record on its final engine
output (``vllm_align/engine/mara_stats.py``); the API process adds it to
process-wide counters that ``vllm serve`` exports on ``/metrics``:

* ``vllm_align:mara_tokens_total``: tokens emitted by MARA sequences;
* ``vllm_align:mara_candidates_evaluated_total``: candidates the agents judged;
* ``vllm_align:mara_accepted_position_total{position="j"}``: emitted tokens
  whose candidate sat at position j of its list (the paper's Figure 3).

Written for vLLM 0.32.
"""

from __future__ import annotations

import functools

from vllm.v1.engine.output_processor import OutputProcessor

from vllm_align.patches.base import VllmPatch


@functools.cache
def _metrics():
    from prometheus_client import Counter

    return (Counter("vllm_align:mara_tokens", "Tokens emitted by MARA sequences."),
            Counter("vllm_align:mara_candidates_evaluated",
                    "Candidates the MARA agents judged."),
            Counter("vllm_align:mara_accepted_position",
                    "Emitted MARA tokens by the position of their candidate in its list.",
                    ["position"]))


def record(spec_record) -> None:
    """Add one finished sequence's acceptance record to the counters."""
    tokens, evaluated, by_position = _metrics()
    tokens.inc(sum(spec_record.histogram))
    evaluated.inc(spec_record.num_draft_tokens)
    for position, count in enumerate(spec_record.histogram):
        if count:
            by_position.labels(position=str(position)).inc(count)


class OutputProcessorPatch(VllmPatch):
    target = OutputProcessor
    replaces = ("process_outputs",)

    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        from vllm_align.engine import mara_stats

        # Only where this process started an engine with MARA agents (which
        # refuses speculative decoding, the other user of these records).
        for out in engine_core_outputs if mara_stats.mara_engine_started else ():
            if out.spec_decode_metrics is not None and out.finish_reason is not None:
                record(out.spec_decode_metrics)
        return OutputProcessorPatch.original("process_outputs")(
            self, engine_core_outputs, *args, **kwargs)

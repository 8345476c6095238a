"""``Scheduler``: MARA rows feed a candidate one position ahead; a rejection emits nothing.

MARA's pipelined walk (``vllm_align/engine/mara_rows.py``) keeps this
invariant for a MARA request in decode: every token it has emitted already
has its KV (it was computed when the token was judged), and each step feeds
one *candidate* at position ``num_tokens``. The scheduler keeps counting as
for plain decode, ``num_computed_tokens == num_tokens - 1`` (so it schedules
one token per step), and the runner moves the row one position ahead
(``patches/model_runner.py``). Two things follow here:

* the candidate's position needs a KV slot: one lookahead slot per request,
  as vLLM already allocates for speculative decoding;
* a step in which a MARA row emits nothing (a rejection, or the step that
  produced its first candidate list) must not advance it: its
  ``num_computed_tokens`` is rolled back by one, as vLLM rolls back rejected
  draft tokens.

Per-token acceptance statistics (position of the emitted candidate,
candidates evaluated) arrive with the runner's output and are kept on the
request as vLLM's per-sequence acceptance record, returned with the final
output (``vllm_align.engine.mara_stats`` reads it back). Written for vLLM 0.32.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.metrics.stats import RequestSpecDecodeMetrics

from vllm_align.config import EngineAlignConfig
from vllm_align.engine.mara_stats import MARA_REPORT_ATTR
from vllm_align.patches.base import VllmPatch


def record_token(request, position: int, evaluated: int) -> None:
    """Add one emitted MARA token to ``request``'s acceptance record.

    Position j counts as j accepted drafts out of ``evaluated`` (the record's
    histogram grows to the deepest position seen), so the record's
    ``histogram[j]`` is the number of tokens emitted at position j.
    """
    record = request.spec_decode_metrics
    if record is None:
        record = request.spec_decode_metrics = RequestSpecDecodeMetrics.new(position)
    if position >= len(record.histogram):
        record.histogram.extend([0] * (position + 1 - len(record.histogram)))
        record.num_spec_tokens = len(record.histogram) - 1
    record.observe(num_draft_tokens=evaluated, num_accepted=position, detailed=True)


class SchedulerPatch(VllmPatch):
    target = Scheduler
    replaces = ("__init__", "update_from_output")

    def __init__(self, *args, **kwargs):
        SchedulerPatch.original("__init__")(self, *args, **kwargs)
        align = EngineAlignConfig.parse(self.vllm_config.additional_config)
        self._vllm_align_mara = bool(align.mara_agents)
        if self._vllm_align_mara:
            self.num_lookahead_tokens = max(self.num_lookahead_tokens, 1)

    def update_from_output(self, scheduler_output, model_runner_output):
        report = getattr(model_runner_output, MARA_REPORT_ATTR, None)
        if report is not None:
            # Before the stock update: a request that finishes this step
            # returns its statistics with its final output.
            for req_id, emitted, position, evaluated in zip(*report):
                request = self.requests.get(req_id)
                if emitted and request is not None:
                    record_token(request, position, evaluated)
        outputs = SchedulerPatch.original("update_from_output")(
            self, scheduler_output, model_runner_output)
        if report is not None:
            for req_id, emitted, _, _ in zip(*report):
                request = self.requests.get(req_id)
                if (not emitted and request is not None and not request.is_finished()
                        and request.num_computed_tokens == request.num_tokens):
                    request.num_computed_tokens -= 1
        return outputs

"""OpenAI request models: carry the ``alignment`` body field into the engine.

The request models accept unknown body fields (``extra="allow"``) but drop
them when building ``SamplingParams``; the wrapped ``to_sampling_params``
copies ``alignment`` into ``extra_args["align"]``, where the offline API puts
it too. Validation happens later, once, for both paths. Written for vLLM 0.32.
"""

from __future__ import annotations

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from vllm_align.config import EXTRA_ARGS_KEY
from vllm_align.patches.base import VllmPatch

BODY_FIELD = "alignment"


def _with_alignment(request, params):
    spec = (request.model_extra or {}).get(BODY_FIELD)
    if spec is not None:
        params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: spec}
    return params


class CompletionRequestPatch(VllmPatch):
    target = CompletionRequest
    replaces = ("to_sampling_params",)

    def to_sampling_params(self, *args, **kwargs):
        params = CompletionRequestPatch.original("to_sampling_params")(self, *args, **kwargs)
        return _with_alignment(self, params)


class ChatCompletionRequestPatch(VllmPatch):
    target = ChatCompletionRequest
    replaces = ("to_sampling_params",)

    def to_sampling_params(self, *args, **kwargs):
        params = ChatCompletionRequestPatch.original("to_sampling_params")(self, *args, **kwargs)
        return _with_alignment(self, params)

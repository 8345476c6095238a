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


def _alignment_field_patch(request_cls: type) -> type[VllmPatch]:
    class Patch(VllmPatch):
        target = request_cls
        replaces = ("to_sampling_params",)

        def to_sampling_params(self, *args, **kwargs):
            params = Patch.original("to_sampling_params")(self, *args, **kwargs)
            spec = (self.model_extra or {}).get(BODY_FIELD)
            if spec is not None:
                params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: spec}
            return params

    Patch.__name__ = Patch.__qualname__ = f"{request_cls.__name__}Patch"
    return Patch


CompletionRequestPatch = _alignment_field_patch(CompletionRequest)
ChatCompletionRequestPatch = _alignment_field_patch(ChatCompletionRequest)

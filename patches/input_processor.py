"""``InputProcessor``: refuse, per request, what this engine cannot serve.

The ``vllm.logits_processors`` hook (``validate_params``) sees only the
request, so it checks the shape of ``extra_args["align"]``. Whether *this*
engine can honour it (a reference model for DeRa/AAD, a runner that runs our
batch state) needs the engine config; the validator vLLM builds once per
engine is wrapped here. Errors become ``VLLMValidationError``: HTTP 400 when
served, a ``ValueError`` offline, and only that request is refused.
Written for vLLM 0.32.
"""

from __future__ import annotations

from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.input_processor import InputProcessor

from vllm_align.config import AlignConfigError, EngineAlignConfig
from vllm_align.patches.base import VllmPatch


class AlignRequestError(VLLMValidationError, ValueError):
    """A refused alignment request: HTTP 400 served, a ValueError offline."""


class InputProcessorPatch(VllmPatch):
    target = InputProcessor
    replaces = ("_build_logits_processors_params_validator",)

    def _build_logits_processors_params_validator(self):
        stock = InputProcessorPatch.original(
            "_build_logits_processors_params_validator")(self)
        vllm_config = self.vllm_config
        engine = EngineAlignConfig.parse(vllm_config.additional_config)
        unsupported = (
            "the V2 model runner" if vllm_config.use_v2_model_runner else
            "speculative decoding" if vllm_config.speculative_config else None)

        def validate(params) -> None:
            try:
                rule = engine.resolve(params.extra_args)
                if unsupported and rule.method != "none":
                    raise AlignConfigError(
                        f"alignment method {rule.method!r} is not available with {unsupported}")
            except AlignConfigError as e:
                raise AlignRequestError(str(e), parameter="alignment") from None
            stock(params)

        return validate

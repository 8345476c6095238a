"""``InputProcessor``: refuse, per request, what this engine cannot serve.

Every request's ``extra_args["align"]`` is parsed here, in the API process,
on every engine where the plugin is installed (also one without alignment
configuration, which loads none of the plugin's logits processors): whether
*this* engine can honour it (a reference model for DeRa/AAD, an agent for
MARA) needs the engine config, so the validator vLLM builds once per engine
is wrapped. Errors become ``VLLMValidationError``: HTTP 400 when
served, a ``ValueError`` offline, and only that request is refused.

``process_inputs`` is wrapped too: on an engine with a reference model, a
request's cache salt says whether its rule reads the reference, so that its
prefix-cache blocks are never shared with a request of the other kind
(``vllm_align/engine/reference_rows.py``); and a request asking for prompt
logprobs never reads the prefix cache (vLLM's default for such requests, kept
even when the request turns it off: a cached prefix has no hidden states to
score, and vLLM would return uninitialised values for its positions).
Written for vLLM 0.32.
"""

from __future__ import annotations

from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.input_processor import InputProcessor

from vllm_align.config import AlignConfigError, EngineAlignConfig
from vllm_align.engine.reference_rows import kv_cache_salt
from vllm_align.patches.base import VllmPatch


class AlignRequestError(VLLMValidationError, ValueError):
    """A refused alignment request: HTTP 400 served, a ValueError offline."""


def check_mara_sampling(params, mara) -> None:
    """Refuse sampling parameters that MARA's walk cannot honour.

    A MARA sequence emits the candidate its agent accepts; vLLM's sampler is
    only told which token that is. MARA's rule is a walk over candidates, not
    a distribution, so there are no logprobs to return, sampled or prompt.
    Parameters that would change or describe the sampled distribution
    (logprobs, prompt logprobs, structured output, logit bias, allowed/bad
    words, penalties, min_tokens) are refused rather than silently ignored;
    temperature, top_k, top_p and min_p have no effect (MARA's own
    ``top_k``/``top_p`` and ``decisions`` decide).
    """
    describe = [name for name, on in (
        ("logprobs", params.logprobs is not None or params.logprob_token_ids is not None),
        ("prompt_logprobs", params.prompt_logprobs is not None),
    ) if on]
    if describe:
        raise AlignConfigError(
            f"alignment method 'mara' does not support {', '.join(describe)}: its rule is a "
            "walk (an agent accepts or rejects candidates one by one), not a distribution, so "
            "there are no logprobs to return; use 'none', 'dera' or 'aad' to score tokens")
    bad = [name for name, on in (
        ("structured output", params.structured_outputs is not None),
        ("logit_bias", bool(params.logit_bias)),
        ("allowed_token_ids", bool(params.allowed_token_ids)),
        ("bad_words", bool(params.bad_words)),
        ("presence_penalty", params.presence_penalty != 0.0),
        ("frequency_penalty", params.frequency_penalty != 0.0),
        ("repetition_penalty", params.repetition_penalty != 1.0),
        ("min_tokens", params.min_tokens > 0),
    ) if on]
    if bad:
        raise AlignConfigError(f"alignment method 'mara' does not support {', '.join(bad)} "
                               "(the agent's accepted candidate is emitted as is)")


class InputProcessorPatch(VllmPatch):
    target = InputProcessor
    replaces = ("_build_logits_processors_params_validator", "process_inputs")

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = InputProcessorPatch.original("process_inputs")(
            self, request_id, prompt, params, *args, **kwargs)
        engine = self.__dict__.get("_vllm_align_engine")
        if engine is None:
            engine = self._vllm_align_engine = EngineAlignConfig.parse(
                self.vllm_config.additional_config)
            self._vllm_align_lora_pair = engine.reference_is(self.vllm_config.model_config.model)
        if engine.reference_model is not None and request.sampling_params is not None:
            rule = engine.resolve(request.sampling_params.extra_args)  # validated already
            if rule.needs_reference and self._vllm_align_lora_pair and request.lora_request is None:
                raise AlignRequestError(
                    f"alignment method {rule.method!r} on this engine needs an adapter: its "
                    "aligned model is a request's LoRA adapter on the served model (the "
                    "reference); name one (lora_request=LoRARequest(...) offline, the "
                    "adapter's name as \"model\" served)", parameter="alignment")
            request.cache_salt = kv_cache_salt(request.cache_salt, rule.needs_reference)
            if request.sampling_params.prompt_logprobs is not None:
                request.sampling_params.skip_reading_prefix_cache = True
        return request

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
                if rule.method == "mara":
                    check_mara_sampling(params, rule.mara)
            except AlignConfigError as e:
                raise AlignRequestError(str(e), parameter="alignment") from None
            stock(params)

        return validate

"""``InputProcessor.process_inputs``: each request's rule, parsed once where it enters.

Every request passes here, in the API process (served) or the caller's
(``LLM.generate``), on every engine where the plugin is installed. Its
``extra_args["align"]`` is parsed and checked against what *this* engine
can honour (a reference model for DeRa/AAD, an agent for MARA, an adapter on a
LoRA pair) before vLLM's own processing. Errors become
``VLLMValidationError``: HTTP 400 when served, a ``ValueError`` offline, and
only that request is refused.

On an engine with alignment configuration the request then carries the rule's
canonical form (``AlignParams.to_json``) in its own copy of the sampling
parameters: the engine core and the workers read that (``AlignParams.from_json``)
and never parse a client's spec. Also, on an engine with a reference model, a
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
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.input_processor import InputProcessor

from vllm_align.config import EXTRA_ARGS_KEY, AlignConfigError, AlignParams, EngineAlignConfig
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


def admit(vllm_config, engine: EngineAlignConfig, params: SamplingParams) -> AlignParams:
    """The rule of one request on this engine, or the ``AlignRequestError`` refusing it.

    Args:
        vllm_config: the engine's ``VllmConfig``; engine: its align config.
        params: the caller's sampling parameters (read, not changed).
    """
    try:
        rule = engine.resolve(params.extra_args)
        if rule.method != "none":
            unsupported = ("the V2 model runner" if vllm_config.use_v2_model_runner else
                           "speculative decoding" if vllm_config.speculative_config else None)
            if unsupported:
                raise AlignConfigError(
                    f"alignment method {rule.method!r} is not available with {unsupported}")
        if rule.method == "mara":
            check_mara_sampling(params, rule.mara)
    except AlignConfigError as e:
        raise AlignRequestError(str(e), parameter="alignment") from None
    return rule


class InputProcessorPatch(VllmPatch):
    target = InputProcessor
    replaces = ("process_inputs",)

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        config = self.vllm_config.additional_config or {}
        engine = EngineAlignConfig.parse(config)
        rule = (admit(self.vllm_config, engine, params) if isinstance(params, SamplingParams)
                else None)
        request = InputProcessorPatch.original("process_inputs")(
            self, request_id, prompt, params, *args, **kwargs)
        sampling = request.sampling_params
        if rule is None or sampling is None or EXTRA_ARGS_KEY not in config:
            return request  # an engine without alignment: nothing travels
        if engine.reference_model is not None:
            lora_pair = self.__dict__.get("_vllm_align_lora_pair")
            if lora_pair is None:
                lora_pair = self._vllm_align_lora_pair = engine.reference_is(
                    self.vllm_config.model_config.model)
            if rule.needs_reference and lora_pair and request.lora_request is None:
                raise AlignRequestError(
                    f"alignment method {rule.method!r} on this engine needs an adapter: its "
                    "aligned model is a request's LoRA adapter on the served model (the "
                    "reference); name one (lora_request=LoRARequest(...) offline, the "
                    "adapter's name as \"model\" served)", parameter="alignment")
            request.cache_salt = kv_cache_salt(request.cache_salt, rule.needs_reference)
            if sampling.prompt_logprobs is not None:
                sampling.skip_reading_prefix_cache = True
        # A new dict: a shallow clone (``skip_clone``) shares the caller's.
        sampling.extra_args = {**(sampling.extra_args or {}), EXTRA_ARGS_KEY: rule.to_json()}
        return request

"""The ``vllm.LLM`` the data tools start (generate-pairs, sweep, their benchmark)."""

from __future__ import annotations

from typing import Any, Mapping


def cpu_needs_whole_prefills() -> bool:
    """True on vLLM's CPU platform, where seeded sampling breaks chunked prefill.

    vLLM 0.32's V1 runner samples a token for a partially prefilled request,
    discards it, and rewinds that request's seeded generator with
    ``Generator.set_offset`` so the draw is not lost. Only CUDA generators have
    offsets: on CPU the call raises "CPU Generator does not use offset" and the
    engine dies. Prefilling every prompt whole never discards a draw.
    """
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def build_llm(model: str, reference_model: str | None, *, dtype: str = "auto", seed: int = 0,
              max_model_len: int | None = None, seeded_sampling: bool = False,
              llm_kwargs: Mapping[str, Any] | None = None):
    """``LLM(model, additional_config={"align": {"reference_model": ...}}, ...)``.

    ``seeded_sampling``: some requests will sample (temperature > 0) with a
    per-request seed; on CPU this turns chunked prefill off (see
    ``cpu_needs_whole_prefills``) unless ``llm_kwargs`` decides it. Prompts are
    then prefilled whole, so ``max_num_batched_tokens`` is at least
    ``max_model_len`` (vLLM's own default in that mode).
    """
    from vllm import LLM

    kwargs: dict[str, Any] = {"dtype": dtype, "seed": seed, **(llm_kwargs or {})}
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if reference_model:
        kwargs["additional_config"] = {"align": {"reference_model": reference_model}}
    if seeded_sampling and "enable_chunked_prefill" not in kwargs and cpu_needs_whole_prefills():
        kwargs["enable_chunked_prefill"] = False
    return LLM(model=model, **kwargs)

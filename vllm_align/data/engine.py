"""The ``vllm.LLM`` the data tools start (generate-pairs, sweep, their benchmark)."""

from __future__ import annotations

from typing import Any, Mapping


def build_llm(model: str, reference_model: str | None, *, dtype: str = "auto", seed: int = 0,
              max_model_len: int | None = None, llm_kwargs: Mapping[str, Any] | None = None,
              engine_args=None):
    """``LLM(model, additional_config={"align": {"reference_model": ...}}, ...)``.

    ``engine_args``: a ``vllm.EngineArgs`` (the command line's, from
    ``EngineArgs.from_cli_args``) to start the engine from unchanged instead;
    the other arguments are then ignored.

    Seeded sampling works with chunked prefill on every platform (CPU
    included: ``patches/model_runner.py``), so vLLM's scheduling defaults stand.
    """
    from vllm import LLM

    if engine_args is not None:
        return LLM.from_engine_args(engine_args)

    kwargs: dict[str, Any] = {"dtype": dtype, "seed": seed, **(llm_kwargs or {})}
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if reference_model:
        config = dict(kwargs.get("additional_config") or {})
        config["align"] = {**(config.get("align") or {}), "reference_model": reference_model}
        kwargs["additional_config"] = config
    return LLM(model=model, **kwargs)

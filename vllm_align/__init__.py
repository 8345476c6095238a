"""vllm-align: decoding-time alignment (DeRa, AAD) inside vLLM's engine.

``register()`` is the ``vllm.general_plugins`` entry point; vLLM runs it in
every process (API server, engine core, workers). It changes nothing for an
engine without ``additional_config["align"]`` but refusing ``align`` requests.
"""

from __future__ import annotations

__version__ = "0.1.0"


def register() -> None:
    from vllm import ModelRegistry

    from vllm_align.patches.apply import apply_patches

    apply_patches()
    ModelRegistry.register_model(
        "AlignForCausalLM", "vllm_align.engine.align_model:AlignForCausalLM")

"""vllm-align: decoding-time alignment (DeRa, AAD) inside vLLM's engine.

``register()`` is the ``vllm.general_plugins`` entry point; vLLM runs it in
every process (API server, engine core, workers).
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# Set when register() chose the V1 runner (logged once vLLM's logging is set up).
selected_v1_runner = False


def register() -> None:
    from vllm import ModelRegistry

    from vllm_align.patches import apply_patches

    apply_patches()
    ModelRegistry.register_model(
        "AlignedPairForCausalLM", "vllm_align.engine.pair_model:AlignedPairForCausalLM")
    global selected_v1_runner
    if "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        # Our batch state is a V1 logits processor; the V2 runner (GPU default)
        # has another interface. Spawned engine processes inherit this.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        selected_v1_runner = True

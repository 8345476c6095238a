"""vllm-align: decoding-time alignment (DeRa, AAD) inside vLLM's engine.

``register()`` is the ``vllm.general_plugins`` entry point; vLLM runs it in
every process (API server, engine core, workers).
"""

from __future__ import annotations

import logging
import os

__version__ = "0.1.0"

logger = logging.getLogger(__name__)


def register() -> None:
    from vllm import ModelRegistry

    from vllm_align.patches import apply_patches

    apply_patches()
    ModelRegistry.register_model(
        "AlignedPairForCausalLM", "vllm_align.engine.pair_model:AlignedPairForCausalLM")
    if "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        # Our batch state is a V1 logits processor; the V2 runner (GPU default)
        # has another interface. Spawned engine processes inherit this.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("vllm-align: selecting vLLM's V1 model runner "
                    "(VLLM_USE_V2_MODEL_RUNNER=0)")

"""``VllmConfig.use_v2_model_runner``: an engine with alignment runs vLLM's V1 model runner.

vllm-align's batch state is a V1-interface logits processor; vLLM 0.32's V2
runner (the GPU default) refuses those at load time. The choice is made per
engine, here, rather than by setting ``VLLM_USE_V2_MODEL_RUNNER`` for the
whole environment: an engine without ``additional_config["align"]`` keeps
vLLM's own default, and a user who sets the variable keeps the last word (an
align engine on V2 then refuses to start, ``patches/engine_args.py``).
The property is read in every process (API server, engine core, workers),
all of which load the plugin before they read it. Written for vLLM 0.32.
"""

from __future__ import annotations

import vllm.envs as envs
from vllm.config import VllmConfig

from vllm_align.config import EXTRA_ARGS_KEY
from vllm_align.patches.base import VllmPatch


def _stock(config: VllmConfig) -> bool:
    return VllmConfigPatch.original("use_v2_model_runner").fget(config)


class VllmConfigPatch(VllmPatch):
    target = VllmConfig
    replaces = ("use_v2_model_runner",)

    @property
    def use_v2_model_runner(self) -> bool:
        if EXTRA_ARGS_KEY in (self.additional_config or {}) and envs.VLLM_USE_V2_MODEL_RUNNER is None:
            return False
        return _stock(self)

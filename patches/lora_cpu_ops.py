"""vLLM's CPU LoRA ops (``lora.ops.torch_ops``): a token with no adapter gets none.

vLLM 0.32's torch LoRA ops gather each token's adapter weights with its slot
index, and a token with no adapter has index -1, which gathers the *last*
slot's weights: in a batch that mixes adapter rows with rows without one, the
latter are decoded with whichever adapter sits in the last slot (a batch where
no token has an adapter skips the ops and is right). vLLM's GPU kernels skip
index -1. Here each op runs on slot 0 for those tokens with their input rows
zeroed, so they add (or write) zero, as on the GPU.

Only engines that serve a LoRA pair or a pair with LoRA turn the fix on
(``lora_reference.LoRAModelPatch`` calls ``enable()``): an engine without
alignment configuration runs vLLM's ops as they are. The ops are bound by name in two modules (the ops
module, where the segmented ops look them up, and the CPU punica wrapper's),
one patch class each. Written for vLLM 0.32.
"""

from __future__ import annotations

import torch
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu

from vllm_align.patches.base import VllmPatch

_enabled = False


def enable() -> None:
    """Decode tokens without an adapter exactly in this process's engine."""
    global _enabled
    _enabled = True


def _no_adapter_rows(inputs: torch.Tensor, indices: torch.Tensor):
    """(inputs [N, K] with rows of index -1 zeroed, indices [N] with -1 -> slot 0)."""
    keep = (indices >= 0).unsqueeze(-1)
    return inputs * keep.to(inputs.dtype), indices.clamp_min(0)


def _bgmv_shrink(patch, inputs, lora_a_weights, output_tensor, lora_indices_tensor,
                 scaling=1.0):
    if _enabled:
        inputs, lora_indices_tensor = _no_adapter_rows(inputs, lora_indices_tensor)
    return patch.original("bgmv_shrink")(inputs, lora_a_weights, output_tensor,
                                         lora_indices_tensor, scaling)


def _bgmv_expand(patch, inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                 add_inputs=True):
    if _enabled:
        inputs, lora_indices_tensor = _no_adapter_rows(inputs, lora_indices_tensor)
    return patch.original("bgmv_expand")(inputs, lora_b_weights, output_tensor,
                                         lora_indices_tensor, add_inputs)


def _bgmv_expand_slice(patch, inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                       slice_offset, slice_size, add_inputs=True):
    if _enabled:
        inputs, lora_indices_tensor = _no_adapter_rows(inputs, lora_indices_tensor)
    return patch.original("bgmv_expand_slice")(inputs, lora_b_weights, output_tensor,
                                               lora_indices_tensor, slice_offset, slice_size,
                                               add_inputs)


class LoRAOpsPatch(VllmPatch):
    target = lora_ops
    replaces = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")

    def bgmv_shrink(*args, **kwargs):
        return _bgmv_shrink(LoRAOpsPatch, *args, **kwargs)

    def bgmv_expand(*args, **kwargs):
        return _bgmv_expand(LoRAOpsPatch, *args, **kwargs)

    def bgmv_expand_slice(*args, **kwargs):
        return _bgmv_expand_slice(LoRAOpsPatch, *args, **kwargs)


class PunicaCPUOpsPatch(LoRAOpsPatch):
    target = punica_cpu

    def bgmv_shrink(*args, **kwargs):
        return _bgmv_shrink(PunicaCPUOpsPatch, *args, **kwargs)

    def bgmv_expand(*args, **kwargs):
        return _bgmv_expand(PunicaCPUOpsPatch, *args, **kwargs)

    def bgmv_expand_slice(*args, **kwargs):
        return _bgmv_expand_slice(PunicaCPUOpsPatch, *args, **kwargs)

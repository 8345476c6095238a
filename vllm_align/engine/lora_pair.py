"""A LoRA pair: the aligned model is a request's adapter on the reference's own weights.

With ``reference_model`` naming the served model and LoRA enabled, the pair
holds the base weights once. The reference sub-model is built as usual (so it
has attention layers, and KV, of its own: its K/V differ from the aligned
model's wherever an adapter applies), then every submodule of it that holds no
attention layer is replaced by the aligned model's module at the same path,
and the parameters and buffers left on its attention-holding containers are
tied to the aligned model's. Nothing here names an architecture's modules.

vLLM's LoRA manager then wraps each shared module object once and points both
paths at that wrapper; the reference's forward reads no adapter
(``patches/lora_reference.py``). Adapter weights name the served model's
modules (``model.layers.0.self_attn.q_proj``); the pair's module names carry
the ``aligned.`` prefix, which ``aligned_lora_names`` adds.
"""

from __future__ import annotations

from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.models.utils import WeightsMapper


def _holds_attention(module: nn.Module) -> bool:
    return any(isinstance(m, AttentionLayerBase) for m in module.modules())


def _share(aligned: nn.Module, reference: nn.Module) -> None:
    for name, child in list(reference.named_children()):
        twin = aligned.get_submodule(name)
        if _holds_attention(child):
            _share(twin, child)
        else:
            reference._modules[name] = twin
    for table in ("_parameters", "_buffers"):
        own, theirs = getattr(reference, table), getattr(aligned, table)
        for name in own:
            own[name] = theirs[name]


def share_base_weights(aligned: nn.Module, reference: nn.Module, prefix: str,
                       vllm_config: VllmConfig) -> None:
    """Make ``reference`` (same architecture and config as ``aligned``) run on aligned's weights.

    ``prefix`` is the reference's layer-name prefix: vLLM's static forward
    context also holds the layers that register by name (attention, MoE); those
    of the reference's replaced modules are dropped, so that nothing keeps their
    weights alive or finds them by name.
    """
    _share(aligned, reference)
    kept = {id(m) for m in reference.modules()}
    context = vllm_config.compilation_config.static_forward_context
    for name in [n for n, layer in context.items()
                 if n.startswith(prefix) and id(layer) not in kept]:
        del context[name]


def aligned_lora_names(inner: WeightsMapper | None, prefix: str) -> WeightsMapper:
    """The served model's adapter-name mapping, then ``prefix`` before every name."""
    return (inner or WeightsMapper()) | WeightsMapper(orig_to_new_prefix={"": prefix})

"""vLLM's LoRA layers: the reference reads no adapter, a prompt slice its row's.

vLLM 0.32's LoRA manager wraps each LoRA-capable module object once, and
every wrapped layer reads one punica wrapper whose token -> adapter mapping
the runner sets per step from the requests' adapters (index -1: none). The
reference model of a pair runs over the base weights:

* a LoRA pair (``reference_model`` = the served model) shares its module
  objects with the aligned model, so it reaches the aligned model's wrappers;
* a separate reference has wrappers of its own (no adapter has weights for
  them), which still read the step's mapping, sized for the batch's tokens
  and rows rather than for the reference's.

While the reference runs (forward or LM head), each wrapper is pointed at a
second punica wrapper whose every token and row names no adapter, and back
afterwards. The no-adapter mapping depends only on its length, so it is
rebuilt only when the length changes. The prompt-logprobs loop scores one
row's prompt positions at a time, where the step's mapping has one row per
sampled token of the batch: there the aligned LM head reads a mapping of
those positions, all with the row's adapter.

Installed where vLLM's LoRA manager takes the model over
(``LoRAModelRunnerMixin.load_lora_model``): a pair model (one with a
``lora_scope`` slot) gets ``PinnedAdapter(...).over`` as its ``lora_scope``,
and the CPU ops' no-adapter fix is turned on for this process
(``lora_cpu_ops.py``). Written for vLLM 0.32.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn
from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

from vllm_align.patches import lora_cpu_ops
from vllm_align.patches.base import VllmPatch
from vllm_align.patches.version import check_version

WRITTEN_FOR = "0.32"


class PinnedAdapter:
    """Runs blocks of the model with every LoRA layer reading one adapter (or none)."""

    def __init__(self, lora_manager, model: nn.Module):
        check_version(__name__, WRITTEN_FOR)
        from vllm.lora.layers import BaseLayerWithLoRA
        from vllm.lora.punica_wrapper import get_punica_wrapper

        self._manager = lora_manager
        self._layers = list({id(m): m for m in model.modules()
                             if isinstance(m, BaseLayerWithLoRA)}.values())
        self._saved = [layer.punica_wrapper for layer in self._layers]
        self._punica = get_punica_wrapper(
            lora_manager.max_num_batched_tokens, max_batches=lora_manager.max_num_seqs,
            device=lora_manager.device, lora_config=lora_manager.lora_config)
        self._mapped = None  # (num_tokens, lora_id) of the pinned mapping

    @contextmanager
    def over(self, num_tokens: int, lora_id: int = 0):
        """Within the block, every LoRA layer sees ``num_tokens`` tokens and rows (one
        count serves a forward and an LM head), all with adapter ``lora_id`` (0: none,
        else an adapter active in this step)."""
        from vllm.lora.layers import LoRAMapping

        # An adapter's slot may change between steps; "no adapter" has none.
        if self._mapped != (num_tokens, lora_id) or lora_id:
            manager = self._manager
            ids = (lora_id,) * num_tokens
            self._punica.update_metadata(LoRAMapping(ids, ids, is_prefill=True),
                                         manager.lora_index_to_id, manager.lora_slots + 1,
                                         manager.vocab_size)
            self._mapped = (num_tokens, lora_id)
        for layer in self._layers:
            layer.set_mapping(self._punica)
        try:
            yield
        finally:
            for layer, punica in zip(self._layers, self._saved):
                layer.set_mapping(punica)


class LoRAModelPatch(VllmPatch):
    target = LoRAModelRunnerMixin
    replaces = ("load_lora_model",)

    def load_lora_model(self, model, *args, **kwargs):
        model = LoRAModelPatch.original("load_lora_model")(self, model, *args, **kwargs)
        if hasattr(model, "lora_scope"):  # a pair model: its reference reads no adapter
            lora_cpu_ops.enable()  # rows without an adapter get none (CPU ops)
            model.lora_scope = PinnedAdapter(model.lora_manager, model).over
        return model

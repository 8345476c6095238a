"""The served model as vllm-align runs it: each row's rule applied in ``compute_logits``.

``AlignForCausalLM`` wraps the served architecture (the aligned model,
prefix ``aligned``) and, with a reference model, a second instance of it
(prefix ``reference``), run in lockstep; with MARA agents and no reference it
wraps the served model alone, so that MARA sees its final hidden states.
vLLM sees one model: both models' attention layers land in the same KV-cache
group, so they share block tables, continuous batching, chunked prefill and
prefix caching, with no second scheduler; the KV budget per token doubles.

Data flow of one step (B sequences, T scheduled tokens, H hidden size):

    forward(input_ids [T], positions [T]) -> cat(h_aligned, h_ref) [T, 2H]
    runner selects the sampling rows      -> [B, 2H]   (row-aligned by construction)
    compute_logits([B, 2H])               -> rule(logits_aligned, logits_ref) [B, V]

Prompt logprobs: vLLM's prompt-logprobs loop hands ``compute_logits`` one
request's prompt positions at a time; on an engine with a reference model
they arrive as a ``PromptSlice`` (``batch_state.py``) naming the row, and get
that row's rule too: ``log_softmax`` of DeRa's mixed logits, of AAD's scores,
or of the aligned logits for ``none``. Only DeRa/AAD rows asking for prompt
logprobs pay the reference's LM head over their prompt positions.

Concatenating the hidden states lets vLLM's own row selection pick both
models' rows at once, so the reference logits cannot drift out of row order.
The reference runs only over the tokens of rows whose rule reads it (DeRa,
AAD; ``reference_rows.py``); its hidden states are zero elsewhere, and its
logits are computed for those rows alone.

LoRA: adapters apply to the aligned model (its modules are named
``aligned.*``). With ``reference_model`` naming the served model itself, the
pair is a LoRA pair: the reference runs on the aligned model's weights, held
once (``lora_pair.py``), and a row's adapter makes its aligned model. The
reference never reads an adapter (``patches/lora_reference.py``).

The model's reaches into vLLM internals are installed by ``patches/`` (the
reference's compiled classes, its LoRA scope, its rows' forward context:
``ReferencePlan.scope``); this module imports none of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch
from torch import nn
from transformers import AutoConfig
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models import ModelRegistry
from vllm.model_executor.models.interfaces import SupportsLoRA
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix

from vllm_align.config import EngineAlignConfig
from vllm_align.engine.batch_state import PromptSlice
from vllm_align.engine.lora_pair import aligned_lora_names, share_base_weights
from vllm_align.mara.agent import load_agent

ARCH = "AlignForCausalLM"
# The two sub-models' prefixes: their parameters' and attention layers' names start so.
ALIGNED, REFERENCE = "aligned.", "reference."
# hf_config attribute (set through hf_overrides) naming the wrapped architecture.
INNER_ARCH_ATTR = "vllm_align_inner_architectures"


class AlignForCausalLM(nn.Module, SupportsLoRA):
    """The aligned model, the reference model (if any) and the MARA agents, one forward."""

    # Empty: vLLM's LoRA manager then gathers the sub-models' packed-module maps.
    packed_modules_mapping: dict = {}

    # How the reference sub-model is built. vLLM compiles per class, so the
    # reference needs compiled classes of its own; ``patches/compiled_classes.py``
    # installs the builder that makes them (engine/ never imports patches/).
    build_reference = staticmethod(lambda model_cls, **kwargs: model_cls(**kwargs))

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        model_config = vllm_config.model_config
        hf_config = model_config.hf_config
        inner_archs = list(getattr(hf_config, INNER_ARCH_ATTR))
        model_cls, _ = ModelRegistry.resolve_model_cls(inner_archs, model_config)
        align = EngineAlignConfig.parse(vllm_config.additional_config)
        assert align.needs_wrapper

        aligned_config = vllm_config.with_hf_config(hf_config, architectures=inner_archs)
        self.aligned = model_cls(vllm_config=aligned_config,
                                 prefix=maybe_prefix(prefix, ALIGNED[:-1]))
        self.reference = None
        self._hidden_sizes = [hf_config.hidden_size]
        # A LoRA pair: the reference is the served model's own weights.
        self.shares_base = align.reference_is(model_config.model)
        if align.reference_model is not None:
            ref_hf_config = hf_config if self.shares_base else AutoConfig.from_pretrained(
                align.reference_model, trust_remote_code=model_config.trust_remote_code)
            ref_config = vllm_config.with_hf_config(ref_hf_config, architectures=inner_archs)
            ref_prefix = maybe_prefix(prefix, REFERENCE[:-1])
            self.reference = self.build_reference(model_cls, vllm_config=ref_config,
                                                  prefix=ref_prefix)
            if self.shares_base:
                share_base_weights(self.aligned, self.reference, ref_prefix + ".", vllm_config)
            else:
                # vLLM's loader streams these after the served checkpoint, prefixed.
                self.secondary_weights = [DefaultModelLoader.Source(
                    align.reference_model, revision=None, prefix=REFERENCE)]
            self._hidden_sizes.append(ref_hf_config.hidden_size)
        if vllm_config.lora_config is not None:  # the served model's LoRA traits
            for attr in ("embedding_modules", "is_3d_moe_weight", "is_non_gated_moe",
                         "lora_skip_prefixes"):
                setattr(self, attr, getattr(self.aligned, attr, getattr(SupportsLoRA, attr)))
            self.hf_to_vllm_mapper = aligned_lora_names(
                getattr(self.aligned, "hf_to_vllm_mapper", None), ALIGNED)
        # (num_tokens, lora_id) -> the context where every LoRA layer reads that adapter
        # (0: none) for that many tokens; set when vLLM's LoRA manager takes the model
        # over (patches/lora_reference.py), None without LoRA.
        self.lora_scope = None
        # MARA agents: float32, outside the module tree (they are not in the
        # checkpoint vLLM loads); a width mismatch refuses to start.
        self.agents = [load_agent(path, expected_hidden_size=hf_config.hidden_size).to(
            vllm_config.device_config.device) for path in align.mara_agents.values()]
        self.vllm_config = vllm_config
        self.config = hf_config  # the served model's, as on vLLM's models (LoRA reads it)
        # The engine's AlignBatchState, bound by the runner before each step
        # (patches/model_runner.py); None in warm-up and profile runs before it.
        self.align_state = None
        # Tokens the reference model has been run over (warm-up included), and prompt
        # positions its LM head scored for prompt logprobs.
        self.reference_tokens = 0
        self.reference_prompt_positions = 0
        self.make_empty_intermediate_tensors = getattr(
            self.aligned, "make_empty_intermediate_tensors", None)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.aligned.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """[T] tokens -> [T, H_aligned + H_ref] final hidden states of both models."""
        if inputs_embeds is not None:
            raise ValueError("vllm-align does not support prompt embeddings: the "
                             "reference model needs token ids")
        h_aligned = self.aligned(input_ids, positions, intermediate_tensors, None, **kwargs)
        if self.reference is None:
            return h_aligned
        state = self.align_state
        plan = state.take_reference_plan() if state is not None else None
        if plan is None:  # every row reads it (or a warm-up / dummy run)
            with self._lora(input_ids.shape[0]):
                h_ref = self.reference(input_ids, positions, intermediate_tensors, None,
                                       **kwargs)
            self.reference_tokens += h_ref.shape[0]
            return torch.cat([h_aligned, h_ref], dim=-1)
        h_ref = h_aligned.new_zeros(h_aligned.shape[0], self._hidden_sizes[1])
        if plan.tokens is not None:
            with plan.scope(), self._lora(len(plan.tokens)):
                h_sub = self.reference(input_ids[plan.tokens], positions[..., plan.tokens],
                                       intermediate_tensors, None, **kwargs)
            h_ref.index_copy_(0, plan.tokens, h_sub)
            self.reference_tokens += h_sub.shape[0]
        return torch.cat([h_aligned, h_ref], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor | PromptSlice) -> torch.Tensor | None:
        """[B, H_aligned + H_ref] -> [B, V] logits of each row's decoding rule.

        The step's sampling call is mixed per row; a ``PromptSlice`` (prompt
        logprobs, [n, H_aligned + H_ref]) gets its row's rule at every position;
        other calls (warm-up) get the aligned model's logits.
        """
        if isinstance(hidden_states, PromptSlice):
            return self._prompt_logits(hidden_states)
        h_aligned, *h_ref = hidden_states.split(self._hidden_sizes, dim=-1)
        logits = self.aligned.compute_logits(h_aligned)
        state = self.align_state
        if state is None or not state.take_sampling_call(hidden_states.shape[0]):
            return logits
        # Called on every tensor-parallel rank alike: it may gather across ranks.
        ref_logits = None
        if state.needs_reference and self.reference is not None:
            h = h_ref[0][state.reference_rows]
            with self._lora(h.shape[0]):
                ref_logits = self.reference.compute_logits(h)
        if logits is None:  # a tensor-parallel rank that does not sample
            return None
        out = state.apply_rule(logits, ref_logits)
        if state.has_mara:
            out = state.apply_mara(logits, h_aligned, out, self.agents)
        return out

    def _prompt_logits(self, part: PromptSlice) -> torch.Tensor | None:
        """[n, H_aligned + H_ref] prompt positions of one row -> [n, V] its rule's logits."""
        h_aligned, *h_ref = part.hidden.split(self._hidden_sizes, dim=-1)
        with self._lora(h_aligned.shape[0], part.lora_id):
            logits = self.aligned.compute_logits(h_aligned)
        state = self.align_state
        if self.reference is None or state is None or not state.reads_reference(part.row):
            return logits
        # The row's reference hidden states were computed in this step's forward
        # (it reads the reference); every tensor-parallel rank decides alike.
        with self._lora(h_ref[0].shape[0]):
            ref_logits = self.reference.compute_logits(h_ref[0])
        self.reference_prompt_positions += ref_logits.shape[0] if ref_logits is not None else 0
        if logits is None:
            return None
        return state.apply_row_rule(logits, ref_logits, part.row)

    def _lora(self, num_tokens: int, lora_id: int = 0):
        """The LoRA context of ``num_tokens`` tokens or rows all with adapter ``lora_id``
        (0, the reference's: none); no context on an engine without LoRA."""
        if self.lora_scope is None:
            return nullcontext()
        return self.lora_scope(num_tokens, lora_id)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def route():
            for name, tensor in weights:
                yield (name if name.startswith(REFERENCE) else ALIGNED + name), tensor
        return AutoWeightsLoader(self).load_weights(route())

"""``GPUModelRunner._get_prompt_logprobs_dict`` (also the CPU runner's): prompt logprobs under each row's rule.

vLLM computes prompt logprobs after sampling, in a loop over the requests
that ask for them: it slices the step's hidden states to the request's prompt
positions, ``hidden_states[offset : offset + n]``, and calls the model's
``compute_logits`` on the slice. On an engine with a reference model the
stock loop is called with a stand-in for the hidden states
(``vllm_align.engine.batch_state.PromptHidden``) whose slices also name the
request's row, so that the pair model applies that row's rule: DeRa's
``log_softmax(lam * h_aligned + (1 - lam) * h_ref)``, AAD's ``softmax(A)``
over ``V_alpha`` (the distribution its sampled logprobs describe), the
aligned model's for ``none``. The slices also carry the row's LoRA adapter,
which the aligned LM head reads (``patches/lora_reference.py``). Everything else (chunked prompts, the
returned tensors, logprobs modes) stays vLLM's.

Prefix caching: vLLM skips the prefix-cache lookup of a request asking for
prompt logprobs (``SamplingParams.skip_reading_prefix_cache``), so its
prompt is computed, reference included; ``patches/input_processor.py``
keeps it so on a pair engine even when the request says otherwise.
Written for vLLM 0.32.
"""

from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_align.engine.batch_state import PromptHidden, align_state
from vllm_align.patches.base import VllmPatch


class PromptLogprobsPatch(VllmPatch):
    target = GPUModelRunner
    replaces = ("_get_prompt_logprobs_dict",)

    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        original = PromptLogprobsPatch.original("_get_prompt_logprobs_dict")
        state = align_state(self)
        if state is None or not state.has_reference_model or not self.num_prompt_logprobs:
            return original(self, hidden_states, num_scheduled_tokens)
        num_reqs = self.input_batch.num_reqs
        stand_in = PromptHidden(hidden_states, self.query_start_loc.np[: num_reqs + 1],
                                self.input_batch.request_lora_mapping[:num_reqs])
        return original(self, stand_in, num_scheduled_tokens)

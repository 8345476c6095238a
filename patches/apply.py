"""``apply_patches()``: every patch, once per process, in dependency order.

Written for vLLM 0.32 (each patch checks it before it patches anything).
"""

from __future__ import annotations

_applied = False


def apply_patches() -> None:
    """Apply all patches once per process, in dependency order."""
    global _applied
    if _applied:
        return
    from vllm_align.patches import (attention_metadata, compiled_classes, engine_args,
                                    input_processor, lora_cpu_ops, lora_reference, model_runner,
                                    openai_request, output_processor, prompt_logprobs,
                                    scheduler, serve_command, vllm_config)

    for patch in (vllm_config.VllmConfigPatch,  # the runner choice, read by all below
                  engine_args.EngineArgsPatch,
                  input_processor.InputProcessorPatch,
                  openai_request.CompletionRequestPatch,
                  openai_request.ChatCompletionRequestPatch,
                  serve_command.ServeSubcommandPatch,
                  scheduler.SchedulerPatch,
                  model_runner.ModelRunnerPatch,
                  attention_metadata.AttentionMetadataPatch,  # reads the step mark set above
                  prompt_logprobs.PromptLogprobsPatch,
                  output_processor.OutputProcessorPatch,
                  compiled_classes.ReferenceBuildPatch,  # the pair model's reference classes
                  lora_reference.LoRAModelPatch,  # a pair model's LoRA scope; enables below
                  # inert until a pair model with LoRA enables it (lora_cpu_ops.enable)
                  lora_cpu_ops.LoRAOpsPatch,
                  lora_cpu_ops.PunicaCPUOpsPatch):
        patch.apply()
    _applied = True

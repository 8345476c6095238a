"""``EngineArgs``: the ``vllm serve`` flags and the model-pair selection.

vLLM has no hook for new CLI flags, and ``from_cli_args`` copies only dataclass
fields, so both are wrapped. ``create_engine_config`` is wrapped so that every
engine (``vllm serve`` and ``LLM(...)``) with a reference model is checked
once at start and served by the pair model. Written for vLLM 0.32.
"""

from __future__ import annotations

import argparse
import json
import logging

from vllm.engine.arg_utils import EngineArgs

from vllm_align.config import EXTRA_ARGS_KEY, AlignConfigError, EngineAlignConfig
from vllm_align.patches.base import VllmPatch

logger = logging.getLogger("vllm.vllm_align")  # under vLLM's logger: its format and level
# The per-request alignment state, loaded by engines with alignment only.
BATCH_STATE = "vllm_align.engine.batch_state:AlignBatchState"


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


class EngineArgsPatch(VllmPatch):
    target = EngineArgs
    replaces = ("add_cli_args", "from_cli_args", "create_engine_config")

    @staticmethod
    def add_cli_args(parser):
        parser = EngineArgsPatch.original("add_cli_args").__func__(parser)
        group = parser.add_argument_group(
            "vllm-align", "Decoding-time alignment (DeRa, AAD) inside the engine.")
        group.add_argument("--sampler", choices=["default", "align"], default="default",
                           help="'align' serves the per-request 'alignment' field.")
        group.add_argument("--reference-model", default=None,
                           help="Reference (SFT) checkpoint evaluated in lockstep "
                                "with the served model; needed by DeRa and AAD.")
        group.add_argument("--align-default", type=_json_object, default=None,
                           help='Alignment for requests without one, e.g. '
                                '\'{"method": "aad", "alpha": 0.1}\'.')
        group.add_argument("--mara-agent", action="append", default=None,
                           metavar="[NAME=]PATH",
                           help="A MARA agent checkpoint (.pth or .safetensors); repeatable; "
                                "a bare PATH is named 'default'.")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = EngineArgsPatch.original("from_cli_args").__func__(cls, args)
        sampler = getattr(args, "sampler", "default")
        ref, default = getattr(args, "reference_model", None), getattr(args, "align_default", None)
        agents = getattr(args, "mara_agent", None)
        if sampler != "align":
            if ref is not None or default is not None or agents:
                raise AlignConfigError(
                    "--reference-model, --mara-agent and --align-default need --sampler align")
            return engine_args
        config = dict(engine_args.additional_config or {})
        align = dict(config.get(EXTRA_ARGS_KEY) or {})
        if ref is not None:
            align["reference_model"] = ref
        if default is not None:
            align["default"] = default
        if agents:
            from vllm_align.mara.config import parse_agent_args

            align["mara_agents"] = {**(align.get("mara_agents") or {}),
                                    **parse_agent_args(agents)}
        config[EXTRA_ARGS_KEY] = align
        engine_args.additional_config = config
        # Written back: with --data-parallel-size > 1 `vllm serve` hands this namespace to
        # spawned API-server processes, which call from_cli_args before loading plugins
        # (unpatched, it copies additional_config alone); idempotent when patched.
        args.additional_config = config
        return engine_args

    def create_engine_config(self, *args, **kwargs):
        from vllm_align.engine.overrides import check_agents, pair_overrides, served_overrides

        align = EngineAlignConfig.parse(self.additional_config)
        if align.needs_wrapper:
            if self.speculative_config:
                raise AlignConfigError(
                    "vllm-align cannot run with speculative decoding (vLLM refuses "
                    "logits processors there); drop --speculative-config")
            if self.pipeline_parallel_size > 1:
                raise AlignConfigError(
                    "vllm-align does not support pipeline parallelism yet "
                    f"(--pipeline-parallel-size {self.pipeline_parallel_size}); use tensor parallelism")
            if callable(self.hf_overrides):
                raise AlignConfigError("vllm-align needs hf_overrides as a dict, not a callable")
            if align.reference_is(self.model):
                if not self.enable_lora:
                    raise AlignConfigError(
                        f"reference_model {align.reference_model!r} is the served model itself: "
                        "that is a LoRA pair (aligned = a request's adapter on these weights); "
                        "start the engine with enable_lora=True (--enable-lora)")
                overrides = served_overrides(
                    self.model, revision=self.revision,
                    trust_remote_code=self.trust_remote_code, agents=align.mara_agents)
            elif align.reference_model is not None:
                overrides = pair_overrides(
                    self.model, align.reference_model, tokenizer=self.tokenizer,
                    revision=self.revision, trust_remote_code=self.trust_remote_code)
                if align.mara_agents:
                    from transformers import AutoConfig

                    check_agents(align.mara_agents, AutoConfig.from_pretrained(
                        self.model, revision=self.revision,
                        trust_remote_code=self.trust_remote_code).hidden_size)
            else:
                overrides = served_overrides(
                    self.model, revision=self.revision,
                    trust_remote_code=self.trust_remote_code, agents=align.mara_agents)
            self.hf_overrides = {**(self.hf_overrides or {}), **overrides}
        if align.mara_agents:
            # MARA's rollback of non-emitting rows is written for the
            # synchronous scheduler (see patches/scheduler.py).
            if self.async_scheduling:
                raise AlignConfigError(
                    "vllm-align's MARA needs synchronous scheduling; drop --async-scheduling")
            self.async_scheduling = False
            from vllm_align.engine import mara_stats

            mara_stats.mara_engine_started = True
        aligned = EXTRA_ARGS_KEY in (self.additional_config or {})
        if aligned and BATCH_STATE not in (self.logits_processors or []):
            # Only engines with alignment load the batch state (a V1 logits
            # processor); a plain engine keeps vLLM's processors and runner.
            self.logits_processors = [*(self.logits_processors or []), BATCH_STATE]
        config = EngineArgsPatch.original("create_engine_config")(self, *args, **kwargs)
        if aligned:
            if config.use_v2_model_runner:
                raise AlignConfigError(
                    "vllm-align runs on vLLM's V1 model runner; unset "
                    "VLLM_USE_V2_MODEL_RUNNER (the plugin then selects V1 for this engine)")
            logger.info("vllm-align: this engine runs vLLM's V1 model runner "
                        "(alignment rules are V1 logits processors)")
        return config

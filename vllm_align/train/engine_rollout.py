"""MARA rollouts inside a vLLM engine: the walk that serves requests, in training.

The engine serves the LLM with one MARA agent, ``AGENT``, whose weights are
the SAC actor's: ``collect`` copies the newest actor into it (through
``LLM.collective_rpc``, ``engine/rollout_worker.py``; no restart, the LLM stays
loaded), then decodes one request per episode with sampled decisions
(``"decisions": "sampled"``, fallback "last"), each request seeded with its
episode's seed (``rollout.episode_seeds``). A seeded decision draws
``rules.decision_uniform(seed, position, index)``, as the HF rollout does, so
both rollouts make the same decisions on the same states.

The engine records each judged candidate of these seeded rows
(``engine/rollout_worker.py``: the state, the action, the emitted token's
``log π_θ − log π_ref``), kept on the worker's device during the rollout and
fetched once at its end; the episodes' tokens and candidate positions come
with the request outputs. ``rollout.assemble`` turns both into transitions, as
for the HF rollout. Requests that are not being trained (unseeded, or on an
engine that does not record) never pay for this.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping, Optional, Sequence

import torch

from vllm_align.data.prompts import Prompt
from vllm_align.mara.agent import MaraAgent, save_agent
from vllm_align.patches.in_process_engine import MP_ENV, engine_in_this_process
from vllm_align.train.hf_rollout import HFRollout
from vllm_align.train.rollout import (DECISION_MODES, RolloutBatch, RolloutSpec, WalkRecords,
                                      assemble, episode_seeds, walk_order)
from vllm_align.train.terminal import TerminalReward

AGENT = "train"  # the engine's name for the agent being trained


# A CPU torch.compile of the LLM takes ~40 s; below this many response tokens per engine
# (episodes x --max-response-len) it is never earned back, and the engine runs eager.
COMPILE_MIN_TOKENS = 1_000_000


def engine_kwargs(spec: RolloutSpec, hf_config) -> dict[str, Any]:
    """The rollout engine's ``LLM(...)`` arguments: defaults chosen from the job's size,
    every key of ``spec.engine_args`` wins.

    * no prefix caching: a resumed run must repeat the uninterrupted one exactly, and
      cached prompt blocks would change a later rollout's float path;
    * on CPU, eager unless the engine decodes at least ``COMPILE_MIN_TOKENS`` response
      tokens (``spec.episodes · spec.max_response_len``);
    * on CPU with the prompts known, ``max_model_len`` = longest prompt + response limit and
      a KV cache for ``spec.batch`` such sequences (vLLM's CPU default reserves 90% of the
      machine's memory, and fails when that much is not free).
    """
    from vllm.platforms import current_platform

    kwargs: dict[str, Any] = {"dtype": spec.dtype, "seed": 0, "enable_prefix_caching": False}
    if current_platform.is_cpu():
        kwargs["enforce_eager"] = spec.episodes * spec.max_response_len < COMPILE_MIN_TOKENS
        if spec.prompt_len and spec.batch:
            max_len = spec.prompt_len + spec.max_response_len
            kwargs["max_model_len"] = max_len
            per_token = _kv_bytes_per_token(hf_config, spec.dtype)
            if per_token:  # blocks of up to 128 tokens, one spare per sequence
                tokens = spec.batch * (-(-max_len // 128) + 1) * 128
                kwargs["kv_cache_memory_bytes"] = tokens * per_token
    return {**kwargs, **dict(spec.engine_args)}


def _kv_bytes_per_token(cfg, dtype: str) -> int:
    """K and V bytes per token of a standard decoder config (0 when it does not say)."""
    layers, heads = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads",
                                                                       None)
    if not layers or not heads or not getattr(cfg, "hidden_size", None):
        return 0
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * getattr(torch, dtype).itemsize


def rollout_engine(spec: RolloutSpec):
    """A ``vllm.LLM`` serving ``spec.model`` with an agent ``AGENT`` (its weights are
    replaced by every rollout) and the recording worker extension (``engine_kwargs``).

    On CPU the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
    unless the variable is set): no engine-core and worker processes to spawn, each
    importing vLLM and torch again, and the engine decodes on this process's torch threads
    (``--threads``), with no scheduler process polling a core beside it.
    """
    import tempfile

    from transformers import AutoConfig
    from vllm import LLM
    from vllm.platforms import current_platform

    from vllm_align.engine.rollout_worker import WORKER_EXTENSION

    hf_config = AutoConfig.from_pretrained(spec.model)
    kwargs = engine_kwargs(spec, hf_config)
    in_process = current_platform.is_cpu() and MP_ENV not in os.environ
    with tempfile.TemporaryDirectory() as tmp:  # read once, at start-up
        path = save_agent(MaraAgent(hf_config.hidden_size), f"{tmp}/{AGENT}.safetensors")
        with engine_in_this_process() if in_process else contextlib.nullcontext():
            llm = LLM(model=spec.model, worker_extension_cls=WORKER_EXTENSION,
                      additional_config={"align": {"mara_agents": {AGENT: str(path)}}},
                      **kwargs)
    llm.collective_rpc("vllm_align_record", args=(True,))
    return llm


def open_rollout(spec: RolloutSpec):
    """The rollout ``spec`` asks for: an ``EngineRollout`` or the ``HFRollout`` reference."""
    return EngineRollout.from_spec(spec) if spec.rollout == "engine" else HFRollout.from_spec(spec)


class EngineRollout:
    """Batched MARA rollouts in a vLLM engine (see the module doc).

    Args:
        llm: a ``vllm.LLM`` from ``rollout_engine`` (serving agent ``AGENT``, recording).
        tokenizer: the LLM's tokenizer (decoding responses, as the HF rollout).
        terminal, kl_coef, top_k, top_p, max_response_len, threshold: as ``HFRollout``.
    """

    def __init__(self, llm, tokenizer, terminal: Optional[TerminalReward] = None, *,
                 kl_coef: float = 0.1, top_k: int = 40, top_p: float = 0.95,
                 max_response_len: int = 512, threshold: float = 0.5) -> None:
        self.llm, self.tokenizer, self.terminal = llm, tokenizer, terminal
        self.kl_coef, self.top_k, self.top_p = float(kl_coef), int(top_k), float(top_p)
        self.max_response_len, self.threshold = int(max_response_len), float(threshold)
        self.hidden_size = int(llm.llm_engine.vllm_config.model_config.get_hidden_size())

    @classmethod
    def from_spec(cls, spec: RolloutSpec) -> "EngineRollout":
        from transformers import AutoTokenizer

        terminal = spec.terminal()  # a bad reward source fails before an engine starts
        return cls(rollout_engine(spec), AutoTokenizer.from_pretrained(spec.model),
                   terminal, kl_coef=spec.kl_coef, top_k=spec.top_k, top_p=spec.top_p,
                   max_response_len=spec.max_response_len, threshold=spec.threshold)

    def set_actor(self, actor_state: Mapping[str, torch.Tensor]) -> None:
        """Install new actor weights as the engine's agent (every worker, in place)."""
        from safetensors.torch import save

        state = {k: v.detach().to("cpu", torch.float32).contiguous()
                 for k, v in actor_state.items()}
        self.llm.collective_rpc("vllm_align_set_agent", args=(AGENT, save(state)))

    @torch.no_grad()
    def collect(self, prompts: Sequence[Prompt], actor_state: Optional[Mapping[str, torch.Tensor]],
                *, seed: int = 0, decisions: str = "sampled") -> RolloutBatch:
        """One episode per prompt; ``decisions`` "sampled" (training) or "greedy" (as served).

        The LLM-only modes of ``Rollout.collect`` ("plain", "reference") are the
        engine's plain decoding and are not rolled out here.
        """
        from safetensors.torch import load
        from vllm import SamplingParams, TokensPrompt

        from vllm_align.engine.mara_stats import mara_stats

        if decisions not in ("sampled", "greedy"):
            raise ValueError(f"the engine rollout takes decisions 'sampled' or 'greedy' (of "
                             f"{list(DECISION_MODES)}), got {decisions!r}")
        if actor_state is None:
            raise ValueError(f"decisions={decisions!r} needs actor weights")
        self.set_actor(actor_state)
        self.llm.collective_rpc("vllm_align_take_records")  # drop anything left over
        seeds = episode_seeds(seed, len(prompts))
        align = {"method": "mara", "agent": AGENT, "top_k": self.top_k, "top_p": self.top_p,
                 "threshold": self.threshold, "fallback": "last", "decisions": decisions}
        # The MARA rule decides the token (one-hot logits): greedy sampling returns it.
        params = [SamplingParams(max_tokens=self.max_response_len, temperature=0.0, seed=s,
                                 detokenize=False, extra_args={"align": align}) for s in seeds]
        outputs = self._decode([TokensPrompt(prompt_token_ids=list(p.token_ids))
                                for p in prompts], params)
        blob = next((r for r in self.llm.collective_rpc("vllm_align_take_records") if r), b"")
        records = load(blob) if blob else {}
        token_lists, chosen_lists, fallbacks = [], [], []
        for out in outputs:
            completion = out.outputs[0]
            stats = mara_stats(completion)
            positions = list(stats.positions) if stats is not None else []
            evaluated = list(stats.evaluated) if stats is not None else []
            token_lists.append(list(completion.token_ids))
            chosen_lists.append(positions)
            # Fallback "last": every asked candidate rejected, the last one forced.
            fallbacks.append(sum(p == e > 0 for p, e in zip(positions, evaluated)))
        walk = walk_records(records, seeds, self.hidden_size)
        batch = assemble(prompts, token_lists, chosen_lists, fallbacks, walk, self.tokenizer,
                         self.terminal, self.kl_coef)
        batch.forwards = int(records["key"].numel()) if records else 0
        return batch

    def _decode(self, inputs, params) -> list:
        """``LLM.generate`` with every request queued before the first step.

        The engine core steps as soon as a request arrives; under load it could
        start with part of the rollout, and another batch composition means
        other floating-point paths (a resumed run would no longer repeat the
        uninterrupted one). So scheduling is paused (``sleep(level=0)``: requests
        are accepted, not run) while the rollout is queued.
        """
        self.llm.sleep(level=0, mode="keep")
        try:
            self.llm.enqueue(inputs, params, use_tqdm=False)
        finally:
            self.llm.wake_up(tags=["scheduling"])
        outputs = self.llm.wait_for_completion(use_tqdm=False)  # in submission order
        if len(outputs) != len(inputs):
            raise RuntimeError(f"the rollout engine returned {len(outputs)} of {len(inputs)} "
                               "episodes")
        return outputs

    def close(self) -> None:
        self.llm = None


def walk_records(records: Mapping[str, torch.Tensor], seeds: Sequence[int],
                 hidden_size: int) -> WalkRecords:
    """The engine's records (``engine/rollout_worker.py``) → ``WalkRecords`` of these episodes.

    Records of other seeds are dropped; a candidate recorded twice (a preempted
    request walks its position again, with the same draws) is kept once, the
    later record.
    """
    long0 = torch.zeros(0, dtype=torch.long)
    if not records:
        return WalkRecords(long0, long0, torch.zeros(0, hidden_size), long0, long0, long0,
                           torch.zeros(0))
    seed_t = torch.tensor(list(seeds), dtype=torch.long)
    sorted_seeds, by_seed = torch.sort(seed_t)
    where = torch.searchsorted(sorted_seeds, records["seed"]).clamp(max=len(seeds) - 1)
    ours = sorted_seeds[where] == records["seed"]
    episode = by_seed[where]
    # One record per (episode, key): the last.
    (flat,) = walk_order((episode, records["key"]))
    _, inverse = torch.unique(flat, return_inverse=True)
    last = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(flat.numel()), reduce="amax")
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[last] = True
    keep &= ours
    dec = keep & records["asked"]
    ev = keep & records["emit"]
    return WalkRecords(episode[dec], records["key"][dec], records["state"][dec].float(),
                       records["accepted"][dec].long(), episode[ev], records["key"][ev],
                       records["diff"][ev].float())

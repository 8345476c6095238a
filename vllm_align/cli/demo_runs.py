"""The demo's "MARA vs its base LLM" runs: the SAC-trained toy agent through the engine.

The agent (``vllm_align.toy.agent.toy_agent``) was trained on the toy world's
SFT model, reading that model's final hidden states, to put polite words into
16-token responses. Here it runs where users run it: a ``vllm.LLM`` serving
the SFT model with the trained agent and the same run's untrained (initial)
actor as named MARA agents, no reference model. One ``generate`` call decodes
every held-out prompt in each of ``RUNS``: the SFT model alone (greedy, and
top-k 40 / top-p 0.95 sampling at temperature 1) and MARA with either agent
(sampled decisions, the policy SAC optimises, and greedy decisions, the
served default), with MARA's own candidate set at the same top-k/top-p.

Sampled runs are decoded once per repeat in ``SEEDS``, every request with
``SamplingParams(seed=1000 * repeat + prompt index)``: plain sampling and
MARA's sampled decisions (counter-based draws from the request's seed) are
reproducible whatever the batch. Greedy runs are exact.

Why compare greedy decisions only with care: with fallback "last", an agent
that rejects everything emits the least probable candidate, which in this
world is often the polite one; the untrained actor is nearly such an agent,
so its greedy score is high for no learned reason (``vllm_align.toy.agent``).
Its sampled decisions (P(accept) ≈ 0.46) are the fair "before".
"""

from __future__ import annotations

import dataclasses
from statistics import fmean
from typing import Any, Mapping, Optional, Sequence

TOP_K, TOP_P = 40, 0.95  # plain sampling and MARA's candidates, as in training
MAX_TOKENS = 16  # the response horizon the toy agent was trained for
SEEDS = (0, 1, 2, 3)  # repeats of every sampled run
MAX_MODEL_LEN = 256


@dataclasses.dataclass(frozen=True)
class Run:
    """One way to decode: ``align`` is the MARA spec (None: the LLM alone)."""

    align: Optional[Mapping[str, Any]]
    sampled: bool  # plain: top-k/top-p sampling; MARA: sampled decisions (both per repeat)
    label: str  # what the demo prints

    def params(self, seed: int, max_tokens: int):
        from vllm import SamplingParams

        extra = {"extra_args": {"align": dict(self.align)}} if self.align else {}
        if self.align is None and self.sampled:
            return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_k=TOP_K,
                                  top_p=TOP_P, seed=seed)
        if self.sampled:  # MARA, sampled decisions: the seed decides them
            return SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=seed, **extra)
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, **extra)


def _mara(agent: str, decisions: str) -> dict:
    return {"method": "mara", "agent": agent, "decisions": decisions,
            "top_k": TOP_K, "top_p": TOP_P}


RUNS: dict[str, Run] = {
    "plain greedy": Run(None, False, "SFT alone, greedy"),
    "plain sampling": Run(None, True, f"SFT alone, top-k {TOP_K}/top-p {TOP_P} sampling"),
    "untrained sampled": Run(_mara("untrained", "sampled"), True,
                             "MARA, untrained agent, sampled decisions"),
    "trained sampled": Run(_mara("trained", "sampled"), True,
                           "MARA, trained agent, sampled decisions"),
    "untrained greedy": Run(_mara("untrained", "greedy"), False,
                            "MARA, untrained agent, greedy decisions"),
    "trained greedy": Run(_mara("trained", "greedy"), False,
                          "MARA, trained agent, greedy decisions"),
}


def build_engine(agent, *, seed: int = 0, **llm_kwargs: Any):
    """``vllm.LLM`` serving the agent's LLM (the SFT model) with agents "trained", "untrained".

    ``agent`` is a ``vllm_align.toy.agent.ToyAgent``.
    """
    from vllm_align.data.engine import build_llm

    config = {"align": {"mara_agents": {"trained": str(agent.trained),
                                        "untrained": str(agent.untrained)}}}
    return build_llm(str(agent.model), None, dtype="float32", seed=seed,
                     max_model_len=MAX_MODEL_LEN, llm_kwargs={"additional_config": config, **llm_kwargs})


def decode_runs(llm, prompt_ids: Sequence[Sequence[int]], runs: Mapping[str, Run] = RUNS, *,
                seeds: Sequence[int] = SEEDS,
                max_tokens: int = MAX_TOKENS) -> dict[str, list[list[Any]]]:
    """Decode every prompt with every run in ONE ``llm.generate`` call.

    Args:
        prompt_ids: chat-formatted prompts (``ToyWorld.prompt_token_ids``), P of them.
    Returns:
        run name -> one list per repeat (``len(seeds)`` for sampled runs, 1
        otherwise) of P ``CompletionOutput``, in prompt order.
    """
    requests, params, where = [], [], []
    for name, run in runs.items():
        for r, seed in enumerate(seeds if run.sampled else seeds[:1]):
            for i, ids in enumerate(prompt_ids):
                requests.append({"prompt_token_ids": list(ids)})
                params.append(run.params(1000 * seed + i, max_tokens))
                where.append((name, r))
    out: dict[str, list[list[Any]]] = {name: [] for name in runs}
    for (name, r), result in zip(where, llm.generate(requests, params, use_tqdm=False)):
        if r == len(out[name]):
            out[name].append([])
        out[name][r].append(result.outputs[0])
    return out


def mean_rewards(outputs: Mapping[str, list[list[Any]]], reward) -> dict[str, list[float]]:
    """run name -> mean ``reward(text)`` over the prompts, one value per repeat."""
    return {name: [fmean(reward(o.text) for o in rep) for rep in reps]
            for name, reps in outputs.items()}

"""The toy agent's runs decoded by the HF rollout it was trained in (tests only).

The same runs as ``vllm_align.cli.demo_runs.RUNS``, decoded by ``HFRollout`` instead of
the engine: test_toy_mara.py checks that the two agree, test_train_learns.py that a
freshly trained agent learned (seconds, no engine start).
"""

from __future__ import annotations

from statistics import fmean
from typing import Any, Sequence

from vllm_align.toy.agent import ToyAgent, ToySettings
from vllm_align.toy.corpus import chat_messages, eval_prompts
from vllm_align.toy.world import polite_count

EVAL_RUNS = ("plain greedy", "plain sampling", "untrained sampled", "trained sampled",
             "untrained greedy", "trained greedy")
EVAL_SEEDS = (1000, 1001, 1002, 1003)  # sampled runs: 4 x 64 held-out episodes
# HFRollout.collect's decisions per run: the LLM alone greedy ("plain") or top-k/top-p
# sampled ("reference"); MARA with the run's agent otherwise.
_DECISIONS = {"plain greedy": "plain", "plain sampling": "reference"}


def evaluate_agent(agent: ToyAgent, settings: ToySettings = ToySettings(), *,
                   runs: Sequence[str] = EVAL_RUNS,
                   seeds: Sequence[int] = EVAL_SEEDS) -> dict[str, dict[str, Any]]:
    """Mean polite words on the 64 held-out prompts per run of ``EVAL_RUNS``.

    Greedy runs are decoded once, sampled ones once per seed, at the trained horizon and
    top-k/top-p. Returns {run: {"reward", "accept_rate", "responses"}} (responses of the
    first seed, in prompt order).
    """
    import torch

    from vllm_align.data.prompts import load_prompts
    from vllm_align.data.rewards import load_reward
    from vllm_align.mara.agent import load_agent
    from vllm_align.train.hf_rollout import HFRollout, load_causal_lm
    from vllm_align.train.terminal import TerminalReward

    states = {"trained": load_agent(agent.trained).state_dict(),
              "untrained": load_agent(agent.untrained).state_dict()}
    sac = settings.train_config(agent.model.parent, agent.trained.parent).sac
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)  # tiny forwards: extra threads cost ~20x on a busy box
    try:
        model, tokenizer = load_causal_lm(str(agent.model))
        prompts = load_prompts([{"id": f"eval-{i}", "messages": chat_messages(p)}
                                for i, p in enumerate(eval_prompts())], tokenizer)
        rollout = HFRollout(model, tokenizer, TerminalReward(load_reward(polite_count), None),
                            top_k=sac.top_k, top_p=sac.top_p,
                            max_response_len=settings.max_response_len)
        out = {}
        for name in runs:
            state, decisions = states.get(name.split()[0]), _DECISIONS.get(name, name.split()[1])
            episodes, responses = [], None
            for seed in (seeds if decisions in ("sampled", "reference") else seeds[:1]):
                batch = rollout.collect(prompts, state, seed=seed, decisions=decisions)
                episodes += batch.episodes
                responses = responses or [e.response for e in batch.episodes]
            decided = sum(e.num_decisions for e in episodes)
            out[name] = {"reward": fmean(e.reward for e in episodes),
                         "accept_rate": sum(e.num_accepts for e in episodes) / max(1, decided),
                         "responses": responses}
        return out
    finally:
        torch.set_num_threads(threads)

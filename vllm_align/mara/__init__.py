"""MARA (token-level accept/reject) pieces that need no vLLM.

* ``agent``: the released agent network, safe checkpoint loading/saving;
* ``rules``: the candidate set and the accept/reject walk as batched tensor ops;
* ``config``: typed, validated per-request parameters and agent specs.
"""

from vllm_align.mara.agent import (AgentWidthError, MaraAgent, MaraAgentError, load_agent,
                                   save_agent)
from vllm_align.mara.config import (MaraParams, parse_agent_arg, parse_agent_args,
                                    parse_agent_map)
from vllm_align.mara.rules import WalkStep, candidate_set, walk_log_ratio, walk_step

__all__ = [
    "AgentWidthError", "MaraAgent", "MaraAgentError", "load_agent", "save_agent", "MaraParams",
    "parse_agent_arg", "parse_agent_args", "parse_agent_map", "WalkStep", "candidate_set",
    "walk_log_ratio", "walk_step",
]

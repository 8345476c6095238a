"""Typed MARA request parameters and agent specs, validated at the edge.

A request's ``alignment`` object for MARA::

    {"method": "mara", "agent": "default", "top_k": 40, "top_p": 0.95,
     "threshold": 0.5, "fallback": "last", "decisions": "greedy"}

Every key but ``method`` is optional; the defaults are the released code's
(k=40, p=0.95, accept when P(accept) > 0.5) and the paper's fallback. Errors
are ``AlignConfigError`` (a ``ValueError``) naming the bad value and what is
allowed, like the rest of ``vllm_align.config``.

Engine side, agents are named paths: ``--mara-agent [NAME=]PATH`` (a bare
path is named "default") or ``additional_config={"align": {"mara_agents":
{NAME: PATH}}}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Collection, Mapping

from vllm_align.checks import AlignConfigError, unit_number

DEFAULT_AGENT = "default"
# Larger k act as the vocabulary size; beyond int32 a k is refused, not carried.
TOP_K_MAX = 2**31 - 1
FALLBACKS = ("last", "first")
DECISIONS = ("greedy", "sampled")
MARA_KEYS = ("agent", "top_k", "top_p", "threshold", "fallback", "decisions")


def _choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed or not isinstance(value, str):
        raise AlignConfigError(f"alignment {name!r} must be one of {list(allowed)}, got {value!r}")
    return value


def _agent_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip() or "=" in value:
        raise AlignConfigError(f"{what} must be a non-empty name without spaces at either end "
                               f"or '=', got {value!r}")
    return value


@dataclass(frozen=True)
class MaraParams:
    """One sequence's MARA settings.

    Attributes:
        agent: name of one of the engine's agents.
        top_k: candidates are at most the k most probable tokens, k ≥ 1.
        top_p: then the nucleus of mass p of those (renormalised), p in (0, 1].
        threshold: greedy decisions accept when P(accept) > threshold, in [0, 1).
        fallback: "last" (paper: force the last candidate when all are
            rejected) or "first" (released evaluation code: force the first).
        decisions: "greedy" (threshold) or "sampled" (accept with probability
            P(accept), as in training).
    """

    agent: str = DEFAULT_AGENT
    top_k: int = 40
    top_p: float = 0.95
    threshold: float = 0.5
    fallback: str = "last"
    decisions: str = "greedy"

    @property
    def fallback_last(self) -> bool:
        return self.fallback == "last"

    @property
    def sampled(self) -> bool:
        return self.decisions == "sampled"

    def to_json(self) -> dict[str, Any]:
        """Every MARA key with its value (``MaraParams.parse(p.to_json()) == p``)."""
        return {key: getattr(self, key) for key in MARA_KEYS}

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> "MaraParams":
        """The settings of a canonical spec (``to_json``'s keys), read without checks."""
        return cls(**{key: spec[key] for key in MARA_KEYS})

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> "MaraParams":
        """Parse the MARA keys of an ``alignment`` object.

        ``spec`` may carry ``"method": "mara"`` (it is checked, not stored);
        any other key outside ``MARA_KEYS`` is refused.
        """
        if not isinstance(spec, Mapping):
            raise AlignConfigError(
                f"MARA parameters must be an object like {{\"method\": \"mara\", \"top_k\": 40}}, "
                f"got {spec!r}")
        if "method" in spec and spec["method"] != "mara":
            raise AlignConfigError(
                f"MARA parameters given with method {spec['method']!r}; expected 'mara'")
        unknown = sorted(set(spec) - {"method", *MARA_KEYS}, key=repr)
        if unknown:
            raise AlignConfigError(f"unknown alignment key(s) {unknown} for method 'mara'; "
                                   f"allowed: {['method', *MARA_KEYS]}")
        kwargs: dict[str, Any] = {}
        if "agent" in spec:
            kwargs["agent"] = _agent_name(spec["agent"], "alignment 'agent'")
        if "top_k" in spec:
            k = spec["top_k"]
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise AlignConfigError(f"alignment 'top_k' must be an integer >= 1, got {k!r}")
            if k > TOP_K_MAX:
                raise AlignConfigError(f"alignment 'top_k' must be at most {TOP_K_MAX} (any k "
                                       f"above the vocabulary size acts as it), got {k!r}")
            kwargs["top_k"] = k
        if "top_p" in spec:
            kwargs["top_p"] = unit_number(spec["top_p"], "top_p", low_open=True, high_open=False)
        if "threshold" in spec:
            kwargs["threshold"] = unit_number(spec["threshold"], "threshold", low_open=False,
                                              high_open=True)
        if "fallback" in spec:
            kwargs["fallback"] = _choice(spec["fallback"], "fallback", FALLBACKS)
        if "decisions" in spec:
            kwargs["decisions"] = _choice(spec["decisions"], "decisions", DECISIONS)
        return cls(**kwargs)

    def check_agent(self, agent_names: Collection[str]) -> None:
        """Refuse an agent name this engine does not have."""
        if not agent_names:
            raise AlignConfigError(
                "alignment method 'mara' needs a MARA agent, and this engine has none; start it "
                "with --mara-agent [NAME=]PATH (served) or additional_config={'align': "
                "{'mara_agents': {NAME: PATH}}}")
        if self.agent not in agent_names:
            raise AlignConfigError(f"unknown MARA agent {self.agent!r}; this engine has "
                                   f"{sorted(agent_names)}")


def parse_agent_arg(arg: str) -> tuple[str, str]:
    """``--mara-agent`` value ``NAME=PATH`` or ``PATH`` (named "default") → (name, path).

    The text before the first '=' is a name only if it contains no path
    separator, so ``/ckpt/a=b.pth`` is a bare path.
    """
    if not isinstance(arg, str) or not arg:
        raise AlignConfigError(f"--mara-agent must be [NAME=]PATH, got {arg!r}")
    name, sep, path = arg.partition("=")
    if not sep or "/" in name or os.sep in name:
        name, path = DEFAULT_AGENT, arg
    name = _agent_name(name, "--mara-agent NAME")
    if not path:
        raise AlignConfigError(f"--mara-agent {arg!r} names no checkpoint path")
    return name, path


def parse_agent_map(spec: Any) -> dict[str, str]:
    """``additional_config["align"]["mara_agents"]`` ({NAME: PATH}) → a checked dict."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise AlignConfigError(
            f"'mara_agents' must be an object {{NAME: PATH}}, got {spec!r}")
    agents: dict[str, str] = {}
    for name, path in spec.items():
        _agent_name(name, "a 'mara_agents' name")
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise AlignConfigError(f"'mara_agents' entry {name!r} must be a checkpoint path, "
                                   f"got {path!r}")
        agents[name] = os.fspath(path)
    return agents


def parse_agent_args(args: Collection[str]) -> dict[str, str]:
    """Repeated ``--mara-agent`` values → {name: path}; a name given twice is refused."""
    agents: dict[str, str] = {}
    for arg in args or ():
        name, path = parse_agent_arg(arg)
        if name in agents:
            raise AlignConfigError(f"--mara-agent names agent {name!r} twice "
                                   f"({agents[name]!r} and {path!r})")
        agents[name] = path
    return agents

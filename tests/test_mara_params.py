"""MARA request parameters and agent specs: defaults, parsing, refusals."""

from __future__ import annotations

import math

import pytest

from vllm_align.config import AlignConfigError
from vllm_align.mara.config import (MaraParams, parse_agent_arg, parse_agent_args,
                                    parse_agent_map)


def _refused(spec, *needles: str) -> str:
    with pytest.raises(AlignConfigError) as info:
        MaraParams.parse(spec)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for needle in needles:
        assert needle in message, message
    return message


def test_defaults_are_the_released_code_and_the_paper():
    params = MaraParams.parse({"method": "mara"})
    assert params == MaraParams()
    assert (params.agent, params.top_k, params.top_p, params.threshold, params.fallback,
            params.decisions) == ("default", 40, 0.95, 0.5, "last", "greedy")
    assert params.fallback_last and not params.sampled


def test_full_spec():
    params = MaraParams.parse({"method": "mara", "agent": "safety", "top_k": 10, "top_p": 1,
                               "threshold": 0.0, "fallback": "first", "decisions": "sampled"})
    assert params == MaraParams("safety", 10, 1.0, 0.0, "first", "sampled")
    assert isinstance(params.top_p, float) and not params.fallback_last and params.sampled
    assert MaraParams.parse({"top_k": 1, "top_p": 1e-9}).top_k == 1  # "method" is optional


@pytest.mark.parametrize("spec,needles", [
    ({"method": "mara", "topk": 5}, ["unknown alignment key(s) ['topk']", "'top_k'"]),
    ({"method": "mara", "lambda": 0.5}, ["['lambda']", "allowed"]),
    ({"method": "aad", "top_k": 5}, ["'aad'", "'mara'"]),
    ({"top_k": 0}, ["'top_k' must be an integer >= 1, got 0"]),
    ({"top_k": -3}, ["got -3"]),
    ({"top_k": 4.0}, ["'top_k' must be an integer >= 1, got 4.0"]),
    ({"top_k": True}, ["got True"]),
    ({"top_k": "40"}, ["got '40'"]),
    ({"top_p": 0}, ["'top_p' must be in (0, 1], got 0.0"]),
    ({"top_p": 1.5}, ["got 1.5"]),
    ({"top_p": math.nan}, ["'top_p' must be finite"]),
    ({"top_p": "0.9"}, ["'top_p' must be a number, got '0.9'"]),
    ({"threshold": 1.0}, ["'threshold' must be in [0, 1), got 1.0"]),
    ({"threshold": -0.1}, ["got -0.1"]),
    ({"threshold": None}, ["'threshold' must be a number, got None"]),
    ({"fallback": "middle"}, ["'fallback' must be one of ['last', 'first'], got 'middle'"]),
    ({"fallback": ["last"]}, ["got ['last']"]),
    ({"decisions": "beam"}, ["'decisions' must be one of ['greedy', 'sampled'], got 'beam'"]),
    ({"agent": ""}, ["'agent'", "got ''"]),
    ({"agent": 3}, ["got 3"]),
    ({"agent": " default"}, ["got ' default'"]),
])
def test_bad_values_are_refused_with_the_value_and_what_is_allowed(spec, needles):
    _refused(spec, *needles)


def test_not_an_object():
    _refused([("top_k", 5)], "must be an object")


def test_check_agent():
    MaraParams(agent="a").check_agent({"a", "b"})
    with pytest.raises(AlignConfigError, match=r"unknown MARA agent 'c'; this engine has \['a', 'b'\]"):
        MaraParams(agent="c").check_agent({"b", "a"})
    with pytest.raises(AlignConfigError, match="needs a MARA agent, and this engine has none"):
        MaraParams().check_agent({})


def test_agent_args():
    assert parse_agent_arg("/ckpt/agent.pth") == ("default", "/ckpt/agent.pth")
    assert parse_agent_arg("safety=/ckpt/a.pth") == ("safety", "/ckpt/a.pth")
    assert parse_agent_arg("/ckpt/run=3/a.pth") == ("default", "/ckpt/run=3/a.pth")
    assert parse_agent_arg("agent.safetensors") == ("default", "agent.safetensors")
    for bad in ("", "safety=", "=/p.pth"):
        with pytest.raises(AlignConfigError, match="--mara-agent"):
            parse_agent_arg(bad)
    assert parse_agent_args(["a.pth", "s=b.pth"]) == {"default": "a.pth", "s": "b.pth"}
    assert parse_agent_args([]) == {}
    with pytest.raises(AlignConfigError, match="names agent 'default' twice"):
        parse_agent_args(["a.pth", "default=b.pth"])


def test_agent_map():
    assert parse_agent_map(None) == {}
    assert parse_agent_map({"default": "/a.pth", "s": "/b.safetensors"}) == {
        "default": "/a.pth", "s": "/b.safetensors"}
    for bad, needle in (("/a.pth", "must be an object"), ({"x": 3}, "entry 'x'"),
                        ({"": "/a.pth"}, "'mara_agents' name"), ({"x": ""}, "entry 'x'")):
        with pytest.raises(AlignConfigError, match=needle):
            parse_agent_map(bad)

"""MARA agent network and checkpoints: released format, safetensors, safe loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vllm_align.config import AlignConfigError
from vllm_align.mara.agent import (STATE_KEYS, AgentWidthError, MaraAgent, MaraAgentError,
                                   load_agent, save_agent)
from vllm_align.toy.models import random_agent

D = 32  # a tiny LLM hidden size


def _states(n: int, seed: int = 0, d: int = D) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3.0


def _released_state_dict(d: int = D) -> dict[str, torch.Tensor]:
    """What the released code's actor.state_dict() holds: the same keys and shapes."""
    gen = torch.Generator().manual_seed(7)
    shapes = {"ln.weight": (d,), "ln.bias": (d,), "linear1.weight": (1024, d),
              "linear1.bias": (1024,), "linear2.weight": (256, 1024), "linear2.bias": (256,),
              "output_linear.weight": (2, 256), "output_linear.bias": (2,)}
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}


def _error(path, **kwargs) -> str:
    with pytest.raises(MaraAgentError) as info:
        load_agent(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message
    return message


def test_architecture_matches_released_checkpoints():
    agent = MaraAgent(4096)
    assert list(agent.state_dict()) == list(STATE_KEYS)
    shapes = {k: tuple(v.shape) for k, v in agent.state_dict().items()}
    assert shapes == {"ln.weight": (4096,), "ln.bias": (4096,),
                      "linear1.weight": (1024, 4096), "linear1.bias": (1024,),
                      "linear2.weight": (256, 1024), "linear2.bias": (256,),
                      "output_linear.weight": (2, 256), "output_linear.bias": (2,)}


def test_accept_prob_is_softmax_index_1_in_float32():
    agent = random_agent(D, seed=1)
    h = _states(16)
    sd = {k: v.double() for k, v in agent.state_dict().items()}
    x = torch.nn.functional.layer_norm(h.double(), (D,), sd["ln.weight"], sd["ln.bias"])
    x = torch.relu(x @ sd["linear1.weight"].T + sd["linear1.bias"])
    x = torch.relu(x @ sd["linear2.weight"].T + sd["linear2.bias"])
    expected = torch.softmax(x @ sd["output_linear.weight"].T + sd["output_linear.bias"], -1)[:, 1]
    got = agent.accept_prob(h)
    assert got.shape == (16,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # LLM dtypes are accepted; the agent still computes in float32.
    assert agent.accept_prob(h.bfloat16()).dtype == torch.float32
    assert agent.accept_prob(h.view(4, 4, D)).shape == (4, 4)
    with pytest.raises(ValueError, match="hidden size 32"):
        agent.accept_prob(torch.zeros(2, D + 1))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip(tmp_path, suffix):
    agent = random_agent(D, seed=3, accept_bias=0.5)
    path = save_agent(agent, tmp_path / f"agent{suffix}")
    loaded = load_agent(path, expected_hidden_size=D)
    assert isinstance(loaded, MaraAgent) and not loaded.training
    for k, v in agent.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    h = _states(8)
    assert torch.equal(loaded.accept_prob(h), agent.accept_prob(h))


def test_released_pth_and_trainer_actor_load(tmp_path):
    sd = _released_state_dict()
    torch.save(sd, tmp_path / "actor_18000.pth")
    agent = load_agent(tmp_path / "actor_18000.pth", expected_hidden_size=D)
    assert agent.hidden_size == D and agent.widths == (1024, 256)
    assert torch.equal(agent.linear1.weight, sd["linear1.weight"])

    from vllm_align.train import MaraActor

    actor = MaraActor(D)
    save_agent(actor, tmp_path / "trained.safetensors")
    loaded = load_agent(tmp_path / "trained.safetensors")
    h = _states(4)
    torch.testing.assert_close(loaded.accept_prob(h), torch.softmax(actor(h), -1)[:, 1])


@pytest.mark.parametrize("wrap", ["state_dict", "model", "actor", "module."])
def test_wrapped_checkpoints(tmp_path, wrap):
    sd = _released_state_dict()
    obj = ({f"module.{k}": v for k, v in sd.items()} if wrap == "module."
           else {wrap: sd, "episode": 12, "log_alpha": torch.tensor(-1.0)})
    torch.save(obj, tmp_path / "ckpt.pth")
    agent = load_agent(tmp_path / "ckpt.pth")
    assert torch.equal(agent.output_linear.bias, sd["output_linear.bias"])


def test_half_precision_checkpoint_is_loaded_as_float32(tmp_path):
    sd = {k: v.half() for k, v in _released_state_dict().items()}
    torch.save(sd, tmp_path / "half.pth")
    agent = load_agent(tmp_path / "half.pth")
    assert agent.ln.weight.dtype == torch.float32


class _Payload:
    """Unpickling this would create a marker file (stands for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    sd = _released_state_dict()
    sd["payload"] = _Payload(marker)
    torch.save(sd, tmp_path / "evil.pth")
    message = _error(tmp_path / "evil.pth")
    assert "weights_only" in message and "will not be unpickled" in message
    assert not marker.exists()


def test_width_mismatch_names_both_numbers(tmp_path):
    path = save_agent(random_agent(4096, seed=0), tmp_path / "agent.pth")
    with pytest.raises(AgentWidthError) as info:
        load_agent(path, expected_hidden_size=256)
    assert str(info.value) == (f"MARA agent {path} takes hidden size 4096 but the served "
                               "model's hidden size is 256")
    assert isinstance(info.value, AlignConfigError) and isinstance(info.value, ValueError)


def test_missing_and_extra_keys(tmp_path):
    sd = _released_state_dict()
    del sd["output_linear.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    assert "missing ['output_linear.bias']" in _error(tmp_path / "missing.pth")

    sd = _released_state_dict()
    sd["linear3.weight"] = torch.zeros(2, 2)
    torch.save(sd, tmp_path / "extra.pth")
    assert "unexpected ['linear3.weight']" in _error(tmp_path / "extra.pth")

    # A critic checkpoint of the released code is not an agent.
    torch.save({"ln.weight": torch.ones(D), "ln.bias": torch.zeros(D),
                "linear11.weight": torch.zeros(1024, D)}, tmp_path / "critic.pth")
    message = _error(tmp_path / "critic.pth")
    assert "missing" in message and "unexpected ['linear11.weight']" in message


@pytest.mark.parametrize("key,value,needle", [
    ("linear1.weight", torch.zeros(1024, D + 1), "'linear1.weight' has shape [1024, 33], "
                                                 "expected [1024, 32]"),
    ("output_linear.weight", torch.zeros(3, 256), "'output_linear.weight' has shape [3, 256]"),
    ("linear2.bias", torch.zeros(255), "'linear2.bias' has shape [255], expected [256]"),
    ("ln.weight", torch.zeros(D, 1), "'ln.weight' must be 1-D"),
    ("ln.bias", 3, "'ln.bias' must be a floating-point tensor, got int"),
    ("linear1.bias", torch.zeros(1024, dtype=torch.long), "floating-point tensor, got torch.int64"),
    ("linear2.weight", torch.full((256, 1024), math.nan), "NaN or infinite"),
])
def test_bad_values(tmp_path, key, value, needle):
    sd = _released_state_dict()
    sd[key] = value
    torch.save(sd, tmp_path / "bad.pth")
    assert needle in _error(tmp_path / "bad.pth")


def test_unreadable_files(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    assert "not a readable torch checkpoint" in _error(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    assert "not a readable safetensors file" in _error(tmp_path / "junk.safetensors")
    torch.save(torch.zeros(3), tmp_path / "alpha_18000.pth")  # the released log-alpha file
    assert "holds a Tensor, not a state dict" in _error(tmp_path / "alpha_18000.pth")


def test_save_refuses_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="agent.ckpt"):
        save_agent(random_agent(D), tmp_path / "agent.ckpt")


def test_random_agent_is_seeded_and_biased():
    torch.manual_seed(123)
    before = torch.rand(1)
    a, b = random_agent(D, seed=5), random_agent(D, seed=5)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # global RNG untouched
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v)
    h = _states(2000, seed=1)
    rate = {bias: float((random_agent(D, seed=5, accept_bias=bias).accept_prob(h) > 0.5)
                        .float().mean()) for bias in (-4.0, 0.0, 4.0)}
    assert rate[-4.0] < rate[0.0] < rate[4.0]
    assert 0.2 < rate[0.0] < 0.8  # decisions depend on the state
    # Few decisions are near-ties at 0.5.
    p = random_agent(D, seed=5).accept_prob(h)
    assert float(((p - 0.5).abs() < 0.01).float().mean()) < 0.05

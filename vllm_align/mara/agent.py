"""The MARA accept/reject agent and its checkpoints (no vLLM imports).

The network is the one of MARA's released checkpoints::

    p = softmax(output_linear(relu(linear2(relu(linear1(ln(h)))))))    # [N, 2]

with ``ln = LayerNorm(d)``, ``linear1 = Linear(d, 1024)``,
``linear2 = Linear(1024, 256)``, ``output_linear = Linear(256, 2)``; ``d`` is
the LLM's hidden size and ``h`` the LLM's final hidden state (after its final
norm) at a candidate's position. Output index 1 is "accept", index 0
"reject". A state dict of this module has exactly the released keys ``ln.*``,
``linear1.*``, ``linear2.*`` and ``output_linear.*``, so a checkpoint saved by
the released code, by ``vllm_align.train`` (its actor) or by ``save_agent``
loads here, and the other way round.

Checkpoints are read without running code: ``.safetensors`` through
safetensors, anything else through ``torch.load(..., weights_only=True)``,
which refuses a pickle that names any global besides tensors and plain
containers. Every failure is a ``MaraAgentError`` (an ``AlignConfigError``,
hence a ``ValueError``) with a one-line message naming the file.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn

from vllm_align.checks import AlignConfigError

PathLike = Union[str, os.PathLike]

ACCEPT, REJECT = 1, 0  # output columns
NUM_ACTIONS = 2
WIDTHS = (1024, 256)  # the released trunk: Linear(d, 1024), Linear(1024, 256)
LAYERS = ("ln", "linear1", "linear2", "output_linear")
STATE_KEYS = tuple(f"{layer}.{p}" for layer in LAYERS for p in ("weight", "bias"))
# Keys under which a training checkpoint may wrap the agent's state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "actor", "actor_net",
                 "actor_state_dict", "agent")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


class MaraAgentError(AlignConfigError):
    """A MARA agent checkpoint that cannot be used (missing, unsafe, malformed)."""


class AgentWidthError(MaraAgentError):
    """The agent's input width is not the served LLM's hidden size."""


class MaraAgent(nn.Module):
    """``LayerNorm(d) → Linear(d,1024) → ReLU → Linear(1024,256) → ReLU → Linear(256,2) → softmax``.

    Args:
        hidden_size: d, the LLM's hidden size (the agent's input width).
        widths: the two trunk widths; the released checkpoints use (1024, 256).
            ``load_agent`` reads them from the checkpoint.
    """

    def __init__(self, hidden_size: int, widths: tuple[int, int] = WIDTHS) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("widths[0]", widths[0]),
                            ("widths[1]", widths[1])):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MaraAgent {name} must be a positive int, got {value!r}")
        self.ln = nn.LayerNorm(hidden_size)
        self.linear1 = nn.Linear(hidden_size, widths[0])
        self.linear2 = nn.Linear(widths[0], widths[1])
        self.output_linear = nn.Linear(widths[1], NUM_ACTIONS)

    @property
    def hidden_size(self) -> int:
        return self.ln.normalized_shape[0]

    @property
    def widths(self) -> tuple[int, int]:
        return self.linear1.out_features, self.linear2.out_features

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] hidden states → [..., 2] (reject, accept) logits."""
        x = F.relu(self.linear1(self.ln(hidden)))
        x = F.relu(self.linear2(x))
        return self.output_linear(x)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] → [..., 2] probabilities of (reject, accept), as the released actor."""
        return torch.softmax(self.logits(hidden), dim=-1)

    @torch.no_grad()
    def decision_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] hidden states → [..., 2] float32 (reject, accept) logits, checked.

        The hidden states may come in the LLM's dtype (bf16/fp16); they are
        cast to float32 and the agent runs in float32, as the released code
        does (it rebuilds the state as a float32 tensor).
        """
        if self.ln.weight.dtype != torch.float32:
            raise TypeError(f"MaraAgent must stay float32, its weights are {self.ln.weight.dtype}")
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"MaraAgent takes hidden size {self.hidden_size}, "
                             f"got states of shape {tuple(hidden.shape)}")
        # Through ``logits``, not ``forward``: subclasses (the SAC actor) return logits there.
        return self.logits(hidden.to(device=self.ln.weight.device, dtype=torch.float32))

    def accept_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(accept) = ``softmax(decision_logits)[..., 1]``: [..., d] → [...] float32."""
        return torch.softmax(self.decision_logits(hidden), dim=-1)[..., ACCEPT]


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

def _one_line(error: BaseException) -> str:
    """The informative line of an exception (torch's weights_only error spans many)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[0].split(". ")[0] if lines else "refused"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _read(path: Path) -> Any:
    """Raw checkpoint contents, never through an unrestricted unpickler."""
    if not path.is_file():
        raise MaraAgentError(f"MARA agent {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError is not exported under a stable name
            raise MaraAgentError(f"MARA agent {path} is not a readable safetensors file "
                                 f"({_one_line(e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise MaraAgentError(f"MARA agent {path} is not a readable torch checkpoint "
                                 f"(weights_only unpickler: {_one_line(e)})") from None
        raise MaraAgentError(
            f"MARA agent {path} holds more than tensors and will not be unpickled "
            f"(weights_only=True refused it: {_one_line(e)}); save the agent's "
            "state_dict() or use .safetensors") from None
    except Exception as e:  # a corrupt zip, a truncated file, ...
        raise MaraAgentError(f"MARA agent {path} is not a readable torch checkpoint "
                             f"({_one_line(e)})") from None


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    """The agent's state dict inside ``obj`` (itself, or one wrapper level down)."""
    if not isinstance(obj, Mapping):
        raise MaraAgentError(f"MARA agent {path} holds a {type(obj).__name__}, not a state dict "
                             f"with keys {list(STATE_KEYS)}")
    if "ln.weight" not in obj:
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}  # saved from DataParallel
    return obj


def _short(keys: list) -> str:
    keys = sorted(keys, key=repr)
    return repr(keys) if len(keys) <= 6 else f"{keys[:6]!r} and {len(keys) - 6} more"


def _validate(state: Mapping[str, Any], path: Path) -> tuple[int, tuple[int, int]]:
    """Check keys, types and shapes; return (d, widths)."""
    missing = [k for k in STATE_KEYS if k not in state]
    extra = [k for k in state if k not in STATE_KEYS]
    if missing or extra:
        parts = ([f"missing {_short(missing)}"] if missing else []) + \
                ([f"unexpected {_short(extra)}"] if extra else [])
        raise MaraAgentError(f"MARA agent {path} is not a MARA agent state dict: "
                             f"{'; '.join(parts)} (expected exactly {list(STATE_KEYS)})")
    for key in STATE_KEYS:
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise MaraAgentError(f"MARA agent {path}: {key!r} must be a floating-point "
                                 f"tensor, got {kind}")
    ln = state["ln.weight"]
    if ln.dim() != 1:
        raise MaraAgentError(f"MARA agent {path}: 'ln.weight' must be 1-D [d], "
                             f"got shape {tuple(ln.shape)}")
    d = ln.shape[0]
    w1 = state["linear1.weight"].shape[0] if state["linear1.weight"].dim() == 2 else -1
    w2 = state["linear2.weight"].shape[0] if state["linear2.weight"].dim() == 2 else -1
    expected = {
        "ln.weight": (d,), "ln.bias": (d,),
        "linear1.weight": (w1, d), "linear1.bias": (w1,),
        "linear2.weight": (w2, w1), "linear2.bias": (w2,),
        "output_linear.weight": (NUM_ACTIONS, w2), "output_linear.bias": (NUM_ACTIONS,),
    }
    for key, shape in expected.items():
        got = tuple(state[key].shape)
        if got != shape or min(shape) < 1:
            raise MaraAgentError(
                f"MARA agent {path}: {key!r} has shape {list(got)}, expected {list(shape)} "
                f"for LayerNorm({d}) → Linear({d},{w1}) → Linear({w1},{w2}) → "
                f"Linear({w2},{NUM_ACTIONS})")
        if not bool(torch.isfinite(state[key]).all()):
            raise MaraAgentError(f"MARA agent {path}: {key!r} holds NaN or infinite values")
    return d, (w1, w2)


def load_agent(path: PathLike, *, expected_hidden_size: int | None = None) -> MaraAgent:
    """Load a MARA agent from a released-format ``.pth`` or a ``.safetensors`` file.

    Args:
        path: a state dict with keys ``ln.*``, ``linear1.*``, ``linear2.*``,
            ``output_linear.*`` (or a checkpoint dict wrapping one under
            "state_dict", "model", "actor", ...). Files not named
            ``*.safetensors`` are read with ``torch.load(weights_only=True)``.
        expected_hidden_size: the served LLM's hidden size; when given, an
            agent of another input width is refused (``AgentWidthError``).
    Returns:
        A float32 ``MaraAgent`` on the CPU in eval mode, with the trunk widths
        found in the file (1024 and 256 for the released agents).
    Raises:
        MaraAgentError: one line naming the file and the problem.
    """
    path = Path(path)
    state = _unwrap(_read(path), path)
    d, widths = _validate(state, path)
    if expected_hidden_size is not None and d != expected_hidden_size:
        raise AgentWidthError(
            f"MARA agent {path} takes hidden size {d} but the served model's hidden size "
            f"is {expected_hidden_size}")
    agent = MaraAgent(d, widths)
    agent.load_state_dict({k: state[k].to(torch.float32) for k in STATE_KEYS}, strict=True)
    return agent.eval().requires_grad_(False)


def save_agent(agent: nn.Module, path: PathLike) -> Path:
    """Write ``agent.state_dict()`` as ``.safetensors`` or (``.pth``/``.pt``/``.bin``) torch.save.

    Any module with the agent's layer names works (``MaraAgent``, the
    trainer's actor). Returns the path written.
    """
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in agent.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif path.suffix in _TORCH_SUFFIXES:
        torch.save(state, path)
    else:
        raise ValueError(f"cannot save a MARA agent as {path.name!r}: use a .safetensors "
                         f"or {'/'.join(_TORCH_SUFFIXES)} file name")
    return path

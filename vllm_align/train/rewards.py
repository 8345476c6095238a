"""Sequence-level reward and cost sources for the MARA trainer.

A *scorer* maps a batch of (prompt, response) pairs to one float each::

    scorer(prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]

Two kinds, both built by ``load_scorer``:

* ``CallableScorer``: any Python callable ``fn(prompt: str, response: str) -> float``
  (``prompt`` is ``Prompt.text``: the ``prompt`` string, or the rendered chat
  prompt for chat records); spec ``"module:function"`` or ``"file.py:function"``,
  or the callable itself.
* ``HFScoreModel``: a Hugging Face sequence-classification checkpoint with a
  one-output score head (``num_labels == 1``), e.g. a reward or a cost model;
  spec: its directory. Scored in batches, float32 by default.

The terminal reward of an episode is ``α_r·R(x, y) − α_c·C(x, y)``
(``TerminalReward``); R or C may be absent (0).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union

from vllm_align.train.prompts import Prompt

ScorerSpec = Union[str, os.PathLike, Callable[..., Any], None]


class RewardSourceError(ValueError):
    """A reward/cost source that cannot be loaded or returned a bad score."""


class Scorer(Protocol):
    name: str

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]: ...


def _finite(value: Any, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RewardSourceError(f"{who} returned {value!r}; a score must be a finite number")
    return float(value)


class CallableScorer:
    """Wraps ``fn(prompt: str, response: str) -> float`` (called once per pair)."""

    def __init__(self, fn: Callable[[str, str], float], name: Optional[str] = None) -> None:
        if not callable(fn):
            raise RewardSourceError(f"reward source {fn!r} is not callable")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return [_finite(self.fn(p.text, r), f"reward function {self.name}")
                for p, r in zip(prompts, responses)]


class HFScoreModel:
    """A Hugging Face sequence-classification model with a scalar score head.

    Input text: with a chat template, ``messages + [{"role": "assistant",
    "content": response}]`` rendered by it (``messages`` = the chat record's
    turns, or one user turn holding the prompt); without one, ``prompt + response``.
    Rows are right-padded in batches of ``batch_size`` and truncated to the
    model's context. Returns ``logits[:, 0]`` of each row.
    """

    def __init__(self, path: Union[str, os.PathLike], *, batch_size: int = 16,
                 device: str = "cpu", dtype: str = "float32") -> None:
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.name = str(path)
        try:
            config = AutoConfig.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001 - one line naming the path
            raise RewardSourceError(f"reward model {path}: not a loadable Hugging Face "
                                    f"checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})"
                                    ) from None
        if getattr(config, "num_labels", None) != 1:
            raise RewardSourceError(
                f"reward model {path} has {getattr(config, 'num_labels', None)} output labels; "
                "a reward/cost model needs a score head with exactly 1 (num_labels=1)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        from vllm_align.train.rollout import quiet_load

        self.model = quiet_load(AutoModelForSequenceClassification.from_pretrained, str(path),
                                dtype=getattr(torch, dtype)).to(device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # HF finds the last token through it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.batch_size = batch_size
        self.device = device
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = int(limit) if limit else None

    def format(self, prompt: Prompt, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            turns = list(prompt.messages) if prompt.messages else \
                [{"role": "user", "content": prompt.text}]
            return self.tokenizer.apply_chat_template(
                turns + [{"role": "assistant", "content": response}], tokenize=False)
        return prompt.text + response

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        import torch

        texts = [self.format(p, r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True,
                                 truncation=self.max_length is not None,
                                 max_length=self.max_length, add_special_tokens=False)
            with torch.no_grad():
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
            scores += [_finite(v, f"reward model {self.name}") for v in logits[:, 0].float().tolist()]
        return scores


def _import_callable(spec: str) -> Callable[..., Any]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise RewardSourceError(f"reward source {spec!r}: expected MODULE:FUNCTION or "
                                "FILE.py:FUNCTION")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardSourceError(f"reward source {spec!r}: no such file {target}")
        mod_spec = importlib.util.spec_from_file_location(f"_vllm_align_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardSourceError(f"reward source {spec!r}: cannot import {target!r} ({e})"
                                    ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardSourceError(f"reward source {spec!r}: {target} has no callable {attr!r}")
    return fn


def load_scorer(spec: ScorerSpec, *, batch_size: int = 16, device: str = "cpu",
                dtype: str = "float32") -> Optional[Scorer]:
    """A scorer from a spec: None → None; a callable; a model directory; ``MODULE:FN``; ``FILE.py:FN``."""
    if spec is None:
        return None
    if callable(spec):
        return CallableScorer(spec)
    text = os.fspath(spec)
    if os.path.isdir(text):
        return HFScoreModel(text, batch_size=batch_size, device=device, dtype=dtype)
    if ":" in text and not os.path.exists(text):
        return CallableScorer(_import_callable(text), name=text)
    raise RewardSourceError(
        f"reward source {text!r} is neither a Hugging Face model directory nor "
        "MODULE:FUNCTION / FILE.py:FUNCTION naming fn(prompt, response) -> float")


@dataclass
class TerminalReward:
    """``α_r·R(x, y) − α_c·C(x, y)`` for a batch; an absent scorer counts as 0."""

    reward: Optional[Scorer]
    cost: Optional[Scorer]
    alpha_r: float = 1.0
    alpha_c: float = 1.0

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]
                 ) -> tuple[list[float], list[float], list[float]]:
        """Returns (R, C, terminal), one float each per pair."""
        n = len(responses)
        r = self.reward(prompts, responses) if self.reward is not None else [0.0] * n
        c = self.cost(prompts, responses) if self.cost is not None else [0.0] * n
        if len(r) != n or len(c) != n:
            raise RewardSourceError(f"a reward source returned {len(r)}/{len(c)} scores for "
                                    f"{n} responses")
        return r, c, [self.alpha_r * a - self.alpha_c * b for a, b in zip(r, c)]

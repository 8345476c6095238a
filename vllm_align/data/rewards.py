"""Reward (or cost) sources by name: ``load_reward(spec)`` -> a batched scorer.

The one scorer of sweep, eval and train-mara. A scorer maps
``(prompts, responses)`` (two equal-length lists) to one float per pair. A
prompt is the text the generator saw (``str``), or a ``data.prompts.Prompt``
(its ``text``, and its chat ``messages`` for chat records). ``spec`` is one of:

* ``module.path:function`` or ``path/to/file.py:function``: a Python callable
  ``function(prompt: str, response: str) -> float``, called once per pair with
  the prompt's text (chat-rendered for ``messages``);
* anything else: a Hugging Face sequence-classification checkpoint (a local
  directory or a hub name) with one output (``num_labels=1``). The reward of a
  pair is that output, the score head's logit, on one text (``reward_text``):

  - the reward model's tokenizer has a chat template (as reward models are
    trained): the conversation ``turns + [{"role": "assistant", "content":
    response}]`` rendered by it, where ``turns`` are the prompt's chat
    ``messages``, or one user turn holding the prompt's text;
  - it has none: ``prompt + response`` (the response continues the prompt
    exactly as the generator saw it).

  The tokenizer's special tokens are added unless the text already starts
  with its BOS (a template writes its own). Texts are scored in batches of
  ``batch_size`` in torch, right-padded, and truncated from the left to the
  model's length limit (a leading BOS is kept), so the end of a long response,
  where the score is read, is always scored. A tokenizer without a pad token is
  scored one text at a time.

The same scorer serves rewards and costs (a cost model is just a scorer whose
lower values are better; the trainer's terminal reward is
``alpha_r * R - alpha_c * C``, ``train/terminal.py``). A ``file.py`` spec is
imported once per process, whichever tool names it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

from vllm_align.data.prompts import DataError

# The --reward / --cost forms, for every tool that takes them.
REWARD_HELP = ("a sequence-classification checkpoint (path or hub name, one output; it "
                "scores the conversation its chat template renders, else prompt+response) or "
                "a Python 'module:function' / 'path/to/file.py:function' with signature "
                "f(prompt, response) -> float")

RewardFn = Callable[[Sequence[Any], Sequence[str]], list[float]]
PromptLike = Union[str, Any]   # a str, or an object with .text and .messages (data.prompts.Prompt)


class RewardError(DataError):
    """A reward spec that cannot be loaded, or a scorer that returned a non-number."""


def is_callable_spec(spec: str) -> bool:
    """``module:function`` / ``file.py:function`` (a ``:`` and no existing directory)."""
    return ":" in spec and not os.path.isdir(spec)


def _finite(value: Any, where: str) -> float:
    # numbers.Real takes Python and NumPy scalars; bools and tensors are refused.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardError(f"{where} returned {value!r:.80}; a reward must be a real number "
                          f"(float)")
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(f"{where} returned {value!r}; a reward must be finite")
    return value


def _check_pairs(prompts: Sequence[PromptLike], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")


def _text(prompt: PromptLike) -> str:
    return prompt if isinstance(prompt, str) else prompt.text


def _turns(prompt: PromptLike) -> list[Mapping[str, str]]:
    """The prompt as chat turns: its ``messages``, or one user turn holding its text."""
    messages = None if isinstance(prompt, str) else prompt.messages
    return [dict(m) for m in messages] if messages else [{"role": "user", "content": _text(prompt)}]


class CallableReward:
    """A Python ``reward(prompt, response) -> float`` applied pair by pair."""

    def __init__(self, spec: str | Callable[[str, str], float]):
        if callable(spec):
            self.spec, self.fn = getattr(spec, "__qualname__", repr(spec)), spec
            return
        self.spec = spec
        target, _, name = spec.rpartition(":")
        if not target or not name.isidentifier():
            raise RewardError(f"reward {spec!r}: expected 'module:function' or "
                              f"'path/to/file.py:function'")
        module = _import_target(target, spec)
        fn = getattr(module, name, None)
        if not callable(fn):
            raise RewardError(f"reward {spec!r}: {target!r} has no callable named {name!r}")
        self.fn = fn

    def __call__(self, prompts: Sequence[PromptLike], responses: Sequence[str]) -> list[float]:
        _check_pairs(prompts, responses)
        return [_finite(self.fn(_text(p), r), f"reward {self.spec}")
                for p, r in zip(prompts, responses)]

    def __repr__(self) -> str:
        return f"CallableReward({self.spec!r})"


def _import_target(target: str, spec: str):
    """Import ``target``: a ``.py`` file path or a dotted module name."""
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"reward {spec!r}: no such Python file {target!r}")
        # One module per resolved file, so two specs naming the same file share it.
        mod_name = f"_vllm_align_reward_{abs(hash(str(path.resolve())))}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise RewardError(f"reward {spec!r}: importing {target} failed: "
                              f"{type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise RewardError(f"reward {spec!r}: cannot import module {target!r} ({e})") from e


def _hf_config(path: str):
    """The checkpoint's config, checked to have a single-score head."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        kind = ("not a loadable Hugging Face checkpoint" if os.path.isdir(path) else
                "neither a Hugging Face model directory nor a hub model")
        raise RewardError(f"reward model {path!r} cannot be loaded: {kind} "
                          f"({type(e).__name__}: {str(e).strip().splitlines()[0]:.200})"
                          ) from None
    if config.num_labels != 1:
        raise RewardError(f"reward model {path!r} has {config.num_labels} output labels "
                          f": num_labels={config.num_labels}; a reward model needs a single "
                          f"score (num_labels=1)")
    return config


class HFReward:
    """A sequence-classification model's single score on ``reward_text`` (module doc).

    Shapes: a batch of B texts is tokenized to ``input_ids [B, T]`` (right
    padding, ``attention_mask [B, T]``); the model returns ``logits [B, 1]``,
    pooled by transformers at each row's last non-pad token; the reward is
    ``logits[:, 0]`` in float32.
    """

    def __init__(self, path: str, *, batch_size: int = 16, device: str | None = None,
                 dtype: str = "float32", max_length: int | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise RewardError(f"reward batch size must be >= 1, got {batch_size}")
        self.spec = path
        config = _hf_config(path)
        try:
            torch_dtype = getattr(torch, dtype)
        except AttributeError:
            raise RewardError(f"unknown dtype {dtype!r}; e.g. float32, bfloat16") from None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"   # keep the response's end
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch_dtype).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise RewardError(f"reward model {path!r} cannot be loaded: {e}") from None
        pad = self.tokenizer.pad_token_id
        if pad is None:
            # Without a pad token the model cannot find each row's last token
            # in a padded batch; one text at a time needs no padding.
            self.batch_size = 1
        else:
            self.batch_size = batch_size
            # The model pools at the last token that is not its pad id: make
            # that the id we pad with.
            self.model.config.pad_token_id = pad
        limits = [n for n in (max_length, getattr(config, "max_position_embeddings", None),
                              self.tokenizer.model_max_length) if n and n < 10**9]
        self.max_length = min(limits) if limits else None
        self._bos = self.tokenizer.bos_token

    def reward_text(self, prompt: PromptLike, response: str) -> str:
        """The text scored for one pair: the conversation rendered by the reward
        model's chat template if it has one, else ``prompt + response``."""
        if getattr(self.tokenizer, "chat_template", None):
            from vllm_align.data.prompts import chat_text

            return chat_text(self.tokenizer, _turns(prompt) + [
                {"role": "assistant", "content": response}], generation_prompt=False)
        return _text(prompt) + response

    def __call__(self, prompts: Sequence[PromptLike], responses: Sequence[str]) -> list[float]:
        _check_pairs(prompts, responses)
        texts = [self.reward_text(p, r) for p, r in zip(prompts, responses)]
        # A text rendered by a chat template already starts with BOS: adding
        # the tokenizer's special tokens again would double it. Texts with and
        # without it go in separate batches.
        add = [not (self._bos and t.startswith(self._bos)) for t in texts]
        scores = [0.0] * len(texts)
        for flag in (True, False):
            # Similar lengths together: less padding to run through the model.
            rows = sorted((i for i, a in enumerate(add) if a == flag),
                          key=lambda i: len(texts[i]))
            for start in range(0, len(rows), self.batch_size):
                part = rows[start:start + self.batch_size]
                got = self._score([texts[i] for i in part], add_special_tokens=flag)
                for i, value in zip(part, got):
                    scores[i] = value
        return scores

    def _score(self, texts: list[str], *, add_special_tokens: bool) -> list[float]:
        import torch

        enc = self.tokenizer(texts, return_tensors="pt", padding=len(texts) > 1,
                             truncation=self.max_length is not None,
                             max_length=self.max_length, add_special_tokens=add_special_tokens)
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            logits = self.model(**enc).logits          # [B, 1]
        out = logits[:, 0].float().cpu().tolist()
        return [_finite(v, f"reward model {self.spec}") for v in out]

    def __repr__(self) -> str:
        return f"HFReward({self.spec!r})"


def load_reward(spec: str | os.PathLike | Callable[[str, str], float], *, batch_size: int = 16,
                device: str | None = None, dtype: str = "float32",
                max_length: int | None = None) -> RewardFn:
    """A batched scorer ``(prompts, responses) -> list[float]`` for ``spec``.

    Args:
        spec: ``module:function``, ``path/to/file.py:function`` or the function
            itself (a Python ``reward(prompt, response) -> float``), or a
            sequence-classification checkpoint path / hub name (single-score head).
        batch_size, device, dtype, max_length: for checkpoints only; ``device``
            defaults to CUDA when available, else CPU.
    Raises:
        RewardError: naming the spec and what is wrong with it.
    """
    if callable(spec):
        return CallableReward(spec)
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward spec must be a non-empty string, got {spec!r}")
    if is_callable_spec(spec):
        return CallableReward(spec)
    return HFReward(spec, batch_size=batch_size, device=device, dtype=dtype,
                    max_length=max_length)


def check_reward(spec: str) -> None:
    """Fail fast on a bad spec without loading weights: imports a callable, or
    reads a checkpoint's config and checks its head (``num_labels == 1``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward spec must be a non-empty string, got {spec!r}")
    if is_callable_spec(spec):
        CallableReward(spec)
    else:
        _hf_config(spec)

"""Prompt sets and the one chat renderer, for every tool (generate-pairs, sweep,
train-mara) and the toy world; the trainer's prompt order (``PromptSampler``).

Sources (``read_prompts``):

* JSONL, one object per line with ``prompt`` (a string) or chat ``messages``
  (a non-empty list of ``{"role", "content"}`` strings), and optionally an
  ``id`` (string or integer; default: the record's 0-based position). Blank
  lines are skipped; a ``null`` field counts as absent.
* a directory written by ``datasets.Dataset.save_to_disk`` with a ``prompt`` or
  ``messages`` column (read with ``datasets.load_from_disk`` when that package
  is installed; it is not a dependency);
* an in-memory list of strings (prompts) or such records.

Rendering, as vLLM does it (``encode_prompt``, ``render_prompt``): a ``prompt``
string is tokenized with the tokenizer's special tokens (BOS); ``messages`` are
rendered with the chat template and its generation prompt (``chat_text``), then
tokenized without special tokens (the template writes its own).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

PathLike = Union[str, os.PathLike]
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class DataError(ValueError):
    """Bad input file, flag or output file for a data tool; the message names it."""


@dataclass
class PromptItem:
    """One prompt record as read (not yet rendered)."""

    index: int          # 0-based position among the records (per-prompt seeds use it)
    id: str | int
    prompt: str | None = None
    messages: list | None = None


@dataclass(frozen=True)
class Prompt:
    """One rendered prompt.

    Attributes:
        id: the record's ``id`` (or its index).
        text: the ``prompt`` string, or for chat records the rendered chat
            prompt (what the LLM reads); reward callables get this.
        token_ids: what the LLM is fed before the response (empty when only
            the text is needed, e.g. for scoring).
        messages: the chat turns for chat records (reward models with a chat
            template frame ``messages + [assistant response]``), else None.
    """

    id: Union[str, int]
    text: str
    token_ids: tuple[int, ...] = ()
    messages: Union[tuple[Mapping[str, str], ...], None] = None


def json_objects(path: PathLike):
    """(``"file:line"``, object) for each non-blank line of a JSONL file of objects."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {obj!r:.80}")
            yield where, obj


def valid_messages(msgs: Any, where: str) -> list[dict]:
    """``msgs`` checked to be chat turns (a non-empty list of ``{role, content}`` strings)."""
    if not isinstance(msgs, (list, tuple)) or not msgs or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in msgs):
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        f"{{role, content}} strings, got {msgs!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _items(rows: Iterable[tuple[str, Any]]) -> list[PromptItem]:
    """Validate ``(where, row)`` pairs into items; errors name ``where``."""
    items: list[PromptItem] = []
    seen: set = set()
    for where, row in rows:
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected an object, got {row!r:.80}")
        index = len(items)
        pid = row.get("id")
        pid = index if pid is None else pid
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise DataError(f"{where}: 'id' must be a string or an integer, got {pid!r}")
        if pid in seen:
            raise DataError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        if row.get("prompt") is not None:
            if not isinstance(row["prompt"], str):
                raise DataError(f"{where}: 'prompt' must be a string, got {row['prompt']!r:.80}")
            items.append(PromptItem(index, pid, prompt=row["prompt"]))
        elif row.get("messages") is not None:
            items.append(PromptItem(index, pid, messages=valid_messages(row["messages"], where)))
        else:
            raise DataError(f"{where}: needs 'prompt' (string) or 'messages' (chat list)")
    return items


def _datasets_rows(path: Path):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a `datasets` directory (save_to_disk); reading it needs the `datasets` "
            "package, which is not installed: `pip install datasets`, or export the prompts "
            "to JSONL (one {\"prompt\": ...} or {\"messages\": [...]} object per line)") from None
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        if "train" in data:
            data = data["train"]
        elif len(splits) == 1:
            data = data[splits[0]]
        else:
            raise DataError(f"{path} holds splits {splits} and none is 'train'; "
                            "save the one to train on alone")
    columns = set(data.column_names)
    if not columns & {"prompt", "messages"}:
        raise DataError(f"{path}: the dataset needs a 'prompt' or 'messages' column, "
                        f"has {sorted(columns)}")
    return ((f"{path} record {i}", row) for i, row in enumerate(data))


def read_prompts(source: Union[PathLike, Sequence[Any]]) -> list[PromptItem]:
    """Read and validate a prompt set (see the module doc); errors name the file and line."""
    if isinstance(source, (list, tuple)):
        return _items((f"prompt list record {i}", {"prompt": r} if isinstance(r, str) else r)
                      for i, r in enumerate(source))
    path = Path(source)
    if path.is_dir():
        if any((path / m).is_file() for m in _DATASETS_MARKERS):
            return _items(_datasets_rows(path))
        raise DataError(f"{path} is a directory but not a `datasets` save_to_disk "
                        f"directory (none of {list(_DATASETS_MARKERS)}); pass a JSONL file")
    if not path.is_file():
        raise DataError(f"prompt set {path}: no such file or directory")
    return _items(json_objects(path))


def chat_text(tokenizer, messages: Sequence[Mapping[str, str]], *,
              generation_prompt: bool = True) -> str:
    """``messages`` rendered by the tokenizer's chat template (the one chat renderer).

    ``generation_prompt``: end with the assistant header, as a prompt to
    continue (False for a complete conversation, e.g. to score it).
    """
    # A tokenizer without the attribute (not Hugging Face's) renders as it can.
    if not getattr(tokenizer, "chat_template", "n/a"):
        raise DataError("a chat prompt ('messages') needs a tokenizer with a chat template; "
                        f"{getattr(tokenizer, 'name_or_path', tokenizer)!s:.80} has none")
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def encode_prompt(tokenizer, item: PromptItem) -> Prompt:
    """The ``Prompt`` the LLM reads for ``item`` (see the module doc for special tokens)."""
    if item.messages is None:
        text = item.prompt
        ids = tokenizer(text).input_ids
        messages = None
    else:
        text = chat_text(tokenizer, item.messages)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        messages = tuple(dict(m) for m in item.messages)
    if not ids:
        raise DataError(f"prompt {item.id!r} encodes to no tokens")
    return Prompt(item.id, text, tuple(int(i) for i in ids), messages)


def load_prompts(source: Union[PathLike, Sequence[Any]], tokenizer) -> list[Prompt]:
    """``read_prompts`` then ``encode_prompt`` each; an empty set is an error."""
    items = read_prompts(source)
    if not items:
        raise DataError(f"{source if not isinstance(source, (list, tuple)) else 'prompt list'}"
                        ": no prompts")
    return [encode_prompt(tokenizer, it) for it in items]


def render_prompt(tokenizer, item: PromptItem) -> tuple[str, Any]:
    """(prompt text as the model sees it, the input to hand ``LLM.generate``).

    A plain ``prompt`` goes in as text (vLLM adds the tokenizer's special
    tokens, as ``encode_prompt`` does); chat ``messages`` go in as the token ids
    of ``encode_prompt``.
    """
    if item.messages is None:
        return item.prompt, item.prompt
    from vllm.inputs import TokensPrompt

    prompt = encode_prompt(tokenizer, item)
    return prompt.text, TokensPrompt(prompt_token_ids=list(prompt.token_ids))


class PromptSampler:
    """Epoch-wise shuffled prompt order, reproducible and resumable from (seed, position).

    Epoch ``e`` is a permutation drawn with seed ``seed + e``; ``position``
    counts prompts handed out so far, so the state is one integer.
    """

    def __init__(self, num_prompts: int, seed: int, position: int = 0) -> None:
        if num_prompts < 1:
            raise ValueError(f"PromptSampler needs at least one prompt, got {num_prompts}")
        self.num_prompts, self.seed, self.position = num_prompts, seed, position
        self._epoch, self._order = -1, []

    def _perm(self, epoch: int) -> list[int]:
        import torch

        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_prompts, generator=gen).tolist()

    def take(self, n: int) -> list[int]:
        """The next ``n`` prompt indices."""
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, self.num_prompts)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, self._perm(epoch)
            out.append(self._order[i])
            self.position += 1
        return out

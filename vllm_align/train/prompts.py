"""Prompt sets for the MARA trainer: JSONL files or ``datasets`` directories.

Records are one JSON object per line (the format of ``generate-pairs``): a
``prompt`` string or chat ``messages`` (a list of ``{role, content}``), and an
optional ``id`` (default: the record's index). A directory written by
``datasets.Dataset.save_to_disk`` with a ``prompt`` or ``messages`` column is
read with ``datasets.load_from_disk`` when that package is installed.

Encoding, as vLLM does it: a ``prompt`` string is tokenized with the
tokenizer's special tokens (BOS); ``messages`` are rendered with the chat
template and its generation prompt, then tokenized without special tokens
(the template adds its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

PathLike = Union[str, os.PathLike]
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class PromptSetError(ValueError):
    """A prompt set that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class Prompt:
    """One training prompt.

    Attributes:
        id: the record's ``id`` (or its index).
        text: the ``prompt`` string, or for chat records the rendered chat
            prompt (what the LLM reads); reward callables get this.
        token_ids: what the LLM is fed before the response.
        messages: the chat turns for chat records (HF reward models format
            ``messages + [assistant response]`` with their own template), else None.
    """

    id: Union[str, int]
    text: str
    token_ids: tuple[int, ...]
    messages: Union[tuple[Mapping[str, str], ...], None] = None


def _check_messages(msgs: Any, where: str) -> list[dict]:
    if not isinstance(msgs, (list, tuple)) or not msgs or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in msgs):
        raise PromptSetError(f"{where}: 'messages' must be a non-empty list of "
                             f"{{role, content}} strings, got {msgs!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def records_from_rows(rows: Iterable[Mapping[str, Any]], source: str) -> list[dict]:
    """Validate rows with ``prompt`` or ``messages`` → ``[{id, prompt | messages}]``."""
    out: list[dict] = []
    seen: set = set()
    for index, row in enumerate(rows):
        where = f"{source} record {index}"
        if not isinstance(row, Mapping):
            raise PromptSetError(f"{where}: expected an object, got {row!r:.80}")
        rid = row.get("id", index)
        if rid is None:
            rid = index
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise PromptSetError(f"{where}: 'id' must be a string or an integer, got {rid!r}")
        if rid in seen:
            raise PromptSetError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        if row.get("prompt") is not None:
            if not isinstance(row["prompt"], str):
                raise PromptSetError(f"{where}: 'prompt' must be a string, got "
                                     f"{row['prompt']!r:.80}")
            out.append({"id": rid, "prompt": row["prompt"]})
        elif row.get("messages") is not None:
            out.append({"id": rid, "messages": _check_messages(row["messages"], where)})
        else:
            raise PromptSetError(f"{where}: needs 'prompt' (string) or 'messages' (chat list)")
    if not out:
        raise PromptSetError(f"{source}: no prompts")
    return out


def _read_datasets_dir(path: Path) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise PromptSetError(
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
            raise PromptSetError(f"{path} holds splits {splits} and none is 'train'; "
                                 "save the one to train on alone")
    columns = set(data.column_names)
    if not columns & {"prompt", "messages"}:
        raise PromptSetError(f"{path}: the dataset needs a 'prompt' or 'messages' column, "
                             f"has {sorted(columns)}")
    return records_from_rows(iter(data), str(path))


def read_prompt_records(source: Union[PathLike, Sequence[Any]]) -> list[dict]:
    """Prompt records from a JSONL file, a ``datasets`` directory, or an in-memory list.

    A list may hold strings (prompts) or ``{prompt | messages, id?}`` mappings.
    Returns ``[{"id": ..., "prompt": str} | {"id": ..., "messages": [...]}]``.
    """
    if isinstance(source, (list, tuple)):
        rows = [{"prompt": r} if isinstance(r, str) else r for r in source]
        return records_from_rows(rows, "prompt list")
    path = Path(source)
    if path.is_dir():
        if any((path / m).is_file() for m in _DATASETS_MARKERS):
            return _read_datasets_dir(path)
        raise PromptSetError(f"{path} is a directory but not a `datasets` save_to_disk "
                             f"directory (none of {list(_DATASETS_MARKERS)}); pass a JSONL file")
    if not path.is_file():
        raise PromptSetError(f"prompt set {path}: no such file or directory")
    from vllm_align.data.pairs import read_prompts  # the generate-pairs JSONL reader

    try:
        items = read_prompts(path)
    except ValueError as e:
        raise PromptSetError(str(e)) from None
    rows = [{"id": it.id, "prompt": it.prompt} if it.prompt is not None
            else {"id": it.id, "messages": it.messages} for it in items]
    return records_from_rows(rows, str(path))


def encode_prompts(records: Sequence[Mapping[str, Any]], tokenizer) -> list[Prompt]:
    """Tokenize records as vLLM does (see the module doc)."""
    out = []
    for rec in records:
        if "messages" in rec:
            if not getattr(tokenizer, "chat_template", None):
                raise PromptSetError(f"prompt {rec['id']!r} is a chat ('messages') but the "
                                     "tokenizer has no chat template")
            text = tokenizer.apply_chat_template(list(rec["messages"]), tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            messages = tuple(dict(m) for m in rec["messages"])
        else:
            text = rec["prompt"]
            ids = tokenizer(text).input_ids
            messages = None
        if not ids:
            raise PromptSetError(f"prompt {rec['id']!r} encodes to no tokens")
        out.append(Prompt(rec["id"], text, tuple(int(i) for i in ids), messages))
    return out


def load_prompts(source: Union[PathLike, Sequence[Any]], tokenizer) -> list[Prompt]:
    """``read_prompt_records`` then ``encode_prompts``."""
    return encode_prompts(read_prompt_records(source), tokenizer)


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

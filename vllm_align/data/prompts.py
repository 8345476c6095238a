"""Prompt files shared by the data tools (generate-pairs, sweep).

Format: JSONL, one object per line with ``prompt`` (a string) or chat
``messages`` (a non-empty list of ``{"role", "content"}`` strings), and
optionally an ``id`` (string or integer; default: the record's 0-based
position). Blank lines are skipped. ``messages`` are rendered with the
tokenizer's chat template and its generation prompt (``render_prompt``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any


class DataError(ValueError):
    """Bad input file, flag or output file for a data tool; the message names it."""


@dataclass
class PromptItem:
    index: int          # 0-based position among the records (per-prompt seeds use it)
    id: str | int
    prompt: str | None = None
    messages: list | None = None


def json_objects(path: str | os.PathLike):
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


def read_prompts(path: str | os.PathLike) -> list[PromptItem]:
    """Read and validate a prompt JSONL file; errors name the file and line."""
    items: list[PromptItem] = []
    seen: set = set()
    for where, obj in json_objects(path):
        index = len(items)
        pid = obj.get("id", index)
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise DataError(f"{where}: 'id' must be a string or an integer, got {pid!r}")
        if pid in seen:
            raise DataError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        if "prompt" in obj:
            if not isinstance(obj["prompt"], str):
                raise DataError(f"{where}: 'prompt' must be a string, got {obj['prompt']!r:.80}")
            items.append(PromptItem(index, pid, prompt=obj["prompt"]))
        elif "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in msgs):
                raise DataError(f"{where}: 'messages' must be a non-empty list of "
                                f"{{role, content}} strings, got {msgs!r:.80}")
            items.append(PromptItem(index, pid, messages=msgs))
        else:
            raise DataError(f"{where}: needs 'prompt' (string) or 'messages' (chat list)")
    return items


def render_prompt(tokenizer, item: PromptItem) -> tuple[str, Any]:
    """(prompt text as the model sees it, the input to hand ``LLM.generate``).

    A plain ``prompt`` goes in as text (vLLM adds the tokenizer's special
    tokens). Chat ``messages`` are rendered with the chat template, which
    writes any special tokens (BOS) itself, so the rendered text is encoded
    without adding them again and handed over as token ids.
    """
    if item.messages is None:
        return item.prompt, item.prompt
    from vllm.inputs import TokensPrompt

    text = tokenizer.apply_chat_template(item.messages, tokenize=False,
                                         add_generation_prompt=True)
    return text, TokensPrompt(prompt_token_ids=tokenizer.encode(text, add_special_tokens=False))

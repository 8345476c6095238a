"""Pairwise comparison of two response files: ``vllm-align eval``.

Input: two JSONL files (A and B), one object per line with ``prompt`` (string),
a response field (``response`` by default; ``--a-field`` / ``--b-field`` pick
another, e.g. ``chosen`` and ``rejected`` of one generate-pairs file), and
optionally ``id`` and the chat ``messages`` behind the prompt (a reward model
with a chat template then frames those turns, as in ``sweep``). Records are matched by ``id`` when every record of both
files has one, otherwise by ``prompt``; the key must be unique within each
file, both files must hold the same keys, and records matched by ``id`` must
have the same prompt. ``vllm-align sweep --responses-dir`` and
``vllm-align generate-pairs`` write files in this format.

Both responses of a prompt are scored by a reward (higher is better) and, if
given, a cost (lower is better), each a ``vllm_align.data.rewards`` spec. The
statistics are ``vllm_align.data.metrics``: mean reward/cost per side, the AAD
paper's win rate of A over B on the reward, and, with a cost, the MARA paper's
preference rate of A over B.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vllm_align.data.metrics import mean_sem, preference_rate, win_rate
from vllm_align.data.prompts import DataError, Prompt, json_objects, valid_messages
from vllm_align.data.rewards import REWARD_HELP
from vllm_align.fields import option


@dataclass(frozen=True)
class EvalConfig:
    """``vllm-align eval``: its flags are these fields (``vllm_align.fields``)."""

    a: str = option(help="responses of system A (the one rated)", positional=True,
                    metavar="A.jsonl")
    b: str = option(help="responses of system B (the baseline)", positional=True,
                    metavar="B.jsonl")
    reward: str = option(help="higher is better: " + REWARD_HELP, metavar="SPEC")
    cost: str | None = option(None, "lower is better (same forms as --reward); enables the "
                              "preference rate", metavar="SPEC")
    a_field: str = option("response", "A's response field")
    b_field: str = option("response", "B's response field")
    json_out: str | None = option(None, "also write the report as JSON", flag="--json",
                                  metavar="OUT.json")
    batch_size: int = option(16, "texts per reward-model forward")

    def __post_init__(self) -> None:
        if not self.reward or not self.reward.strip():
            raise DataError("--reward is required: a sequence-classification model path or "
                            "'module:function' / 'file.py:function'")
        if self.cost is not None and not self.cost.strip():
            raise DataError("--cost is empty; leave it out or give a model path or "
                            "'module:function'")
        for flag, name in (("--a-field", self.a_field), ("--b-field", self.b_field)):
            if not name or name in ("id", "prompt"):
                raise DataError(f"{flag} must name the response field, got {name!r}")
        if self.batch_size < 1:
            raise DataError(f"--batch-size must be >= 1, got {self.batch_size}")
        if (self.a, self.a_field) == (self.b, self.b_field):
            raise DataError(f"A and B are the same responses ({self.a}, field "
                            f"{self.a_field!r}); compare two files or two fields")


@dataclass(frozen=True)
class Record:
    id: str | int | None
    prompt: str
    response: str
    messages: tuple | None = None   # the chat turns behind ``prompt``, when the file has them


def read_records(path: str | os.PathLike, field: str) -> list[Record]:
    """Records of a response file; errors name the file, line and field."""
    records = []
    for where, obj in json_objects(path):
        rid = obj.get("id")
        if isinstance(rid, bool) or not (rid is None or isinstance(rid, (str, int))):
            raise DataError(f"{where}: 'id' must be a string or an integer, got {rid!r}")
        for key in ("prompt", field):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{where}: needs a string {key!r}, got "
                                f"{obj.get(key)!r:.80}")
        msgs = obj.get("messages")
        msgs = None if msgs is None else tuple(valid_messages(msgs, where))
        records.append(Record(rid, obj["prompt"], obj[field], msgs))
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def match(a: Sequence[Record], b: Sequence[Record], a_name: str, b_name: str
          ) -> tuple[str, list[tuple[Record, Record]]]:
    """(key used, [(A record, B record)] in A's order); see the module docstring."""
    by = "id" if all(r.id is not None for r in (*a, *b)) else "prompt"

    def index(records: Sequence[Record], name: str) -> dict:
        out: dict = {}
        for r in records:
            key = r.id if by == "id" else r.prompt
            if key in out:
                raise DataError(f"{name}: {by} {key!r:.80} appears twice; records are matched "
                                f"by {by}")
            out[key] = r
        return out

    ia, ib = index(a, a_name), index(b, b_name)
    only_a, only_b = [k for k in ia if k not in ib], [k for k in ib if k not in ia]
    if only_a or only_b:
        raise DataError(f"{a_name} and {b_name} hold different prompts (matched by {by}): "
                        f"{len(only_a)} only in A (e.g. {only_a[:1]!r:.80}), {len(only_b)} only "
                        f"in B (e.g. {only_b[:1]!r:.80})")
    pairs = [(ia[k], ib[k]) for k in ia]
    if by == "id":
        for ra, rb in pairs:
            if ra.prompt != rb.prompt:
                raise DataError(f"id {ra.id!r} has different prompts in {a_name} and {b_name}: "
                                f"{ra.prompt!r:.60} vs {rb.prompt!r:.60}")
    return by, pairs


def compare(reward_a: Sequence[float], reward_b: Sequence[float],
            cost_a: Sequence[float] | None = None, cost_b: Sequence[float] | None = None
            ) -> dict[str, Any]:
    """The report's statistics from per-prompt scores (pure)."""
    def side(values: Sequence[float]) -> dict[str, float | None]:
        _, mean, sem = mean_sem(values)
        # No standard error from one prompt: null, not NaN (which is not JSON).
        return {"mean": mean, "stderr": sem if math.isfinite(sem) else None}

    report: dict[str, Any] = {
        "n": len(reward_a),
        "reward": {"a": side(reward_a), "b": side(reward_b)},
        "win_rate": win_rate(reward_a, reward_b).to_json(),
        "cost": None,
        "preference_rate": None,
    }
    if cost_a is not None and cost_b is not None:
        report["cost"] = {"a": side(cost_a), "b": side(cost_b)}
        report["preference_rate"] = preference_rate(reward_a, reward_b, cost_a, cost_b).to_json()
    return report


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Read, match, score and compare; writes ``cfg.json_out`` if set; returns the report."""
    from vllm_align.data.rewards import check_reward, load_reward

    check_reward(cfg.reward)
    if cfg.cost:
        check_reward(cfg.cost)
    by, pairs = match(read_records(cfg.a, cfg.a_field), read_records(cfg.b, cfg.b_field),
                      "A", "B")
    n = len(pairs)
    prompts = [Prompt(ra.id, ra.prompt, messages=ra.messages) for ra, _ in pairs] * 2
    responses = [ra.response for ra, _ in pairs] + [rb.response for _, rb in pairs]
    # One call per scorer over both sides, so a model batches A and B together.
    rewards = load_reward(cfg.reward, batch_size=cfg.batch_size)(prompts, responses)
    costs = None
    if cfg.cost:
        costs = load_reward(cfg.cost, batch_size=cfg.batch_size)(prompts, responses)
    report = compare(rewards[:n], rewards[n:], costs[:n] if costs else None,
                     costs[n:] if costs else None)
    report = {"a": {"file": str(cfg.a), "field": cfg.a_field},
              "b": {"file": str(cfg.b), "field": cfg.b_field},
              "matched_by": by, "reward_spec": cfg.reward, "cost_spec": cfg.cost, **report}
    if cfg.json_out:
        Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.json_out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    """The terminal table."""
    a, b = report["a"], report["b"]
    lines = [f"A: {a['file']} ({a['field']})",
             f"B: {b['file']} ({b['field']})",
             f"{report['n']} prompts, matched by {report['matched_by']}",
             "",
             f"{'':<34} {'A':>18} {'B':>18}"]
    for name in ("reward", "cost"):
        if report[name] is None:
            continue
        cells = [f"{s['mean']:>9.4f} ± " + ("-" if s["stderr"] is None else f"{s['stderr']:.4f}")
                 for s in (report[name]["a"], report[name]["b"])]
        lines.append(f"{'mean ' + name + ' (± s.e.)':<34} {cells[0]:>18} {cells[1]:>18}")
    w = report["win_rate"]
    lines += ["",
              f"{'win rate of A (AAD paper)':<34} {w['rate']:>9.4f}   "
              f"wins {w['wins']}, ties {w['ties']}, losses {w['losses']}; "
              f"ties as half: {w['rate_ties_half']:.4f}"]
    p = report["preference_rate"]
    if p is None:
        lines.append(f"{'preference rate (MARA paper)':<34} {'-':>9}   needs --cost")
    else:
        lines.append(f"{'preference rate of A (MARA paper)':<34} {p['rate']:>+9.4f}   "
                     f"wins {p['wins']}, ties {p['ties']}, losses {p['losses']} "
                     f"(win: higher reward and lower cost)")
    return "\n".join(lines)

"""Atomic training checkpoints.

Layout under ``<output_dir>/checkpoints/``::

    checkpoint-000001000/          one per checkpoint, named by completed episodes
        agent.safetensors          the actor in the inference format (mara.agent.load_agent)
        trainer.pt                 critics, targets, optimisers, α, counters, config
        replay.pt                  the replay buffer (only with save_replay)

A checkpoint is written into a hidden temporary directory, every file is
``fsync``-ed, then the directory is renamed into place (atomic on POSIX) and
the parent directory synced: a directory named ``checkpoint-*`` is always
complete, and a run killed at any moment leaves the previous ones intact.
Leftover temporary directories are removed by the next run. Everything is
read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from vllm_align.mara.agent import save_agent

PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
_TMP = ".tmp-"
AGENT_FILE, TRAINER_FILE, REPLAY_FILE = "agent.safetensors", "trainer.pt", "replay.pt"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (episodes, path), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def latest(root: Path) -> Optional[Path]:
    found = checkpoints(root)
    return found[-1][1] if found else None


def clean_temporary(root: Path) -> None:
    """Remove half-written checkpoints left by a killed run."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_TMP):
                shutil.rmtree(p, ignore_errors=True)


def write(root: Path, episodes: int, *, actor: torch.nn.Module, trainer: dict,
          replay: Optional[dict] = None, keep: int = 2) -> Path:
    """Write checkpoint ``checkpoint-<episodes>`` atomically; keep the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{episodes:09d}"
    tmp = root / f"{_TMP}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_agent(actor, tmp / AGENT_FILE)
    _fsync(tmp / AGENT_FILE)
    _save(trainer, tmp / TRAINER_FILE)
    if replay is not None:
        _save(replay, tmp / REPLAY_FILE)
    _fsync(tmp)
    if final.exists():  # the same episode count again (e.g. a resumed run's last save)
        old = root / f"{_TMP}old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(root)
    for _, path in checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def read(path: Path) -> tuple[dict, Optional[dict]]:
    """(trainer state, replay state or None) of a checkpoint directory."""
    trainer = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
    replay_path = path / REPLAY_FILE
    replay = torch.load(replay_path, map_location="cpu", weights_only=True) \
        if replay_path.is_file() else None
    return trainer, replay


def publish_agent(actor: torch.nn.Module, path: Path) -> Path:
    """Write the agent to ``path`` (e.g. ``output_dir/agent.safetensors``) atomically."""
    tmp = path.with_name(f"{_TMP}{path.name}.{os.getpid()}{path.suffix}")
    save_agent(actor, tmp)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)
    return path

"""The one build cache of the toy tools: a stamped directory, built once under a file lock.

A build (the toy world, the toy agent, a random Llama pair) is a directory whose
``stamp.json`` holds ``{"key": what was built (recipe version, arguments), "stats": what
the build measured}``, reused while the key matches and its files exist. The stamp is
removed before and written after a build, so an interrupted build is redone; a file lock
makes concurrent builders (test workers) wait for one another. Reading takes no lock and
writes nothing (the shipped assets are read so).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable


def cache_dir(name: str) -> Path:
    """``./.cache/<name>`` under the current directory: the demo's and benchmarks' outputs."""
    return Path.cwd() / ".cache" / name


def sha256(path: Path) -> str | None:
    """Hex digest of a file's bytes (None if there is no such file)."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def read_stamp(stamp: Path, key: dict, files: Iterable[Path]) -> dict | None:
    """The stats in ``stamp`` if it records ``key`` and every one of ``files`` exists, else None."""
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("key") != key or not all(f.is_file() for f in files):
        return None
    return saved.get("stats", {})


def build_once(stamp: Path, key: dict, files: Iterable[Path], build: Callable[[], dict], *,
               lock: Path) -> dict:
    """``read_stamp``, or else, holding ``lock``, ``build()`` (it returns the stats) and stamp it.

    ``build`` must clear what a stale or torn build left behind; ``lock`` must lie outside
    what it clears.
    """
    from filelock import FileLock

    files = list(files)
    stats = read_stamp(stamp, key, files)
    if stats is not None:
        return stats
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        stats = read_stamp(stamp, key, files)  # another process may have built it meanwhile
        if stats is None:
            stamp.unlink(missing_ok=True)
            stats = build()
            stamp.write_text(json.dumps({"key": key, "stats": stats}, indent=2, sort_keys=True)
                             + "\n")
    return stats

"""The one build cache of the toy tools: a stamped directory, built once under a file lock.

A build (the toy world, the toy agent, a random Llama pair) is a directory with a
``stamp.json`` holding ``{"key": ..., "stats": ...}``: the key says what was built (the
recipe version and every argument), the stats what the build measured. A directory whose
stamp records the asked-for key and holds the expected files is reused as it is; anything
else is rebuilt. The stamp is removed before and written after a build, so an interrupted
build is redone; a file lock makes concurrent builders (test workers) wait for one another
instead of racing. Reading is lock-free and writes nothing (the shipped assets are read so).

``cache_dir(name)`` is where the demo and the benchmarks keep their outputs:
``./.cache/NAME`` under the current directory (gitignored in the repository).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable


def cache_dir(name: str) -> Path:
    """``./.cache/<name>`` under the current directory."""
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

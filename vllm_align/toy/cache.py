"""Where the toy world's tools keep what they build or write (one place for both).

* ``cache_dir(name)``: ``./.cache/NAME`` in the current directory (gitignored in
  the repository): the demo's outputs (``demo``), the toy-training benchmark's
  runs (``mara-toy``), the benchmark's models (``bench-models``);
* ``agent_dir(world_dir)``: a toy MARA agent is cached next to the world it
  was trained on, ``WORLD_DIR/mara-agent`` (``vllm_align.toy.agent``).
"""

from __future__ import annotations

import os
from pathlib import Path

AGENT_DIR = "mara-agent"


def cache_dir(name: str) -> Path:
    """``./.cache/<name>`` under the current directory."""
    return Path.cwd() / ".cache" / name


def agent_dir(world_dir: str | os.PathLike) -> Path:
    """The toy agent's cache directory for the world built in ``world_dir``."""
    return Path(world_dir) / AGENT_DIR

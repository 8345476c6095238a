"""The toy world and its trained MARA agent as shipped in the repository.

``assets/`` (next to this file, installed as package data, ~7.6 MB) is a
built toy world (``vllm_align.toy.world``: the SFT and DPO models with their
tokenizer) with the SAC-trained toy agent (``vllm_align.toy.agent``) and the
same run's untrained actor, exactly as ``build_toy_world`` and ``toy_agent``
lay them out, stamps included. They are the demo's and the tests' default
models, so neither builds nor trains anything before decoding.

They are made by the project's own recipe, and one command rebuilds them and
says whether the recipe still reproduces them byte for byte::

    vllm-align toy-assets            # rebuild in a scratch dir, compare, change nothing
    vllm-align toy-assets --write    # ... and replace the shipped files

(``make toy-assets``; about 4 minutes on 2 CPU cores.) Builds are
deterministic on one machine; another CPU may round differently, which the
comparison then reports file by file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from vllm_align.toy.world import ToyWorld, read_toy_world

ASSETS_DIR = Path(__file__).resolve().with_name("assets")
# What the recipe must reproduce (stamps and the learning curve hold timings).
REPRODUCED = ("sft/model.safetensors", "dpo/model.safetensors", "sft/tokenizer.json",
              "dpo/tokenizer.json", "sft/config.json", "dpo/config.json",
              "mara-agent/agent.safetensors", "mara-agent/untrained.safetensors")
SHIPPED = REPRODUCED + (
    "stamp.json", "mara-agent/stamp.json", "mara-agent/metrics.csv",
    *(f"{m}/{f}" for m in ("sft", "dpo")
      for f in ("chat_template.jinja", "generation_config.json", "tokenizer_config.json")))


class StaleAssets(RuntimeError):
    """The shipped files do not match the current recipe (rebuild them)."""


def world() -> ToyWorld:
    """The shipped toy world (read-only)."""
    found = read_toy_world(ASSETS_DIR, seed=0)
    if found is None:
        raise StaleAssets(f"the toy world shipped in {ASSETS_DIR} is missing or was made by "
                          "another recipe; rebuild it with `vllm-align toy-assets --write`")
    return found


def agent():
    """The shipped toy MARA agent (``vllm_align.toy.agent.ToyAgent``, read-only)."""
    from vllm_align.toy.agent import ToySettings, read_toy_agent

    world()
    found = read_toy_agent(ASSETS_DIR, ToySettings())
    if found is None:
        raise StaleAssets(f"the toy agent shipped in {ASSETS_DIR / 'mara-agent'} is missing or "
                          "was trained by another recipe; rebuild it with "
                          "`vllm-align toy-assets --write`")
    return found


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def rebuild(*, write: bool = False, work_dir: os.PathLike | None = None,
            log: Callable[[str], None] = print) -> bool:
    """Build the world and train the agent from scratch, compare with the shipped files.

    Returns True when every file in ``REPRODUCED`` came out byte for byte as
    shipped. With ``write``, the shipped files are replaced by the new ones
    (whether or not they matched).
    """
    from vllm_align.toy.agent import ToySettings, toy_agent
    from vllm_align.toy.world import build_toy_world

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(work_dir) if work_dir is not None else Path(scratch) / "toy-world"
        log(f"building the toy world and training the toy agent in {out}")
        build_toy_world(out, seed=0, log=lambda line: log("  " + line))
        toy_agent(out, ToySettings(), log=lambda line: log("  " + line))
        differ = [name for name in REPRODUCED
                  if _sha256(out / name) != _sha256(ASSETS_DIR / name)]
        for name in REPRODUCED:
            log(f"  {'DIFFERS   ' if name in differ else 'reproduced'}  {name}")
        if differ:
            log(f"{len(differ)} of {len(REPRODUCED)} files differ from the shipped ones: the "
                "recipe (or this machine's arithmetic) no longer reproduces them")
        else:
            log(f"all {len(REPRODUCED)} files reproduced byte for byte")
        if write:
            shutil.rmtree(ASSETS_DIR, ignore_errors=True)
            for name in SHIPPED:
                (ASSETS_DIR / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / name, ASSETS_DIR / name)
            log(f"wrote {len(SHIPPED)} files to {ASSETS_DIR}")
    return not differ

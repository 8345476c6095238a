"""The toy world and its trained MARA agent as shipped in the repository (read, never written).

``assets/`` (next to this file, installed as package data, ~7.6 MB) is a built toy world
(``vllm_align.toy.world``) with the SAC-trained toy agent (``vllm_align.toy.agent``) and the
same run's untrained actor, laid out as ``build_toy_world`` and ``toy_agent`` lay them out,
stamps included: the demo's and the tests' default models. ``make toy-assets``
(``tools/toy_assets.py``, about 4 minutes on 2 CPU cores) rebuilds them elsewhere and says
whether the recipe still reproduces them byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from vllm_align.toy.world import ToyWorld, read_toy_world

ASSETS_DIR = Path(__file__).resolve().with_name("assets")


class StaleAssets(RuntimeError):
    """The shipped files do not match the current recipe (rebuild them)."""


def world() -> ToyWorld:
    """The shipped toy world (read-only)."""
    found = read_toy_world(ASSETS_DIR, seed=0)
    if found is None:
        raise StaleAssets(f"the toy world shipped in {ASSETS_DIR} is missing or was made by "
                          "another recipe; rebuild it with `make toy-assets`")
    return found


def agent():
    """The shipped toy MARA agent (``vllm_align.toy.agent.ToyAgent``, read-only)."""
    from vllm_align.toy.agent import ToySettings, read_toy_agent

    world()
    found = read_toy_agent(ASSETS_DIR, ToySettings())
    if found is None:
        raise StaleAssets(f"the toy agent shipped in {ASSETS_DIR / 'mara-agent'} is missing or "
                          "was trained by another recipe; rebuild it with `make toy-assets`")
    return found

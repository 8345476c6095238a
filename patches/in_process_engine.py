"""An engine core in the caller's process, the process left as it was afterwards.

Not a patch of a vLLM site but a reach past vLLM's public interfaces all the same:
it relies on what vLLM 0.32's in-process engine core does to its host process, and
undoes it. Such a core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) seeds the global RNGs,
freezes ``vllm.envs`` at their values (``enable_envs_cache``) and, on CPU, replaces
``torch.set_num_threads`` by a no-op (its thread binding). The trainer's rollout
engine (``vllm_align/train/engine_rollout.py``) starts its engine this way on CPU, so
that it keeps its own threads and random state and a later engine in the process reads
the environment. Written for vLLM 0.32.
"""

from __future__ import annotations

import contextlib
import os

from vllm_align.patches.version import check_version

MP_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


@contextlib.contextmanager
def engine_in_this_process():
    """Within: engines start with their core in this process; after: RNG states,
    ``torch.set_num_threads`` and vLLM's environment reading are as before."""
    import random

    import numpy as np
    import torch
    from vllm import envs

    check_version(f"{__name__}.engine_in_this_process")
    set_num_threads, py_state = torch.set_num_threads, random.getstate()
    np_state = np.random.get_state()
    os.environ[MP_ENV] = "0"
    envs.disable_envs_cache()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        os.environ.pop(MP_ENV, None)
        envs.disable_envs_cache()
        torch.set_num_threads = set_num_threads
        random.setstate(py_state)
        np.random.set_state(np_state)

"""``generate-pairs`` and ``sweep`` with ``--replicas N``: decoding on N engines, Ray
actors each holding one ``vllm.LLM``.

The driver (``pairs.generate_pairs``) keeps everything that makes the output safe:
it reads and repairs the existing file, picks the prompts still to do, and alone
appends records, in input order, fsync-ed. The replicas only decode: each is sent
contiguous chunks of the prompts still to do, decodes a chunk with the one-engine
code (``pairs.finished_pairs``: both sides in one engine, kept full, prompt ``i``
seeded ``seed + i``) and returns plain records. A record therefore does not depend
on which replica made it or on how the prompts were chunked, and a killed run
resumes exactly as a one-engine run does. ``sweep`` splits its prompts into one
contiguous shard per replica, each decoded by the one-engine ``generate_grid``
(one ``generate`` call holding every grid point of the shard), and scores the
reassembled responses in the driver.

Why actors and not Ray Data's vLLM stage (``ray.data.llm``): that stage takes engine
arguments as a dict for vLLM's async engine and writes its results through Ray Data's
sinks, so the driver-side append-in-order/resume logic, the command line's
``EngineArgs`` and the streaming both-sides-per-prompt feed would each need a second
implementation; an actor runs the same code as one engine does.

On a CPU node the replicas placed there share its cores: unless
``VLLM_CPU_OMP_THREADS_BIND`` is set, replica k of m on a node is bound to the k-th
of m equal slices of that node's cores (split again per tensor-parallel rank), else
vLLM binds every single-rank engine to the same cores.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Iterator, Mapping, Sequence

from vllm_align.data.pairs import Finished, PairsError, engine_window, finished_pairs
from vllm_align.data.prompts import PromptItem

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
QUEUED = 2      # chunks queued per replica, so that it never waits for the driver


def where() -> tuple[str, list[int], bool]:
    """(node id, usable core ids, whether vLLM runs on CPU here), in a Ray actor."""
    import ray
    from vllm.platforms import current_platform

    return (ray.get_runtime_context().get_node_id(), sorted(os.sched_getaffinity(0)),
            current_platform.is_cpu())


def engine_envs(places: Sequence[tuple[str, list[int], bool]], ranks: int) -> list[dict[str, str]]:
    """The environment each engine actor starts its engine under, from the actors' ``where()``.

    CPU engines sharing a node get ``VLLM_CPU_OMP_THREADS_BIND`` slices of its cores
    (``core_binds``), unless that variable is set already.
    """
    envs: list[dict[str, str]] = [{} for _ in places]
    by_node: dict[str, list[int]] = {}
    for k, (node, _, cpu) in enumerate(places):
        if cpu and BIND_ENV not in os.environ:
            by_node.setdefault(node, []).append(k)
    for node, members in by_node.items():
        for k, bind in zip(members, core_binds(places[members[0]][1], len(members), ranks)):
            envs[k][BIND_ENV] = bind
    return envs


class _Replica:
    """One engine in a Ray actor (wrapped by ``ray.remote`` in ``ReplicaPool``)."""

    def where(self) -> tuple[str, list[int], bool]:
        return where()

    def start(self, build: Mapping[str, Any], env: Mapping[str, str]) -> int:
        """Start the engine (``build_llm``'s arguments) under ``env``; its running batch."""
        from vllm_align.data.engine import build_llm

        os.environ.update(env)      # read by the engine processes this one spawns
        self.llm = build_llm(**build)
        return self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs

    def decode(self, offset: int, chunk: Sequence[PromptItem], chosen, rejected,
               max_tokens: int, seeds: Mapping[Any, int], batch_size: int,
               lora=None) -> list[Finished]:
        out = finished_pairs(self.llm, chunk, chosen, rejected, max_tokens, seeds,
                             engine_window(self.llm, batch_size), lora)
        return [Finished(f.j + offset, f.prompt, f.chosen, f.rejected, f.tokens) for f in out]

    def sweep(self, cfg, items: Sequence[PromptItem]):
        """``sweep.generate_grid`` of ``items`` (their seeds are their input positions)."""
        from vllm_align.data.sweep import generate_grid

        return generate_grid(self.llm, cfg, items)


def core_binds(cores: Sequence[int], replicas: int, ranks: int) -> list[str]:
    """``VLLM_CPU_OMP_THREADS_BIND`` of each of ``replicas`` engines of ``ranks`` ranks
    sharing ``cores``: equal contiguous slices, ranks separated by ``|``."""
    slots = replicas * ranks
    if len(cores) < slots:
        raise PairsError(f"{replicas} replicas x {ranks} ranks need {slots} cores on one "
                         f"node, it has {len(cores)}; use fewer --replicas")
    per = len(cores) // slots
    parts = [cores[k * per:(k + 1) * per] for k in range(slots)]
    spans = [f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts]
    return ["|".join(spans[r * ranks:(r + 1) * ranks]) for r in range(replicas)]


class ReplicaPool:
    """N engine replicas on a Ray cluster (``ray_address``; default: start a local one)."""

    def __init__(self, replicas: int, build: Mapping[str, Any], *,
                 ray_address: str | None = None):
        import ray

        self.own_ray = not ray.is_initialized()
        if self.own_ray:
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
        engine_args = build.get("engine_args")
        ranks = (engine_args.tensor_parallel_size if engine_args is not None
                 else int((build.get("llm_kwargs") or {}).get("tensor_parallel_size", 1)))
        gpus = ranks if ray.cluster_resources().get("GPU", 0) > 0 else 0
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(_Replica)
        self.actors = [actor.remote() for _ in range(replicas)]
        envs = engine_envs(ray.get([a.where.remote() for a in self.actors]), ranks)
        self.max_num_seqs = ray.get([a.start.remote(build, env)
                                     for a, env in zip(self.actors, envs)])

    def pairs(self, todo: Sequence[PromptItem], chosen, rejected, max_tokens: int,
              seeds: Mapping[Any, int], batch_size: int, lora=None) -> Iterator[Finished]:
        """Every prompt of ``todo`` decoded once, in chunks of twice a replica's
        window, handed out in input order to whichever replica has room; completion
        order (the driver orders the records). ``lora``: the run's ``LoraAdapter``
        (plain data; each replica makes its ``LoRARequest``)."""
        import ray

        size = 2 * max(batch_size, *self.max_num_seqs)
        chunks = deque((i, todo[i:i + size]) for i in range(0, len(todo), size))
        pending: dict[Any, Any] = {}        # result ref -> actor
        load = {id(a): 0 for a in self.actors}
        while chunks or pending:
            for a in self.actors:
                while chunks and load[id(a)] < QUEUED:
                    offset, chunk = chunks.popleft()
                    ref = a.decode.remote(offset, chunk, chosen, rejected, max_tokens,
                                          {it.id: seeds[it.id] for it in chunk}, batch_size,
                                          lora)
                    pending[ref], load[id(a)] = a, load[id(a)] + 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            a = pending.pop(ready[0])
            load[id(a)] -= 1
            yield from ray.get(ready[0])

    def generate_grid(self, cfg, items: Sequence[PromptItem]):
        """``sweep.generate_grid`` over all ``items``, the prompts split in contiguous
        shards, one per replica; the same ``Generations`` as one engine's."""
        import time

        import ray

        from vllm_align.data.sweep import Generations

        n = len(self.actors)
        bounds = [len(items) * k // n for k in range(n + 1)]
        shards = [items[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        t0 = time.perf_counter()
        gens = ray.get([a.sweep.remote(cfg, shard) for a, shard in zip(self.actors, shards)])
        seconds = time.perf_counter() - t0
        responses = [r for k in range(len(cfg.grid)) for shard, gen in zip(shards, gens)
                     for r in gen.responses[k * len(shard):(k + 1) * len(shard)]]
        return Generations(prompts=[p for gen in gens for p in gen.prompts],
                           responses=responses, tokens=sum(gen.tokens for gen in gens),
                           seconds=seconds)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.own_ray:
            ray.shutdown()

"""Rollout workers on Ray: N actors feed one learner's replay buffer.

Each worker is a Ray actor holding its own rollout (``spec.rollout``: a vLLM
engine serving the LLM, or the HF reference; reward and cost models) built
from the picklable ``RolloutSpec``; engines sharing a CPU node are bound to
their own cores, as ``data/replicas.py`` binds its replicas. The learner (the
calling process, ``MaraTrainer``) keeps every worker busy: it sends a worker a
batch of prompts together with the newest actor weights (``ray.put`` once per
weight version, so each version is broadcast once through the object store),
takes whichever rollout finishes first (``ray.wait``), adds it to the buffer,
runs the SAC updates it pays for, and hands that worker the next batch. As in
the paper's distributed SAC, collection never waits for learning and vice
versa; a rollout may thus run with weights a few updates old.

Ray is initialised here if the caller has not done so (``ray.init`` reads
``RAY_ADDRESS`` to join a running cluster). Each worker reserves one CPU and
runs torch with ``threads`` threads (default 1).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from vllm_align.data.prompts import Prompt
from vllm_align.train.rollout import RolloutBatch, RolloutSpec


class RolloutWorker:
    """The body of a Ray rollout actor (also usable in-process, for tests)."""

    def __init__(self, worker_id: int, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.worker_id = worker_id

    def where(self):
        from vllm_align.data.replicas import where

        return where()

    def start(self, spec: RolloutSpec, env: dict[str, str]) -> None:
        """Build the rollout (an engine starts under ``env``, read by its processes)."""
        from vllm_align.train.engine_rollout import open_rollout

        os.environ.update(env)
        self.rollout = open_rollout(spec)

    def collect(self, prompts: list[Prompt], actor_state: dict, seed: int) -> RolloutBatch:
        batch = self.rollout.collect(prompts, actor_state, seed=seed)
        batch.worker = self.worker_id
        return batch


def _ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError("--num-workers > 1 runs rollout workers on Ray, which is not "
                           "installed: pip install 'vllm-align[ray]'") from None
    return ray


def run_workers(trainer, prompts: list[Prompt], report: Callable[[dict], None],
                threads: Optional[int] = None) -> None:
    """Drive ``trainer`` (a ``MaraTrainer`` mid-``train``) with Ray rollout workers.

    Uses only the trainer's interface (``next_prompts``, ``next_rollout_seed``,
    ``actor_state``, ``consume``, ``maybe_checkpoint``), so this module never
    imports the trainer's.
    """
    ray = _ray()
    cfg = trainer.cfg
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    spec = RolloutSpec.from_config(cfg, prompts)
    gpus = 1 if spec.rollout == "engine" and ray.cluster_resources().get("GPU", 0) > 0 else 0
    worker_cls = ray.remote(num_cpus=1, num_gpus=gpus)(RolloutWorker)
    workers = [worker_cls.remote(i, threads or cfg.threads or 1)
               for i in range(cfg.sac.num_workers)]
    envs = [{} for _ in workers]
    if spec.rollout == "engine":  # engines sharing a CPU node get their own cores
        from vllm_align.data.replicas import engine_envs

        envs = engine_envs(ray.get([w.where.remote() for w in workers]), ranks=1)
    ray.get([w.start.remote(spec, env) for w, env in zip(workers, envs)])
    total = cfg.sac.training_episodes
    handed_out = trainer.episodes
    in_flight: dict[Any, int] = {}  # object ref -> worker index
    weights_ref, weights_version = None, -1
    since = trainer.episodes

    def submit(w: int) -> None:
        nonlocal handed_out, weights_ref, weights_version
        batch = trainer.next_prompts(prompts, handed_out)
        if not batch:
            return
        if weights_version != trainer.sac.num_updates:  # broadcast each version once
            weights_ref = ray.put(trainer.actor_state())
            weights_version = trainer.sac.num_updates
        seed = trainer.next_rollout_seed()
        handed_out += len(batch)
        in_flight[workers[w].collect.remote(batch, weights_ref, seed)] = w

    try:
        for w in range(len(workers)):
            submit(w)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            w = in_flight.pop(done[0])
            batch = ray.get(done[0])
            row = trainer.consume(batch)
            report(row)
            since = trainer.maybe_checkpoint(since)
            if handed_out < total:
                submit(w)
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        for worker in workers:
            ray.kill(worker)

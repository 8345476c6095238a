"""Fixed-capacity replay buffer of accept/reject transitions.

Storage is preallocated once: state and next_state [capacity, d] (float32, or
float16 to halve memory; samples come back as float32), action [capacity]
int64, reward and done [capacity] float32. Inserts are batched and vectorised
(one indexed write per tensor, no Python loop per transition); when the buffer
is full the oldest transitions are overwritten (ring). Sampling is uniform with
replacement over the filled part, driven by the buffer's own ``torch.Generator``
so a run is reproducible and resumable (its state is in ``state_dict()``).

Memory: two [capacity, d] tensors. At the paper's capacity of 1e6 and d = 4096
that is ≈ 32.8 GB in float32 or ≈ 16.4 GB in float16; ``torch.empty`` only
reserves address space, pages become resident as they are written.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch

from vllm_align.train.sac import Batch


class ReplayBuffer:
    def __init__(self, capacity: int, state_dim: int, *, fp16: bool = False,
                 device: Union[str, torch.device] = "cpu", seed: int = 0) -> None:
        for name, value in (("capacity", capacity), ("state_dim", state_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ReplayBuffer {name} must be a positive int, got {value!r}")
        self.capacity = capacity
        self.state_dim = state_dim
        self.device = torch.device(device)
        self.storage_dtype = torch.float16 if fp16 else torch.float32
        self.state = torch.empty(capacity, state_dim, dtype=self.storage_dtype, device=self.device)
        self.next_state = torch.empty_like(self.state)
        self.action = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.reward = torch.zeros(capacity, dtype=torch.float32, device=self.device)
        self.done = torch.zeros(capacity, dtype=torch.float32, device=self.device)
        self.ptr = 0  # next slot to write
        self.size = 0  # filled slots
        self.total_added = 0  # transitions ever added
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def add_batch(self, state: torch.Tensor, action: torch.Tensor, reward: torch.Tensor,
                  next_state: torch.Tensor, done: torch.Tensor) -> None:
        """Append N transitions: state/next_state [N, d], action/reward/done [N]."""
        n = state.shape[0] if state.dim() == 2 else -1
        if state.dim() != 2 or state.shape[1] != self.state_dim:
            raise ValueError(f"state must be [N, {self.state_dim}], got {tuple(state.shape)}")
        if tuple(next_state.shape) != tuple(state.shape):
            raise ValueError(f"next_state must be {tuple(state.shape)}, got {tuple(next_state.shape)}")
        for name, t in (("action", action), ("reward", reward), ("done", done)):
            if t.numel() != n:
                raise ValueError(f"{name} must have {n} elements, got shape {tuple(t.shape)}")
        action = action.reshape(-1).to(self.device, torch.long)
        if n and bool(((action != 0) & (action != 1)).any()):
            raise ValueError("action must be 0 (reject) or 1 (accept)")
        if n == 0:
            return
        reward = reward.reshape(-1)
        done = done.reshape(-1)
        state_, next_state_ = state, next_state
        if n > self.capacity:  # only the newest `capacity` survive
            keep = slice(n - self.capacity, n)
            state_, next_state_ = state[keep], next_state[keep]
            action, reward, done = action[keep], reward[keep], done[keep]
            self.ptr = (self.ptr + n - self.capacity) % self.capacity
            m = self.capacity
        else:
            m = n
        idx = (self.ptr + torch.arange(m, device=self.device)) % self.capacity
        self.state[idx] = state_.to(self.device, self.storage_dtype)
        self.next_state[idx] = next_state_.to(self.device, self.storage_dtype)
        self.action[idx] = action
        self.reward[idx] = reward.to(self.device, torch.float32)
        self.done[idx] = done.to(self.device, torch.float32)
        self.ptr = (self.ptr + m) % self.capacity
        self.size = min(self.size + m, self.capacity)
        self.total_added += n

    def sample(self, batch_size: int, device: Optional[Union[str, torch.device]] = None) -> Batch:
        """``batch_size`` transitions drawn uniformly with replacement (float32 states)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = torch.randint(0, self.size, (batch_size,), generator=self.generator)
        idx = idx.to(self.device)
        out = device if device is not None else self.device
        return Batch(
            state=self.state[idx].to(out, torch.float32),
            action=self.action[idx].to(out),
            reward=self.reward[idx].to(out),
            next_state=self.next_state[idx].to(out, torch.float32),
            done=self.done[idx].to(out),
        )

    def state_dict(self) -> dict[str, Any]:
        """The filled part, pointers and sampler state (CPU tensors), for checkpoints."""
        n = self.size
        return {
            "capacity": self.capacity,
            "state_dim": self.state_dim,
            "storage_dtype": str(self.storage_dtype),
            "ptr": self.ptr,
            "size": n,
            "total_added": self.total_added,
            "state": self.state[:n].cpu().clone(),
            "next_state": self.next_state[:n].cpu().clone(),
            "action": self.action[:n].cpu().clone(),
            "reward": self.reward[:n].cpu().clone(),
            "done": self.done[:n].cpu().clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if sd["capacity"] != self.capacity or sd["state_dim"] != self.state_dim:
            raise ValueError(
                f"replay checkpoint is capacity={sd['capacity']}, state_dim={sd['state_dim']}; "
                f"this buffer is capacity={self.capacity}, state_dim={self.state_dim}")
        n = int(sd["size"])
        self.state[:n] = sd["state"].to(self.device, self.storage_dtype)
        self.next_state[:n] = sd["next_state"].to(self.device, self.storage_dtype)
        self.action[:n] = sd["action"].to(self.device)
        self.reward[:n] = sd["reward"].to(self.device)
        self.done[:n] = sd["done"].to(self.device)
        self.ptr = int(sd["ptr"])
        self.size = n
        self.total_added = int(sd["total_added"])
        self.generator.set_state(sd["generator"])

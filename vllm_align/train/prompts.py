"""The trainer's prompt order (the prompt sets themselves: ``vllm_align.data.prompts``)."""

from __future__ import annotations


class PromptSampler:
    """Epoch-wise shuffled prompt order, reproducible and resumable from (seed, position).

    Epoch ``e`` is a permutation drawn with seed ``seed + e``; ``position``
    counts prompts handed out so far, so the state is one integer.
    """

    def __init__(self, num_prompts: int, seed: int, position: int = 0) -> None:
        if num_prompts < 1:
            raise ValueError(f"PromptSampler needs at least one prompt, got {num_prompts}")
        self.num_prompts, self.seed, self.position = num_prompts, seed, position
        self._epoch, self._order = -1, []

    def _perm(self, epoch: int) -> list[int]:
        import torch

        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_prompts, generator=gen).tolist()

    def take(self, n: int) -> list[int]:
        """The next ``n`` prompt indices."""
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, self.num_prompts)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, self._perm(epoch)
            out.append(self._order[i])
            self.position += 1
        return out

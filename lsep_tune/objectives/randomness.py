"""Per-step random draws that do not depend on how the global batch is split across workers.

Every rank and micro-step seeds the same generator from (seed, step), draws each random tensor for
the whole global batch (all ranks, all accumulation micro-steps), and keeps its own slice. So 1
worker with 2 accumulation steps, 2 workers with 1, and 1 worker with the whole batch see the same
noise, times, label drops and crops, and a resumed run replays exactly the draws of the run it
continues: no RNG state needs checkpointing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draws:
    generator: torch.Generator
    global_batch: int  # samples in the global batch of the step (all ranks, all micro-steps)
    offset: int  # index of this rank and micro-step's first sample in it
    local_batch: int
    device: torch.device

    @classmethod
    def for_step(cls, seed: int, step: int, global_batch: int, offset: int, local_batch: int, device) -> "Draws":
        g = torch.Generator(device="cpu")
        g.manual_seed(seed * 1_000_003 + step)  # distinct seed per (seed, step)
        return cls(g, global_batch, offset, local_batch, torch.device(device))

    def _local(self, full: torch.Tensor) -> torch.Tensor:
        return self.to_device(full[self.offset : self.offset + self.local_batch])

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Draws are made on the host; on a GPU the copy goes through pinned memory without a sync."""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def rand(self, *shape: int) -> torch.Tensor:
        """U[0, 1) of shape (local_batch, *shape)."""
        return self.to_device(self.rand_host(*shape))

    def rand_host(self, *shape: int) -> torch.Tensor:
        """The same draw as `rand`, kept on the host: for decisions that must not wait for the device."""
        full = torch.rand((self.global_batch, *shape), generator=self.generator)
        return full[self.offset : self.offset + self.local_batch]

    def randn(self, *shape: int) -> torch.Tensor:
        return self._local(torch.randn((self.global_batch, *shape), generator=self.generator))

    def randint_shared(self, low: int, high: int) -> int:
        """One integer in [low, high) shared by the whole global batch."""
        return int(torch.randint(low, high, (1,), generator=self.generator).item())

"""The vocabulary every layer shares: one module's LoRA update, a method's result, and its context.

    ΔW = B @ A   (A: r × n, B: m × r, the LoRA scale folded into B; rank 0 = no update)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LoraFactors:
    """One module's update ΔW = B @ A, scale folded into B. Shapes: A (r, n), B (m, r)."""

    A: torch.Tensor
    B: torch.Tensor

    def __post_init__(self):
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"LoraFactors needs A (r, n) and B (m, r), got {tuple(self.A.shape)} and {tuple(self.B.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def padded(self, rank: int) -> "LoraFactors":
        """The same ΔW at rank ``rank`` ≥ self.rank: zero rows appended to A and zero columns to B (exact)."""
        extra = rank - self.rank
        if extra < 0:
            raise ValueError(f"cannot pad rank {self.rank} down to {rank}")
        if extra == 0:
            return self
        return LoraFactors(torch.cat([self.A, self.A.new_zeros(extra, self.A.shape[1])]),
                           torch.cat([self.B, self.B.new_zeros(self.B.shape[0], extra)], dim=1))

    def to(self, device=None, dtype=None) -> "LoraFactors":
        return LoraFactors(self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype))

    @staticmethod
    def zeros(shape: tuple[int, int], dtype=torch.float32, device=None) -> "LoraFactors":
        """The rank-0 update: what an adapter that lacks a module contributes."""
        m, n = shape
        return LoraFactors(torch.zeros(0, n, dtype=dtype, device=device), torch.zeros(m, 0, dtype=dtype, device=device))


@dataclass
class ModuleResult:
    """One module's merge result: merged factors (scale 1), statistics, and optional bundle tensors."""

    factors: LoraFactors | None
    stats: dict[str, float | int] = field(default_factory=dict)  # counts (rank, p) as ints
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device=None, dtype=None) -> "ModuleResult":
        return ModuleResult(
            self.factors.to(device, dtype) if self.factors is not None else None,
            dict(self.stats),
            {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in self.tensors.items()},
        )


@dataclass(frozen=True)
class MethodContext:
    """Where a method runs: the module's name, which seeds its private random streams (same recipe → same draws)."""

    module: str = ""

    def generator(self, seed: int, device, stream: str = "") -> torch.Generator:
        """A generator seeded from (seed, module name[, stream]) by CRC32, no global state. (Draws are reproducible
        per device type; CPU and CUDA streams differ.)"""
        gen = torch.Generator(device=device)
        gen.manual_seed(zlib.crc32(f"{seed}:{self.module}{stream}".encode()))
        return gen

"""Paired bootstrap confidence intervals for the difference of two merges' mean normalized accuracy.

    d = (1/T) Σ_t (acc_A,t − acc_B,t) / acc_own,t        (acc_own: the task's own adapter, held fixed)

Each resample draws, per task, n_t test items with replacement — the *same* items for A and B (paired), so
what the two merges get right together cancels — and recomputes d; the 95% interval is the 2.5th and 97.5th
percentile of the resampled d. A difference whose interval excludes 0 is one the test set can tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RESAMPLES, SEED = 2000, 0


@dataclass(frozen=True)
class Difference:
    value: float  # d on the full test set
    low: float
    high: float

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_bootstrap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], own: dict[str, float], *,
                     resamples: int = RESAMPLES, seed: int = SEED, level: float = 0.95) -> Difference:
    """``a``, ``b``: per task, per test item, 1 if the merge is right (same items in the same order)."""
    gen = torch.Generator().manual_seed(seed)
    tasks = list(own)
    point = torch.zeros(())
    draws = torch.zeros(resamples, dtype=torch.float64)
    for t in tasks:
        if a[t].shape != b[t].shape:
            raise ValueError(f"task {t}: the two merges were scored on different items")
        diff = a[t].double() - b[t].double()
        n = diff.numel()
        point = point + diff.mean() / own[t]
        idx = torch.randint(n, (resamples, n), generator=gen)
        draws += diff[idx].mean(1) / own[t]
    draws /= len(tasks)
    tail = (1 - level) / 2
    low, high = torch.quantile(draws, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Difference(float(point) / len(tasks), low, high)


def pack(correct: torch.Tensor) -> str:
    """A bool vector as a '0'/'1' string (how per-item results are kept in results/*.json)."""
    return "".join("1" if c else "0" for c in correct.tolist())


def unpack(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits])

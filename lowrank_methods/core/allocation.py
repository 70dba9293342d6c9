"""Fixed-budget rank allocation: the parameters of a uniform rank-r adapter, spread over modules by spectrum.

    budget  P = Σ_m r (m_rows + n_cols)          (what rank r everywhere costs)
    choose  k_m maximising Σ_m Σ_{i≤k_m} σ²_{m,i} / ‖ΔW_m‖²   subject to   Σ_m k_m (m_rows + n_cols) ≤ P

Each module's merged update keeps its top k_m singular triplets. The objective is the energy kept *relative to
each module's own update* (every module counts the same, however large its update), taken greedily by gain per
parameter, σ²_{m,i} / (‖ΔW_m‖² (m_rows + n_cols)): optimal for the fractional problem, since each module's gains
fall with i. Applicable after any merge whose output keeps more than r directions.
"""

from __future__ import annotations

import heapq
from typing import Mapping

import torch


def budget(shapes: Mapping[str, tuple[int, int]], rank: int) -> int:
    """Parameters of rank ``rank`` in every module (capped at each module's min(m, n))."""
    return sum(min(rank, min(s)) * (s[0] + s[1]) for s in shapes.values())


def allocate_ranks(spectra: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], rank: int) -> dict[str, int]:
    """Per module, how many of its singular values (sorted, descending) to keep within ``budget(shapes, rank)``.

    Greedy on σ²/‖ΔW‖² per parameter; a triplet that does not fit is skipped and smaller ones may still fit, so
    the budget is used as fully as the module sizes allow. Never more than the uniform rank's parameter count.
    """
    left = budget(shapes, rank)
    keep = {m: 0 for m in spectra}
    heap = []
    for m, s in spectra.items():
        energy = float((s.double() ** 2).sum())
        if energy > 0 and s.numel():
            heap.append((-float(s[0].double() ** 2) / energy / sum(shapes[m]), m, energy))
    heapq.heapify(heap)
    while heap:
        _, m, energy = heapq.heappop(heap)
        cost = sum(shapes[m])
        if cost <= left:
            left -= cost
            keep[m] += 1
            s = spectra[m]
            if keep[m] < s.numel() and float(s[keep[m]]) > 0:
                heapq.heappush(heap, (-float(s[keep[m]].double() ** 2) / energy / cost, m, energy))
    return keep

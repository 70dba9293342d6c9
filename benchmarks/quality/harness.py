"""The benchmark loop: choose each candidate's parameters on validation, then score it once on test.

    normalized accuracy_t = acc(base + merged ΔW, task t) / acc(base + ΔW_t, task t)

Reference rows: zero-shot (base model alone), the individual adapters (each on its own task: 1.0 by
definition) and plain averaging ΔW* = (1/T) Σ_t B_t A_t, computed densely here as an independent baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowrank_methods.core.errors import MergeError
from lowrank_methods.core.types import LoraFactors

from .evaluate import Evaluator
from .methods import Candidate, Merged, PeftPeers, load_factors, package_candidates
from .stats import pack


@dataclass
class Row:
    label: str
    source: str
    accuracy: dict[str, float]  # test accuracy per task
    normalized: dict[str, float]
    chosen: dict = field(default_factory=dict)
    validation: float = float("nan")  # normalized mean on validation at the chosen parameters
    seconds: float = float("nan")
    rank: int | None = None
    size_mb: float | None = None
    note: str = ""
    correct: dict[str, str] = field(default_factory=dict)  # per task, per test item: '1' right, '0' wrong (stats.pack)

    @property
    def mean(self) -> float:
        return sum(self.normalized.values()) / len(self.normalized) if self.normalized else float("nan")

    @property
    def worst(self) -> float:
        return min(self.normalized.values()) if self.normalized else float("nan")


@dataclass
class Result:
    set_name: str
    tasks: list[str]
    individual: dict[str, float]
    rows: list[Row]
    seconds: float
    planned: int = 0  # candidates planned; fewer merge rows means the run was cut short
    norm_spread: dict = field(default_factory=dict)  # per module max_t ‖ΔW_t‖ / min_t ‖ΔW_t‖: median, min, max

    @property
    def complete(self) -> bool:
        return sum(r.source != "baseline" for r in self.rows) >= self.planned


def normalize(acc: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    return {t: acc[t] / reference[t] for t in acc}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


class SharedScores:
    """Evaluator.correct, reused across merges that are numerically the same update (e.g. exact TA computed by
    cat, task_arithmetic or core_space[ta]). Identity is tested on ΔW x for a fixed random probe x per module.
    Returns per-task accuracies; ``last_correct`` holds the per-item results of the last call."""

    def __init__(self, evaluator: Evaluator, rtol: float = 1e-5):
        self.evaluator, self.rtol = evaluator, rtol
        self.seen: list[tuple[str, torch.Tensor, dict, str]] = []
        self.probes: dict[int, torch.Tensor] = {}
        self.last_match = ""  # the label of the earlier merge that the last call reused ("" if none)
        self.last_correct: dict[str, torch.Tensor] = {}

    def fingerprint(self, deltas) -> torch.Tensor:
        parts = []
        for module in sorted(deltas):
            d = deltas[module]
            n = d.shape[1]
            if n not in self.probes:
                self.probes[n] = torch.randn(n, 4, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
            x = self.probes[n]
            parts.append((d.B.double() @ (d.A.double() @ x)) if isinstance(d, LoraFactors) else d.double() @ x)
        return torch.cat([p.flatten() for p in parts]) if parts else torch.zeros(1, dtype=torch.float64)

    def __call__(self, deltas, split: str, label: str = "") -> dict[str, float]:
        fp = self.fingerprint(deltas)
        for s, other, correct, first in self.seen:
            if s == split and other.shape == fp.shape and (other - fp).norm() <= self.rtol * max(fp.norm(), 1e-30):
                self.last_match, self.last_correct = first, correct
                return accuracies(correct)
        self.last_match = ""
        self.last_correct = self.evaluator.correct(deltas, split)
        self.seen.append((split, fp, self.last_correct, label))
        return accuracies(self.last_correct)


def accuracies(correct: dict[str, torch.Tensor]) -> dict[str, float]:
    return {t: c.float().mean().item() for t, c in correct.items()}


def search(candidate: Candidate, scores: SharedScores, individual_val: dict[str, float], log=print) -> tuple[dict, float]:
    """Hill-climb on validation: λ over its grid from 1.0, then each rule knob over its grid from its default.

    From the start value, step towards the better neighbour while it improves (curves in λ are unimodal here);
    this scores 3-4 of the 5 λ values instead of all of them. Ties keep the earlier value.
    """
    cache: dict[tuple, float] = {}

    def score(values: dict) -> float:
        key = tuple(sorted(values.items()))
        if key not in cache:
            merged = candidate.merge(values)
            label = f"{candidate.label} {_params(values)}"
            cache[key] = mean(normalize(scores(merged.deltas, "validation", label), individual_val).values())
            log(f"    {candidate.label} {_params(values)}: validation {cache[key]:.3f}")
        return cache[key]

    best = {**candidate.fixed}
    defaults = {k: f.default for k, f in candidate.fields.items()}
    for knob, grid in [("lambda", candidate.lambdas), *candidate.second_stage.items()]:
        start = best.get(knob, 1.0 if knob == "lambda" else defaults.get(knob))
        i = grid.index(start) if start in grid else len(grid) // 2
        best[knob] = grid[climb_index(len(grid), i, lambda j: score({**best, knob: grid[j]}))]
    return best, score(best)


def climb_index(n: int, i: int, at) -> int:
    """From index ``i`` of a grid of ``n`` values, step towards the better neighbour of ``at(j)`` while it improves."""
    for step in (-1, 1):
        j = i
        while 0 <= j + step < n and at(j + step) > at(j):
            j += step
        if j != i:
            return j
    return i


def run_benchmark(evaluator: Evaluator, adapter_dirs: dict[str, Path], *, set_name: str = "main",
                  methods: list[str] | None = None, peers: bool = True, quick: tuple[float, ...] | None = None,
                  budget: bool = True, lambdas: tuple[float, ...] | None = None, log=print,
                  on_row=lambda result: None, done: list[Row] = ()) -> Result:
    """Merge the adapters (one per task, in the evaluator's task order) with every candidate and score them.

    ``on_row(result)`` is called after each candidate (the caller saves partial results). ``methods`` are run in
    the order given (else each method's default rule first); ``done``: rows of an earlier run of the same
    protocol, kept instead of being recomputed (``--resume``).
    """
    start = time.perf_counter()
    task_names = list(evaluator.tasks)
    dirs = [adapter_dirs[t] for t in task_names]
    factors = load_factors(dirs)
    weights = [1.0] * len(dirs)

    own = {t: {m: fs[i] for m, fs in factors.items()} for i, t in enumerate(task_names)}
    individual = {t: evaluator.scores(own[t], "test", only=[t])[t] for t in task_names}
    individual_val = {t: evaluator.scores(own[t], "validation", only=[t])[t] for t in task_names}
    log(f"[{set_name}] individual adapters (test): " + " ".join(f"{t} {a:.3f}" for t, a in individual.items()))

    zero = evaluator.correct({}, "test")
    rows = [Row("zero-shot (base model)", "baseline", acc := accuracies(zero), normalize(acc, individual),
                correct={t: pack(c) for t, c in zero.items()})]
    rows.append(Row("individual adapters", "baseline", dict(individual), {t: 1.0 for t in task_names}))
    t0 = time.perf_counter()
    average = {m: sum(f.dense() for f in fs) / len(fs) for m, fs in factors.items()}
    seconds = time.perf_counter() - t0
    avg = evaluator.correct(average, "test")
    acc = accuracies(avg)
    rows.append(Row("plain average (dense, 1/T)", "baseline", acc, normalize(acc, individual), seconds=seconds,
                    rank=None, correct={t: pack(c) for t, c in avg.items()}))
    log(f"[{set_name}] zero-shot {rows[0].mean:.3f}  average {rows[2].mean:.3f}")

    shared = SharedScores(evaluator)
    candidates = package_candidates(factors, weights, budget=budget)
    if peers:
        candidates += PeftPeers(evaluator.base_model, dirs).candidates()
    if methods:
        candidates = [c for c in candidates if c.label in methods or c.label.split("[")[0] in methods]
    for c in candidates:
        grid = lambdas or quick
        if grid and len(c.lambdas) > 1:
            c.lambdas = grid
        if quick:
            c.second_stage = {}
    if methods:
        rank = lambda c: methods.index(c.label) if c.label in methods else methods.index(c.label.split("[")[0])  # noqa: E731
        candidates.sort(key=rank)
    else:
        candidates.sort(key=lambda c: not c.primary)  # each method's default first: a cut-short run still covers them all
    earlier = {r.label: r for r in done if r.source != "baseline"}
    kept = {c.label: earlier[c.label] for c in candidates if c.label in earlier}
    rows += list(kept.values())
    candidates = [c for c in candidates if c.label not in kept]
    result = Result(set_name, task_names, individual, rows, 0.0, planned=len(candidates) + len(kept),
                    norm_spread=norm_spread(factors))
    for candidate in candidates:
        try:
            chosen, val = search(candidate, shared, individual_val, log)
            merged: Merged = candidate.merge(chosen)
        except Exception as e:  # a method refusing this adapter set (e.g. `linear` on mixed ranks) is a result too
            if candidate.source != "peft" and not isinstance(e, MergeError):
                raise
            log(f"  {candidate.label}: refused ({type(e).__name__}: {e})")
            rows.append(Row(candidate.label, candidate.source, {}, {}, note=f"refused: {str(e).splitlines()[0][:120]}"))
            result.seconds = time.perf_counter() - start
            on_row(result)
            continue
        acc = shared(merged.deltas, "test", f"{candidate.label} {_params(chosen)}")
        row = Row(candidate.label, candidate.source, acc, normalize(acc, individual), chosen, val,
                  merged.seconds, merged.rank, merged.size_mb, f"same ΔW as {shared.last_match}" if shared.last_match else "",
                  {t: pack(c) for t, c in shared.last_correct.items()})
        rows.append(row)
        log(f"  {candidate.label}: {_params(chosen)} -> test normalized mean {row.mean:.3f}, worst {row.worst:.3f}")
        result.seconds = time.perf_counter() - start
        on_row(result)
    return result


def norm_spread(factors: dict[str, list[LoraFactors]]) -> dict[str, float]:
    """How unequal the tasks' updates are: per module, the largest ‖ΔW_t‖_F over the smallest nonzero one."""
    ratios = []
    for fs in factors.values():
        norms = [float(((f.B.T @ f.B) * (f.A @ f.A.T)).sum().clamp_min(0).sqrt()) for f in fs if f.rank > 0]
        norms = [x for x in norms if x > 0]  # an all-zero update is no task here
        if len(norms) > 1:
            ratios.append(max(norms) / min(norms))
    if not ratios:
        return {}
    ratios.sort()
    return {"median": ratios[len(ratios) // 2], "min": ratios[0], "max": ratios[-1]}


def _params(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items() if k not in ("rule",))

"""The contenders: every registered method of this package (one per rule), and PEFT's own merges as peers.

A ``Candidate`` turns parameter values into per-module updates ΔW (``Merged``). Merge spaces (ctm, core_space,
knots, mtc) run once per rule. The grid is declared once for all: λ over ``LAMBDAS`` first, then, at the best
λ, the rule's own knob (TIES density, DARE drop rate) over ``SECOND_STAGE``.
Methods are listed from the registry at run time, so methods added later are picked up.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, get_args

import torch

from lowrank_methods.core.types import MethodContext
from lowrank_methods.formats.peft import AdapterSource
from lowrank_methods.core.types import ModuleResult
from lowrank_methods.pipeline.engine import make_plan, within_budget

from lowrank_methods.core.types import LoraFactors
from lowrank_methods.core.method import list_methods

LAMBDAS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
SECOND_STAGE = {"density": tuple(round(0.05 * i, 2) for i in range(1, 11)), "drop_rate": (0.1, 0.3, 0.5),
                "beta": (0.0, 0.25, 0.5, 0.75), "ridge": (0.003, 0.01, 0.03, 0.1)}
USES = {"density": {None, "ties", "dare_ties"}, "drop_rate": {None, "dare", "dare_ties"},  # which rules read a knob
        "ridge": {None, "wudi"}}
OUTPUT_RANK = 16  # every rank-limited output (mtc, ctm, PEFT's svd merges) in every set: the main set's rank
# mtc's default (exact) equals task_arithmetic; ctm's default rank is the largest input rank (8 for rsLoRA)
# mergekit's `ties` on adapters needs a rank (its dense result is full rank): the same one
FIXED = {"mtc": {"rank": OUTPUT_RANK}, "ctm": {"rank": OUTPUT_RANK}, "ties": {"rank": OUTPUT_RANK},
         "linear": {"lambda": (1.0,)}}
# Every combination_type of PEFT's add_weighted_adapter: the SVD family (rank-16 output), cat (the exact sum) and
# the factor-wise ones (A and B combined separately, rank 16 without an SVD).
PEFT_COMBINATIONS = ("svd", "ties_svd", "magnitude_prune_svd", "dare_ties_svd", "dare_linear_svd", "cat", "linear",
                     "ties", "magnitude_prune", "dare_ties", "dare_linear")
# Merges whose output keeps more than OUTPUT_RANK directions, re-run under ``rank_budget: OUTPUT_RANK`` (the
# engine's ``within_budget``: the parameters of rank 16 everywhere, spread over modules by spectrum).
BUDGET_BASES = ("tsv", "task_arithmetic", "iso_cts", "core_space[ties]", "knots[ties]", "wudi")


@dataclass
class Merged:
    """Per-module updates (LoraFactors or dense ΔW) with the merge wall time, output rank and fp16 size."""

    deltas: dict[str, LoraFactors | torch.Tensor]
    seconds: float
    rank: int
    size_mb: float


@dataclass
class Candidate:
    label: str
    source: str  # "lowrank_methods" or "peft"
    merge: Callable[[dict], Merged]
    fixed: dict = field(default_factory=dict)
    lambdas: tuple[float, ...] = LAMBDAS
    second_stage: dict[str, tuple] = field(default_factory=dict)
    fields: dict = field(default_factory=dict)  # the method's pydantic fields (their defaults start the search)
    primary: bool = True  # the method's default rule (False: another rule of the same merge space)


def load_factors(adapter_dirs: list[Path], dtype=torch.float32) -> dict[str, list[LoraFactors]]:
    """module -> one LoraFactors per adapter (rank 0 where an adapter lacks the module), over the engine's plan:
    the union of the adapters' modules in its order, layouts checked to agree."""
    sources = [AdapterSource.open(d) for d in adapter_dirs]
    plan = make_plan(sources)
    return {module: [src.read_module(module, dtype) if module in src.keys
                     else LoraFactors.zeros(plan.layouts[module].shape, dtype) for src in sources]
            for module in plan.modules}


def size_mb(factors: dict[str, LoraFactors]) -> float:
    return sum((f.shape[0] + f.shape[1]) * f.rank for f in factors.values()) * 2 / 1e6


# -- this package --------------------------------------------------------------------------------
def package_candidates(factors: dict[str, list[LoraFactors]], weights: list[float], *,
                       budget: bool = True) -> list[Candidate]:
    out = []
    for method in list_methods():
        if method.output == "bundle":
            continue
        fields = method.fields
        # Every rule of the merge spaces; mergekit's own names (task_arithmetic, linear) at their default rule only.
        rules = get_args(fields["rule"].annotation) if "rule" in fields and method.in_mergekit else (None,)
        fixed = dict(FIXED.get(method.name, {}))
        lambdas = fixed.pop("lambda", LAMBDAS)
        for rule in rules:
            values = {**fixed, **({"rule": rule} if rule else {})}
            effective = rule or (fields["rule"].default if "rule" in fields else None)
            stage = {k: v for k, v in SECOND_STAGE.items() if k in fields and effective in USES.get(k, {effective})
                     and not _no_effect(fields[k])}
            label = f"{method.name}[{rule}]" if rule else method.name
            primary = rule is None or rule == fields["rule"].default
            out.append(Candidate(label, "lowrank_methods", _package_merge(method, factors, weights), values, lambdas, stage,
                                 fields, primary))
    by_label = {c.label: c for c in out}
    for base in BUDGET_BASES if budget else ():
        if base in by_label:
            c = by_label[base]
            out.append(Candidate(f"{base}+budget{OUTPUT_RANK}", c.source, _within_budget(c.merge), c.fixed, c.lambdas,
                                 c.second_stage, c.fields, True))
    return out


def _within_budget(merge):
    def budgeted(values: dict) -> Merged:
        full = merge(values)
        t0 = time.perf_counter()
        kept = within_budget([(m, ModuleResult(f)) for m, f in full.deltas.items()], OUTPUT_RANK)
        deltas = {m: r.factors for m, r in kept}
        return Merged(deltas, full.seconds + time.perf_counter() - t0, max(f.rank for f in deltas.values()),
                      size_mb(deltas))

    return budgeted


def _no_effect(field) -> bool:
    """A parameter accepted only because mergekit's method of the same name takes it (e.g. task_arithmetic's density)."""
    return "does not change the result" in (field.description or "")


def _package_merge(method, factors, weights):
    def merge(values: dict) -> Merged:
        merged, seconds = {}, 0.0
        for module, fs in factors.items():
            params = method.parse_params(values)
            t0 = time.perf_counter()
            result = method(fs, weights, params, MethodContext(module))
            seconds += time.perf_counter() - t0
            merged[module] = result.factors
        return Merged(merged, seconds, max(f.rank for f in merged.values()), size_mb(merged))

    return merge


# -- PEFT's own code on the same adapters ---------------------------------------------------------------
class PeftPeers:
    """All adapters loaded into one PeftModel; each merge is ``add_weighted_adapter`` with weights [λ]·T."""

    def __init__(self, base_model: torch.nn.Module, adapter_dirs: list[Path]):
        from peft import PeftModel

        self.names = [f"a{i}" for i in range(len(adapter_dirs))]
        self.model = PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dirs[0], adapter_name=self.names[0])
        for name, d in zip(self.names[1:], adapter_dirs[1:]):
            self.model.load_adapter(d, adapter_name=name)
        self._count = 0

    def candidates(self) -> list[Candidate]:
        def pruned(c):  # PEFT has no default density; 0.2 as our rules
            return c.removesuffix("_svd") in ("ties", "magnitude_prune", "dare_ties", "dare_linear")

        return [Candidate(f"peft:{c}", "peft", self._merge(c), {"density": 0.2} if pruned(c) else {}, LAMBDAS,
                          {"density": SECOND_STAGE["density"]} if pruned(c) else {})
                for c in PEFT_COMBINATIONS]

    def _merge(self, combination: str):
        def merge(values: dict) -> Merged:
            from peft.tuners.lora import LoraLayer

            self._count += 1
            name = f"merged{self._count}"
            kwargs = {"svd_rank": OUTPUT_RANK, "svd_full_matrices": False} if combination.endswith("svd") else {}
            if "density" in values:
                kwargs["density"] = values["density"]
            torch.manual_seed(0)  # DARE's random drop: the same mask on every run
            t0 = time.perf_counter()
            self.model.add_weighted_adapter(self.names, [values["lambda"]] * len(self.names), name,
                                            combination_type=combination, **kwargs)
            seconds = time.perf_counter() - t0
            deltas = {}
            with torch.no_grad():
                for module_name, layer in self.model.base_model.model.named_modules():
                    if isinstance(layer, LoraLayer) and name in layer.lora_A:
                        deltas[module_name] = layer.get_delta_weight(name).detach().clone()
            rank = self.model.peft_config[name].r
            size = sum((d.shape[0] + d.shape[1]) * rank for d in deltas.values()) * 2 / 1e6
            self.model.delete_adapter(name)
            return Merged(deltas, seconds, rank, size)

        return merge

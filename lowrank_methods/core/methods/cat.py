"""cat: exact concatenation of the adapters (PEFT's ``combination_type="cat"``, LoRA Soups).

    B* = λ [w_1 B_1 … w_T B_T],  A* = [A_1; …; A_T]   ⇒   B* A* = λ Σ_t w_t ΔW_t   (rank Σ r_t)
"""

from __future__ import annotations

from lowrank_methods.core.linalg import stack_factors
from lowrank_methods.core.types import LoraFactors
from lowrank_methods.core.method import Paper, method
from lowrank_methods.core.params import ScaledParams
from lowrank_methods.core.types import ModuleResult


PAPER = Paper("prabhakar2024lorasoups", "LoRA Soups: Merging LoRAs for Practical Skill Composition Tasks",
              "Prabhakar, Akshara and others", 2024, "https://arxiv.org/abs/2410.13025")


@method("cat", pretty_name="Concatenation (exact)", paper=PAPER)
def cat(factors, weights, params: ScaledParams, ctx) -> ModuleResult:
    """Exact weighted sum by concatenating the factors; output rank is the sum of the input ranks."""
    B, A = stack_factors(factors, [params.lambda_ * w for w in weights])
    return ModuleResult(LoraFactors(A, B), {"rank": A.shape[0], "retained_energy": 1.0})

"""Properties every method in this suite shares: absent adapters change nothing, seeded determinism, devices."""

from __future__ import annotations

import pytest
import torch

from lowrank_methods.core.types import LoraFactors
from helpers import random_factors, run

D = torch.float64


def registry_cases() -> list[tuple[str, dict]]:
    """Every method that writes an adapter, with every rule it takes: (name, the fewest parameters it accepts).
    A method that refuses to run without ``rank`` (a dense rule: its result is full rank) gets ``rank: 4``."""
    from lowrank_methods.core.errors import RecipeError
    from lowrank_methods.core.method import list_methods

    cases = []
    for method in list_methods():
        if method.output != "adapter":
            continue
        for rule in method.variants or [None]:
            params = {"rule": rule} if rule else {}
            try:
                method.parse_params(params)
            except RecipeError:
                params = {**params, "rank": 4}
                method.parse_params(params)  # anything else a method needs: say it here
            cases.append((method.name, params))
    return cases


CASES = registry_cases()
NAMES = [f"{name}-{params.get('rule', '')}" for name, params in CASES]


def test_every_adapter_method_is_a_case():
    from lowrank_methods.core.method import list_methods

    assert {name for name, _ in CASES} == {m.name for m in list_methods() if m.output == "adapter"}


@pytest.mark.parametrize("name,params", CASES, ids=NAMES)
def test_an_absent_adapter_changes_nothing(name, params):
    from lowrank_methods.core.method import get_method

    if getattr(get_method(name).parse_params(params), "normalize", False):
        pytest.skip("normalize divides by the sum of every adapter's weight, as mergekit does: an absent one counts")
    fs = random_factors((3, 3, 3), seed=41)
    zero = LoraFactors.zeros(fs[0].shape, D)
    a = run(name, fs, [1.0, 0.5, 2.0], **params).factors.dense()
    b = run(name, [fs[0], zero, fs[1], fs[2]], [1.0, 3.0, 0.5, 2.0], **params).factors.dense()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    out = run(name, [zero, zero], **params)
    assert out.factors.rank == 0 and out.factors.shape == fs[0].shape and out.stats["rank"] == 0


@pytest.mark.parametrize("name,params", CASES, ids=NAMES)
def test_same_inputs_and_seed_give_bit_identical_factors(name, params):
    fs = random_factors((3, 3, 3), seed=42)
    fs32 = [f.to(dtype=torch.float32) for f in fs]
    a, b = run(name, fs32, **params).factors, run(name, fs32, **params).factors
    assert a.A.dtype == torch.float32 and torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


@pytest.mark.gpu
@pytest.mark.parametrize("name,params", CASES, ids=NAMES)
def test_methods_run_on_cuda_where_their_inputs_are(name, params):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fs = random_factors((3, 3, 3), seed=43)
    params = {**params, "drop_rate": 0.0} if "dare" in params.get("rule", "") else params
    cpu = run(name, fs, **params).factors.dense()
    gpu = run(name, [f.to("cuda") for f in fs], **params).factors
    assert gpu.A.device.type == "cuda"
    torch.testing.assert_close(gpu.dense().cpu(), cpu, rtol=0, atol=1e-9)

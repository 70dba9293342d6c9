"""Properties every method in this suite shares: absent adapters change nothing, seeded determinism, devices."""

from __future__ import annotations

import pytest
import torch

from lowrank_methods.core.types import LoraFactors
from test_methods_core_space import random_factors, run

D = torch.float64
CASES = [
    ("core_space", {"rule": "ties"}), ("core_space", {"rule": "dare_ties"}), ("core_space", {"rule": "iso_cts"}),
    ("ctm", {"rule": "ties", "rank": 3}), ("ctm", {"rule": "dare", "rank": 3}), ("ctm", {"rule": "tsv", "rank": 3}),
    ("knots", {"rule": "ties"}), ("knots", {"rule": "dare_ties"}), ("tsv", {}), ("iso_c", {}), ("iso_cts", {}),
    ("mtc", {"rule": "ties", "rank": 4}), ("mtc", {"rule": "dare_ties", "rank": 4}), ("mtc", {"rule": "iso_c"}),
    ("linear_factors", {}),
]


@pytest.mark.parametrize("name,params", CASES)
def test_an_absent_adapter_changes_nothing(name, params):
    fs = random_factors((3, 3, 3), seed=41)
    zero = LoraFactors.zeros(fs[0].shape, D)
    a = run(name, fs, [1.0, 0.5, 2.0], **params).factors.dense()
    b = run(name, [fs[0], zero, fs[1], fs[2]], [1.0, 3.0, 0.5, 2.0], **params).factors.dense()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    out = run(name, [zero, zero], **params)
    assert out.factors.rank == 0 and out.factors.shape == fs[0].shape and out.stats["rank"] == 0


@pytest.mark.parametrize("name,params", CASES)
def test_same_inputs_and_seed_give_bit_identical_factors(name, params):
    fs = random_factors((3, 3, 3), seed=42)
    fs32 = [f.to(dtype=torch.float32) for f in fs]
    a, b = run(name, fs32, **params).factors, run(name, fs32, **params).factors
    assert a.A.dtype == torch.float32 and torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


@pytest.mark.gpu
@pytest.mark.parametrize("name,params", CASES)
def test_methods_run_on_cuda_where_their_inputs_are(name, params):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fs = random_factors((3, 3, 3), seed=43)
    params = {**params, "drop_rate": 0.0} if "dare" in params.get("rule", "") else params
    cpu = run(name, fs, **params).factors.dense()
    gpu = run(name, [f.to("cuda") for f in fs], **params).factors
    assert gpu.A.device.type == "cuda"
    torch.testing.assert_close(gpu.dense().cpu(), cpu, rtol=0, atol=1e-9)

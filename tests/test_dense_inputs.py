"""Our methods on mergekit's dense API (``merge_state_dicts``): their full-model forms (``mergekit_plugin/dense.py``).

Every method we register in mergekit is checked against a reference written here from the papers' definitions in
numpy (float64, 3 tasks, 12×8 and 8×12), to 1e-8: TSV-M, Iso-C, Iso-CTS, TIES, Core Space and KnOTS on exactly
factored deltas, the weighted sums. CtM (an iterative Tucker-2) is checked as "dense form = our factor method on
rank-r SVD factors computed here", plus two of its defining properties. Inputs must come back unmodified.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_methods.core.types import MethodContext
from lowrank_methods.core.errors import MergeError, RecipeError
from lowrank_methods.core.types import LoraFactors
from lowrank_methods.core.method import get_method, list_methods

OURS = sorted(m.name for m in list_methods() if m.in_mergekit)
W = [0.7, 1.3, 0.5]
LAM = 0.8
SHAPES = {"q.weight": (12, 8), "o.weight": (8, 12)}


@pytest.fixture
def mk(patched):
    from mergekit.merge_methods import merge_state_dicts

    return merge_state_dicts


def models(seed=0, shapes=SHAPES, low_rank=None):
    """A base θ0 and 3 fine-tunes θ_t = θ0 + Δ_t (float64), with a bias, a scalar and a 3-D tensor."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(tuple(shape), generator=g, dtype=torch.float64)

    base = {k: rnd(*s) for k, s in shapes.items()}
    base.update({"q.bias": rnd(8), "scale": rnd(), "conv.weight": rnd(2, 3, 4)})
    tuned = []
    for _ in range(3):
        m = {}
        for k, v in base.items():
            if v.ndim == 2 and low_rank:
                d = rnd(v.shape[0], low_rank) @ rnd(low_rank, v.shape[1])
            else:
                d = rnd(*v.shape)
            m[k] = v + d
        tuned.append(m)
    return base, tuned


def run(mk, name, base, tuned, weights=W, **params):
    inputs = ([base] if base is not None else []) + tuned
    w = weights if base is None else {i + 1: x for i, x in enumerate(weights)}
    return mk(inputs, name, base=0 if base is not None else None, parameters={"weight": w, **params})


# -- independent references (numpy, from the papers' definitions) ---------------------------------------------------
def svd(x):
    U, S, Vh = np.linalg.svd(x, full_matrices=False)
    k = int((S > max(x.shape) * np.finfo(float).eps * S.max()).sum()) if S.size and S.max() > 0 else 0
    return U[:, :k], S[:k], Vh[:k]


def polar(x):
    U, _, Vh = np.linalg.svd(x, full_matrices=False)
    return U @ Vh


def best_rank(x, k):
    U, S, Vh = svd(x)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def ties_ref(X, density, by="total"):
    """TIES (Yadav et al.): trim each task to its top-`density` magnitudes, elect the sign, disjoint mean."""
    Y = []
    for x in X:
        k = max(1, int(density * x.size))
        thr = np.sort(np.abs(x).ravel())[::-1][k - 1]
        Y.append(np.where(np.abs(x) >= thr, x, 0.0))
    Y = np.stack(Y)
    votes = Y.sum(0) if by == "total" else np.sign(Y).sum(0)
    sign = np.where(votes >= 0, 1.0, -1.0)
    agree = np.sign(Y) == sign
    return (Y * agree).sum(0) / np.maximum(agree.sum(0), 1)


def tsv_ref(X, k):
    """TSV-M (Gargiulo et al.): top-k triplets per task, U and V whitened (orthogonalised by SVD) before summing."""
    parts = [svd(x) for x in X]
    U = np.hstack([u[:, :k] for u, _, _ in parts])
    S = np.concatenate([s[:k] for _, s, _ in parts])
    V = np.vstack([vh[:k] for _, _, vh in parts])
    return (polar(U) * S) @ polar(V)


def iso_c_ref(X):
    """Iso-C (Marczak et al.): the task-arithmetic sum with every singular value replaced by their mean."""
    U, S, Vh = svd(X.sum(0))
    return S.mean() * U @ Vh


def iso_cts_ref(X, f=0.8):
    """Iso-CTS: top-k_c common directions of the sum, round((D−k_c)/T) per task from the residual outside them,
    both bases orthogonalised, spectrum flattened to the mean of every kept singular value."""
    T = len(X)
    U, S, Vh = svd(X.sum(0))
    D = S.size
    k_c = int(D * f)
    s = min(round((D - k_c) / T), D // T)
    k_c = D - s * T
    us, ss, vs = [U[:, :k_c]], [S[:k_c]], [Vh[:k_c]]
    Uc = U[:, :k_c]
    for x in X:
        u, sig, vh = svd(x - Uc @ (Uc.T @ x))
        us.append(u[:, :s]), ss.append(sig[:s]), vs.append(vh[:s])
    return np.concatenate(ss).mean() * polar(np.hstack(us)) @ polar(np.vstack(vs))


def wudi_ref(X, ridge=0.01):
    """WUDI-Merging (Cheng et al.) with a ridge: each row x of X* by least squares on Σ_t ‖(x − x_t) X_tᵀ‖²/‖X_t‖²
    + μ‖x − Σ_t x_t‖², μ = ridge · T / rank(Σ_t X_tᵀX_t/‖X_t‖²) (the mean nonzero eigenvalue)."""
    n = [np.square(x).sum() for x in X]
    G = sum(x.T @ x / nt for x, nt in zip(X, n))
    mu = ridge * len(X) / np.linalg.matrix_rank(G)
    M = np.hstack([x.T / np.sqrt(nt) for x, nt in zip(X, n)] + [np.sqrt(mu) * np.eye(X.shape[2])])
    rows = [np.hstack([X[t, i] @ X[t].T / np.sqrt(n[t]) for t in range(len(X))] + [np.sqrt(mu) * X[:, i].sum(0)])
            for i in range(X.shape[1])]
    return np.stack([np.linalg.lstsq(M.T, b, rcond=None)[0] for b in rows])


def balanced(d, r=None):
    """Exact SVD factors of d, B = U√S, A = √S Vᵀ (its top r components when r is given)."""
    U, S, Vh = svd(d)
    if r is not None:
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    return U * np.sqrt(S), np.sqrt(S)[:, None] * Vh


def core_space_ref(deltas, w, rule):
    """Core Space (Panariello et al.): U_B = lsv[w_t B_t], V_A = rsv[A_t], M_t = U_Bᵀ w_t Δ_t V_Aᵀ,
    ΔW = U_B f(M) V_A."""
    fs = [balanced(d) for d in deltas]
    UB = svd(np.hstack([wt * B for wt, (B, _) in zip(w, fs)]))[0]
    VA = svd(np.vstack([A for _, A in fs]))[2]
    M = np.stack([UB.T @ (wt * d) @ VA.T for wt, d in zip(w, deltas)])
    for wt, d, m in zip(w, deltas, M):  # lossless
        np.testing.assert_allclose(UB @ m @ VA, wt * d, atol=1e-10)
    return UB @ rule(M) @ VA


def knots_ref(deltas, w, rule):
    """KnOTS (Stoica et al.): [w_1Δ_1 … w_TΔ_T] = U Σ [V_1ᵀ … V_Tᵀ], ΔW = U f(ΣV_1ᵀ … ΣV_Tᵀ)."""
    n = deltas[0].shape[1]
    U, S, Vh = svd(np.hstack([wt * d for wt, d in zip(w, deltas)]))
    V = np.stack([S[:, None] * Vh[:, t * n:(t + 1) * n] for t in range(len(deltas))])
    return U @ rule(V)


def weighted(deltas, w):
    return np.stack([wt * d for wt, d in zip(w, deltas)])


REFERENCES = {  # name -> (parameters, reference update from the deltas and weights)
    "cat": ({"lambda": LAM}, lambda D, w: LAM * weighted(D, w).sum(0)),
    "linear_factors": ({"lambda": LAM}, lambda D, w: LAM * weighted(D, w).sum(0)),
    "mtc": ({"lambda": LAM}, lambda D, w: LAM * weighted(D, w).sum(0)),
    "tsv": ({"lambda": LAM}, lambda D, w: LAM * tsv_ref(weighted(D, w), min(D[0].shape) // 3)),
    "iso_c": ({"lambda": LAM}, lambda D, w: LAM * iso_c_ref(weighted(D, w))),
    "iso_cts": ({"lambda": LAM}, lambda D, w: LAM * iso_cts_ref(weighted(D, w))),
    "wudi": ({"lambda": LAM, "ridge": 0.05}, lambda D, w: LAM * wudi_ref(weighted(D, w), 0.05)),
    "core_space": ({"lambda": LAM, "density": 0.5},
                   lambda D, w: LAM * core_space_ref(D, w, lambda M: ties_ref(M, 0.5))),
    "knots": ({"lambda": LAM, "density": 0.5}, lambda D, w: LAM * knots_ref(D, w, lambda V: ties_ref(V, 0.5))),
    "rmm": ({}, lambda D, w: weighted(D, w).sum(0) / sum(w)),
    "ctm": None,  # iterative (HOOI): see test_ctm_is_our_factor_method_on_rank_r_factors
}

EXTRA = [  # (method, parameters, reference)
    ("mtc", {"rank": 3}, lambda D, w: best_rank(weighted(D, w).sum(0), 3)),
    ("mtc", {"normalize": True}, lambda D, w: weighted(D, w).sum(0) / sum(w)),
    ("mtc", {"rule": "ties", "density": 0.4}, lambda D, w: ties_ref(weighted(D, w), 0.4)),  # no rank needed dense
    ("mtc", {"rule": "ties", "density": 0.4, "majority_sign_method": "frequency", "rank": 5},
     lambda D, w: best_rank(ties_ref(weighted(D, w), 0.4, "frequency"), 5)),
    ("mtc", {"rule": "iso_c"}, lambda D, w: iso_c_ref(weighted(D, w))),  # (a flat spectrum has no best rank-k)
    ("mtc", {"rule": "tsv"}, lambda D, w: tsv_ref(weighted(D, w), min(D[0].shape) // 3)),
    ("tsv", {"tsv_components": 1, "rank": 2}, lambda D, w: best_rank(tsv_ref(weighted(D, w), 1), 2)),
    ("iso_cts", {"common_space_fraction": 0.3}, lambda D, w: iso_cts_ref(weighted(D, w), 0.3)),  # 2 per task
    ("core_space", {"rule": "ta", "rank": 4}, lambda D, w: best_rank(weighted(D, w).sum(0), 4)),
    ("core_space", {"rule": "iso_c"}, lambda D, w: iso_c_ref(weighted(D, w))),  # core-space Iso-C = dense Iso-C
    ("core_space", {"rule": "wudi"}, lambda D, w: wudi_ref(weighted(D, w))),  # and WUDI
    ("mtc", {"rule": "wudi", "ridge": 1.0, "rank": 3}, lambda D, w: best_rank(wudi_ref(weighted(D, w), 1.0), 3)),
    ("knots", {"rule": "ta"}, lambda D, w: weighted(D, w).sum(0)),
    ("knots", {"scale_by_sigma": False, "density": 0.3},
     lambda D, w: _knots_unscaled(D, w, 0.3)),
]


def _knots_unscaled(deltas, w, density):
    n = deltas[0].shape[1]
    U, S, Vh = svd(np.hstack([wt * d for wt, d in zip(w, deltas)]))
    V = np.stack([Vh[:, t * n:(t + 1) * n] for t in range(len(deltas))])
    return (U * S) @ ties_ref(V, density)


def test_every_registered_method_has_a_reference():
    assert set(REFERENCES) == set(OURS)


def _check(mk, name, params, reference, *, base=True, seed=0, low_rank=None):
    theta0, tuned = models(seed, low_rank=low_rank)
    copies = [{k: v.clone() for k, v in m.items()} for m in [theta0] + tuned]
    out = run(mk, name, theta0 if base else None, tuned if base else [{k: v - theta0[k] for k, v in m.items()}
                                                                       for m in tuned], **params)
    for m, c in zip([theta0] + tuned, copies):  # inputs untouched
        assert all(torch.equal(m[k], c[k]) for k in m)
    for key in SHAPES:
        deltas = [(m[key] - theta0[key]).numpy() for m in tuned]
        expected = reference(deltas, W) + (theta0[key].numpy() if base else 0.0)
        got = out[key]
        assert got.dtype == torch.float64 and got.shape == theta0[key].shape and torch.isfinite(got).all()
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-8, err_msg=f"{name} {params} {key}")
    lam = 1.0 if name == "rmm" else params.get("lambda", 1.0)
    norm = sum(W) if name == "rmm" or params.get("normalize") else 1.0
    for key in ("q.bias", "scale", "conv.weight"):  # not matrices: weighted task arithmetic
        ta = sum(w * (m[key] - theta0[key]) for w, m in zip(W, tuned)) * lam / norm
        torch.testing.assert_close(out[key], (theta0[key] if base else 0.0) + ta, rtol=0, atol=1e-12)
        assert out[key].shape == theta0[key].shape


@pytest.mark.parametrize("name", [n for n in OURS if REFERENCES.get(n)])
def test_dense_form_matches_the_papers_definition(mk, name):
    params, reference = REFERENCES[name]
    _check(mk, name, params, reference)


@pytest.mark.parametrize("case", EXTRA, ids=[f"{n}-{'-'.join(map(str, p.values()))}" for n, p, _ in EXTRA])
def test_dense_form_with_parameters(mk, case):
    name, params, reference = case
    _check(mk, name, params, reference, seed=1)


@pytest.mark.parametrize("name", [n for n in OURS if REFERENCES.get(n)])
def test_no_base_means_the_inputs_are_the_task_vectors(mk, name):
    params, reference = REFERENCES[name]
    _check(mk, name, params, reference, base=False, seed=2)


@pytest.mark.parametrize("name", [n for n in OURS if REFERENCES.get(n)])
def test_rank_deficient_deltas(mk, name):
    """Dense LoRA updates (rank 2 each): the rank-aware forms; the reference SVDs keep the nonzero part only."""
    params, reference = REFERENCES[name]
    if name == "tsv":  # k = ⌊8/3⌋ = 2 = each task's rank
        reference = lambda D, w: LAM * tsv_ref(weighted(D, w), 2)  # noqa: E731
    _check(mk, name, params, reference, seed=3, low_rank=2)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "wudi", "core_space", "knots", "mtc"])
def test_dense_form_is_the_factor_method_on_exact_factors(mk, name):
    """What the adapter route computes for adapters whose updates are these deltas (dense LoRA updates)."""
    params = {"mtc": {"rule": "ties", "rank": 6}}.get(name, {})
    theta0, tuned = models(4, low_rank=3)
    out = run(mk, name, theta0, tuned, **params)
    method = get_method(name)
    for key in SHAPES:
        fs = [LoraFactors(*(torch.from_numpy(x) for x in balanced((m[key] - theta0[key]).numpy())[::-1]))
              for m in tuned]
        ref = method(fs, W, method.parse_params(params), MethodContext(key)).factors.dense()
        torch.testing.assert_close(out[key], theta0[key] + ref, rtol=0, atol=1e-8)


def _structured(seed, m=12, n=8, shared=3):
    """Deltas sharing a rank-3 row/column subspace plus a weaker rank-1 task-specific part (a well-posed Tucker-2)."""
    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(m, shared, generator=g, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(n, shared, generator=g, dtype=torch.float64))[0]
    return [P @ torch.randn(shared, shared, generator=g, dtype=torch.float64) @ Q.T * 3
            + 0.1 * torch.randn(m, 1, generator=g, dtype=torch.float64) @ torch.randn(1, n, generator=g,
                                                                                      dtype=torch.float64)
            for _ in range(3)]


@pytest.mark.parametrize("rule", ["ties", "ta", "tsv"])
def test_ctm_is_our_factor_method_on_rank_r_factors(mk, rule):
    deltas = _structured(5)
    copies = [d.clone() for d in deltas]
    params = {"rank": 3, "rule": rule, "tol": 1e-14, "max_iter": 5000, "lambda": LAM}
    out = mk([{"w": d} for d in deltas], "ctm", parameters={"weight": W, **params})["w"]
    assert all(torch.equal(d, c) for d, c in zip(deltas, copies))
    method = get_method("ctm")
    fs = [LoraFactors(*(torch.from_numpy(x) for x in balanced(d.numpy(), 3)[::-1])) for d in deltas]
    ref = method(fs, W, method.parse_params(params), MethodContext("w")).factors.dense()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-8)
    assert torch.linalg.matrix_rank(out) <= 3  # rank ≤ r by construction


def test_ctm_ta_at_full_rank_is_task_arithmetic(mk):
    """Defining property: with r ≥ the rank of the stacked updates, CtM-TA is λ Σ w_t Δ_t exactly."""
    theta0, tuned = models(6, low_rank=2)
    out = run(mk, "ctm", theta0, tuned, rule="ta", rank=6, **{"lambda": LAM})
    for key in SHAPES:
        ta = LAM * sum(w * (m[key] - theta0[key]) for w, m in zip(W, tuned))
        torch.testing.assert_close(out[key], theta0[key] + ta, rtol=0, atol=1e-10)


def test_ctm_rank_truncates_each_delta_first(mk):
    """CtM on dense deltas runs on the rank-r SVD of each: deltas already of rank ≤ r come out as with rank unset."""
    theta0, tuned = models(7, low_rank=2)
    a = run(mk, "ctm", theta0, tuned, rank=2, rule="ta")
    b = run(mk, "ctm", theta0, tuned, rule="ta")  # unset: each delta's numerical rank (2): the same factors
    for key in SHAPES:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-10)


def test_rmm_is_the_weighted_average_whatever_the_base(mk):
    theta0, tuned = models(8)
    with_base = run(mk, "rmm", theta0, tuned)
    without = run(mk, "rmm", None, tuned)
    for key in theta0:
        avg = sum(w * m[key] for w, m in zip(W, tuned)) / sum(W)
        torch.testing.assert_close(with_base[key], avg, rtol=0, atol=1e-12)
        torch.testing.assert_close(without[key], avg, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:mergekit-lowrank.*does not read")  # mtc's rule ta reads no density
@pytest.mark.parametrize("name", OURS)
def test_strided_float32_inputs_as_mergekit_passes_them(mk, name):
    """mergekit's generic check (its parameters, transposed 6×4 views): finite, layout-independent, unmodified."""
    g = torch.Generator().manual_seed(42)
    tensors = [torch.randn(4, 6, generator=g).T for _ in range(3)]
    copies = [t.clone() for t in tensors]
    declared = {p.name for p in _spec(name).parameters}
    params = {"weight": 1.0, **({"density": 0.7} if "density" in declared else {})}
    strided = mk([{"w": t} for t in tensors], name, base=0, parameters=params)["w"]
    contiguous = mk([{"w": t.contiguous()} for t in tensors], name, base=0, parameters=params)["w"]
    assert strided.dtype == torch.float32 and strided.shape == (6, 4) and strided.isfinite().all()
    torch.testing.assert_close(strided, contiguous)
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies))


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("shape", [(300, 8), (8, 300)])
def test_embedding_shaped_and_half_precision_tensors(mk, name, shape):
    g = torch.Generator().manual_seed(9)
    base = torch.randn(*shape, generator=g).to(torch.bfloat16)
    tuned = [(base.float() + 0.1 * torch.randn(*shape, generator=g)).to(torch.bfloat16) for _ in range(2)]
    out = mk([{"embed": t} for t in [base] + tuned], name, base=0, parameters={"weight": [0.6, 0.4]})["embed"]
    assert out.dtype == torch.bfloat16 and out.shape == shape and torch.isfinite(out).all()


def test_parameters_are_validated_by_the_methods_own_model(mk):
    theta0, tuned = models(10)
    with pytest.raises(RecipeError, match=r"bad parameters for method 'tsv'.*rank") as e:
        run(mk, "tsv", theta0, tuned, rank=-2)
    assert "\n" not in str(e.value)
    with pytest.raises(RecipeError, match="rule"):
        run(mk, "core_space", theta0, tuned, rule="median")
    with pytest.raises(RecipeError, match="output"):
        run(mk, "cat", theta0, tuned, output="adapter")
    with pytest.raises(TypeError, match="Unknown parameter.*lambda"):  # rmm declares no lambda: mergekit refuses it
        run(mk, "rmm", theta0, tuned, **{"lambda": 0.5})
    with pytest.raises(RecipeError, match="> 0"):
        run(mk, "rmm", theta0, tuned, weights=[1.0, -1.0, 1.0])
    with pytest.raises(RecipeError, match="weight"):
        run(mk, "cat", theta0, tuned, weights=[1.0, float("nan"), 1.0])
    bad = [{k: v.clone() for k, v in m.items()} for m in tuned]
    bad[1]["q.weight"][0, 0] = float("inf")
    with pytest.raises(MergeError, match="NaN or Inf"):
        run(mk, "tsv", theta0, bad)
    run(mk, "mtc", theta0, tuned, output="model")  # the one output a dense merge gives


def _spec(name):
    from mergekit.merge_methods import get

    return get(name).spec


@pytest.mark.parametrize("name", ["cat", "linear_factors", "mtc", "rmm"])
def test_linear_forms_keep_autograd(mk, name):
    """mergekit's API keeps autograd connections: through the linear forms the gradients are the coefficients."""
    g = torch.Generator().manual_seed(11)
    ts = [torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    lam = {} if name == "rmm" else {"lambda": LAM}
    out = mk([{"w": t} for t in ts], name, base=0, parameters={"weight": W[:2], **lam})["w"]
    out.sum().backward()
    coeffs = [w / sum(W[:2]) for w in W[:2]] if name == "rmm" else [LAM * w for w in W[:2]]
    for t, c in zip(ts[1:], coeffs):
        torch.testing.assert_close(t.grad, torch.full_like(t, c))
    torch.testing.assert_close(ts[0].grad, torch.full_like(ts[0], 1 - sum(coeffs)))

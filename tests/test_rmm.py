"""rmm (Reversible Model Merging): exact reconstruction, p = 0 averaging, the PCA itself, storage, refusals (float64)."""

import json

import pytest
import torch
from click.testing import CliRunner

from helpers import dense_delta, merged_delta, write_adapter, write_recipe
from lowrank_methods.formats.bundle import ReversibleBundle, paper_ratio
from lowrank_methods.cli import main
from lowrank_methods.pipeline.engine import run_merge
from lowrank_methods.core.errors import MergeError
from lowrank_methods.pipeline.recipe import load_recipe

Q0, D0, V1 = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"
EMB = "model.embed_tokens"
F64 = torch.float64


@pytest.fixture
def mixed(tmp_path):
    """Four adapters: mixed ranks, rsLoRA, rank/alpha patterns, an embedding, a module only some adapters have."""
    return [
        write_adapter(tmp_path / "a", {Q0: (24, 16), D0: (16, 40)}, r=4, alpha=8, seed=1, dtype=F64),
        write_adapter(tmp_path / "b", {Q0: (24, 16), D0: (16, 40), V1: (8, 16)}, r=6, alpha=3, seed=2, rslora=True,
                      rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 5}, dtype=F64),
        write_adapter(tmp_path / "c", {Q0: (24, 16), V1: (8, 16)}, r=3, alpha=3, seed=3, embeddings={EMB: (50, 16)}, dtype=F64),
        write_adapter(tmp_path / "d", {Q0: (24, 16), D0: (16, 40)}, r=5, alpha=10, seed=4, dtype=F64),
    ]


def bundle_of(tmp_path, adapters, name="out", **params):
    recipe = write_recipe(tmp_path / f"{name}.yml", "rmm", [(p, None) for p in adapters], params, dtype="float64")
    report = run_merge(load_recipe(recipe), tmp_path / name, precision="float64", quiet=True, write_card=False)
    return ReversibleBundle.load(tmp_path / name), report


def rel(got, ref):
    return float((got - ref).norm() / ref.norm())


@pytest.mark.parametrize("center,p,gauge", [(True, 3, "balanced"), (False, 4, "balanced"), (True, 3, "raw")])
def test_every_task_comes_back_exactly(tmp_path, mixed, center, p, gauge):
    bundle, report = bundle_of(tmp_path, mixed, p=p, center=center, gauge=gauge)
    assert bundle.tasks == ["a", "b", "c", "d"]
    for path in mixed:
        factors = bundle.adapter(path.name)
        for module in (Q0, D0, V1, EMB):
            if merged_delta(path, module) is None:
                assert module not in factors
                continue
            ref = dense_delta(path, module)
            assert rel(factors[module].dense(), ref) <= 1e-10, (path.name, module)
        assert bundle.manifest["tasks"][bundle.task_index(path.name)]["error"] <= 1e-10
    assert report.modules[Q0]["retained_energy"] == pytest.approx(1.0)


def test_reconstructed_adapter_keeps_ranks_and_scale_one(tmp_path, mixed):
    bundle, _ = bundle_of(tmp_path, mixed, p=3)
    out = bundle.write_adapter("b", tmp_path / "b-back")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 6 and config["rank_pattern"] == {r"model\.layers\.0\.mlp\.down_proj": 2}
    assert not config["use_rslora"]
    for module in (Q0, D0, V1):
        assert rel(merged_delta(out, module), dense_delta(mixed[1], module)) <= 1e-10
    assert merged_delta(out, EMB) is None


def balanced_dense(delta, r):
    """Reference gauge: dense SVD, B = U√S, A = √S Vᵀ, largest-|entry| of each U column positive, zero-padded to r."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    for k in range(r):
        if U[U[:, k].abs().argmax(), k] < 0:
            U[:, k], Vh[k] = -U[:, k], -Vh[k]
    return U * S.sqrt(), S.sqrt()[:, None] * Vh


@pytest.fixture
def same_rank(tmp_path):
    return [write_adapter(tmp_path / f"t{i}", {Q0: (24, 16), V1: (8, 16)}, r=4, alpha=4 + i, seed=10 + i, dtype=F64)
            for i in range(5)]


def test_p0_is_the_mean_of_the_balanced_factors(tmp_path, same_rank):
    bundle, _ = bundle_of(tmp_path, same_rank, p=0)
    for module in (Q0, V1):
        pairs = [balanced_dense(dense_delta(p, module), 4) for p in same_rank]
        B = sum(b for b, _ in pairs) / len(pairs)
        A = sum(a for _, a in pairs) / len(pairs)
        for path in same_rank:
            assert rel(bundle.adapter(path.name)[module].dense(), B @ A) <= 1e-10


def test_p0_with_raw_gauge_is_the_mean_of_the_adapters_factors(tmp_path, same_rank):
    from safetensors.torch import load_file

    bundle, _ = bundle_of(tmp_path, same_rank, p=0, gauge="raw")
    for module in (Q0, V1):
        raw = [load_file(str(p / "adapter_model.safetensors")) for p in same_rank]
        scales = [(4 + i) / 4 for i in range(len(same_rank))]  # alpha / r of the fixture
        B = sum(s * t[f"base_model.model.{module}.lora_B.weight"] for s, t in zip(scales, raw)) / len(raw)
        A = sum(t[f"base_model.model.{module}.lora_A.weight"] for t in raw) / len(raw)
        for path in same_rank:
            assert rel(bundle.adapter(path.name)[module].dense(), B @ A) <= 1e-10


def test_intermediate_p_is_the_per_position_pca(tmp_path, same_rank):
    weights = [1.0, 2.0, 0.5, 1.0, 3.0]
    recipe = write_recipe(tmp_path / "w.yml", "rmm", list(zip(same_rank, weights)), {"p": 2}, dtype="float64")
    run_merge(load_recipe(recipe), tmp_path / "w", precision="float64", quiet=True, write_card=False)
    bundle = ReversibleBundle.load(tmp_path / "w")
    w = torch.tensor(weights, dtype=F64)
    for module in (Q0, V1):
        pairs = [balanced_dense(dense_delta(p, module), 4) for p in same_rank]
        got = [bundle.adapter(p.name)[module] for p in same_rank]
        for X, G in ((torch.stack([b for b, _ in pairs], 1), torch.stack([g.B for g in got], 1)),
                     (torch.stack([a.T for _, a in pairs], 1), torch.stack([g.A.T for g in got], 1))):
            for i in range(X.shape[0]):  # one position at a time: weighted PCA by eigendecomposition of the covariance
                mu = (w[:, None] * X[i]).sum(0) / w.sum()
                Y = X[i] - mu
                evals, evecs = torch.linalg.eigh(Y.T @ (w[:, None] * Y))
                U = evecs[:, -2:]
                ref = mu + (Y @ U) @ U.T
                assert torch.allclose(G[i], ref, atol=1e-10 * (1 + float(X[i].abs().max()))), (module, i)


def test_storage_matches_the_formula(tmp_path):
    modules = {f"model.layers.{i}.self_attn.q_proj": (192, 192) for i in range(3)}
    adapters = [write_adapter(tmp_path / f"s{t}", modules, r=16, alpha=16, seed=t) for t in range(8)]
    recipe = write_recipe(tmp_path / "s.yml", "rmm", [(p, None) for p in adapters], {"p": 1})
    run_merge(load_recipe(recipe), tmp_path / "s", quiet=True, write_card=False)
    storage = json.loads((tmp_path / "s" / "reversible.json").read_text())["storage"]
    assert paper_ratio(1, 16, 8) == 0.3125
    assert storage["ratio"] == storage["paper_ratio"] == 0.3125
    raw = (tmp_path / "s" / "bundle.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert len(raw) - 8 - header == storage["stored_numbers"] * 4  # float32 numbers, nothing else
    assert storage["bundle_bytes"] == len(raw)
    assert storage["inputs_bytes"] == sum((p / "adapter_model.safetensors").stat().st_size for p in adapters)
    assert storage["ratio_bytes"] == pytest.approx(0.3125, abs=0.01)


def test_cli_prints_the_table_and_reconstructs(tmp_path, same_rank):
    recipe = write_recipe(tmp_path / "c.yml", "rmm", [(p, None) for p in same_rank], {"p": 4}, dtype="float64")
    result = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "c"), "--precision", "float64"])
    assert result.exit_code == 0, result.output
    assert "p=4 (centred)" in result.output and all(p.name in result.output for p in same_rank)
    result = CliRunner().invoke(main, ["reconstruct", str(tmp_path / "c"), "t3", str(tmp_path / "t3-back")])
    assert result.exit_code == 0, result.output
    assert rel(merged_delta(tmp_path / "t3-back", Q0), dense_delta(same_rank[3], Q0)) <= 1e-10


# -- refusals: one clear line each, nothing written ------------------------------------------------------------------

def test_refuses_p_larger_than_possible(tmp_path, same_rank):
    with pytest.raises(MergeError, match="p=5 is larger than possible for 5 adapters"):
        bundle_of(tmp_path, same_rank, name="big", p=5)
    assert not (tmp_path / "big").exists() and not list(tmp_path.glob(".big*"))
    bundle_of(tmp_path, same_rank, name="ok", p=5, center=False)  # uncentred, T directions are allowed


def test_refuses_unknown_task(tmp_path, same_rank):
    bundle_of(tmp_path, same_rank, p=1)
    result = CliRunner().invoke(main, ["reconstruct", str(tmp_path / "out"), "nope", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: bundle {tmp_path / 'out'} has no task 'nope'; it holds: t0, t1, t2, t3, t4"]
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "bundle.safetensors").write_bytes(_flip((d / "bundle.safetensors").read_bytes())), "does not match the checksum"),
    (lambda d: (d / "bundle.safetensors").unlink(), "has no bundle.safetensors"),
    (lambda d: (d / "reversible.json").write_text("{not json"), "reversible.json is not valid JSON"),
    (lambda d: (d / "reversible.json").unlink(), "is not a reversible bundle"),
    (lambda d: _edit_manifest(d, lambda m: m["modules"][Q0].update(p=3)), "tensor basis_B is shape"),
    (lambda d: _edit_manifest(d, lambda m: m["modules"][Q0].pop("layout")), "reversible.json is malformed"),
])
def test_refuses_corrupted_bundle(tmp_path, same_rank, damage, message):
    bundle_of(tmp_path, same_rank, p=2)
    damage(tmp_path / "out")
    result = CliRunner().invoke(main, ["reconstruct", str(tmp_path / "out"), "t0", str(tmp_path / "t0-back")])
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "t0-back").exists()


def _flip(raw: bytes) -> bytes:
    return raw[:-3] + bytes([raw[-3] ^ 0xFF]) + raw[-2:]


def _edit_manifest(d, change):
    manifest = json.loads((d / "reversible.json").read_text())
    change(manifest)
    (d / "reversible.json").write_text(json.dumps(manifest))


@pytest.mark.gpu
def test_cuda_merge_equals_cpu_merge(tmp_path, mixed):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    bundles = {}
    for device in ("cuda", "cpu"):
        recipe = write_recipe(tmp_path / f"{device}.yml", "rmm", [(p, None) for p in mixed], {"p": 2}, dtype="float64")
        run_merge(load_recipe(recipe), tmp_path / device, device=device, precision="float64", quiet=True, write_card=False)
        bundles[device] = ReversibleBundle.load(tmp_path / device)
    for path in mixed:
        gpu, cpu = bundles["cuda"].adapter(path.name), bundles["cpu"].adapter(path.name)
        assert gpu.keys() == cpu.keys()
        for module in cpu:
            assert rel(gpu[module].dense(), cpu[module].dense()) <= 1e-9, module


def test_write_adapter_never_writes_into_a_directory_with_files(tmp_path):
    """The Python API has no staging: it refuses a non-empty directory instead of writing over what is there."""
    from lowrank_methods.core.errors import OutputExistsError
    from lowrank_methods.formats.bundle import ReversibleBundle

    a = write_adapter(tmp_path / "a", {"model.layers.0.q": (6, 5)}, seed=1)
    b = write_adapter(tmp_path / "b", {"model.layers.0.q": (6, 5)}, seed=2)
    recipe = write_recipe(tmp_path / "r.yml", "rmm", [(a, None), (b, None)], {"p": 1})
    assert CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "bundle"), "-q"]).exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not empty"):
        ReversibleBundle.load(tmp_path / "bundle").write_adapter("a", mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


# -- form: shared (one Tucker-2 subspace per module) -------------------------------------------------------------
def test_shared_form_is_exact_when_its_subspace_holds_every_task(tmp_path, mixed):
    """Where the storage of p = T−1 lets the shared rank K reach the whole core space (min(m, n, Σ ranks)), every
    task comes back exactly (mixed ranks, rsLoRA, patterns, an embedding, modules only some adapters have), at its
    own rank."""
    bundle, report = bundle_of(tmp_path, mixed, p=3, form="shared")
    modules = bundle.manifest["modules"]
    assert {m["form"] for m in modules.values()} == {"shared"}
    full = [mod for mod, info in modules.items() if info["K"] == min(*info["layout"]["shape"], sum(info["ranks"]))]
    # down_proj (task c lacks it, b's rank and alpha come from patterns): K = 11 = Σ ranks. The others' storage is
    # smaller than their full core space (q_proj would need K = 16 and allows 14; v_proj and the embedding, held by
    # two adapters and one, get p = 1 and p = 0)
    assert full == [D0]
    for path in mixed:
        factors = bundle.adapter(path.name)
        for module in full:
            if merged_delta(path, module) is None:
                assert module not in factors
                continue
            assert rel(factors[module].dense(), dense_delta(path, module)) <= 1e-10, (path.name, module)
            assert factors[module].rank == modules[module]["ranks"][bundle.task_index(path.name)]
    assert report.modules[D0]["retained_energy"] == pytest.approx(1.0)


def test_shared_form_projects_every_task_on_two_shared_bases(tmp_path, same_rank):
    """Below the full rank: P and Q have orthonormal columns, task t comes back as P Pᵀ ΔW_t Q Qᵀ (the dense
    projection, float64), its rank is at most the task's, and it stores no more than form positions at that p."""
    bundle, report = bundle_of(tmp_path, same_rank, p=1, form="shared")
    positions, _ = bundle_of(tmp_path, same_rank, name="positions", p=1)
    assert bundle.manifest["storage"]["stored_numbers"] <= positions.manifest["storage"]["stored_numbers"]
    for module, info in bundle.manifest["modules"].items():
        t = bundle._module_tensors(module)
        P, Qt, K = t["shared_B"], t["shared_A"], info["K"]
        m, n = info["layout"]["shape"]
        assert 1 <= K < min(m, n) and info["stored_numbers"] == (m + n) * K + len(same_rank) * K * K
        torch.testing.assert_close(P.T @ P, torch.eye(K, dtype=F64), atol=1e-10, rtol=0)
        torch.testing.assert_close(Qt @ Qt.T, torch.eye(K, dtype=F64), atol=1e-10, rtol=0)
        for path in same_rank:
            ref = dense_delta(path, module)
            got = bundle.adapter(path.name)[module]
            assert got.rank <= 4
            torch.testing.assert_close(got.dense(), P @ P.T @ ref @ Qt.T @ Qt, atol=1e-10 * float(ref.norm()), rtol=0)


@pytest.mark.parametrize("damage,message", [
    (lambda m: m["modules"][Q0].update(K=m["modules"][Q0]["K"] + 1), "tensor shared_B is shape"),
    (lambda m: m["modules"][Q0].pop("form"), "tensor basis_B is missing"),
    (lambda m: m["modules"][Q0].update(K=0), "reversible.json is malformed"),
])
def test_refuses_a_corrupted_shared_bundle(tmp_path, same_rank, damage, message):
    bundle_of(tmp_path, same_rank, p=1, form="shared")
    _edit_manifest(tmp_path / "out", damage)
    result = CliRunner().invoke(main, ["reconstruct", str(tmp_path / "out"), "t0", str(tmp_path / "t0-back")])
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "t0-back").exists()

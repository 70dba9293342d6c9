"""The streaming merge: recipe → sources → plan → (load → device → method → CPU → writer) per module.

Peak memory is a few modules' factors plus the workers' scratch: a prefetch thread reads the next module's
bytes, ``threads`` workers merge different modules at once (each with one intra-op thread, see threads.py),
and the results reach the writer strictly in plan order, so the output does not depend on the thread count.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from lowrank_methods.core.errors import ComputeError, MergeError, short
from lowrank_methods.formats.peft import AdapterSource, ModuleLayout, check_compatible, saved_module
from lowrank_methods.core.types import LoraFactors, MethodContext
from lowrank_methods.pipeline.recipe import Recipe
from lowrank_methods.core.types import ModuleResult

LAYER_INDEX = re.compile(r"\.(\d+)\.")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Plan:
    """Every module any adapter targets (union), in natural order, with its layout and layer position."""

    modules: list[str]
    layouts: dict[str, ModuleLayout]
    n_layers: int

    def t(self, module: str) -> float:
        """mergekit's gradient position: layer / (n_layers - 1); 0 for modules outside the layer stack."""
        m = LAYER_INDEX.search(module)
        return int(m.group(1)) / (self.n_layers - 1) if m and self.n_layers > 1 else 0.0


def make_plan(sources: list[AdapterSource]) -> Plan:
    layouts: dict[str, ModuleLayout] = {}
    owner: dict[str, str] = {}
    for src in sources:
        for module in src.modules:
            layout = src.layout(module)
            if module in layouts and layouts[module] != layout:
                first = layouts[module]
                raise MergeError(
                    f"shape {first.kind} {first.shape} in {owner[module]!r} but {layout.kind} {layout.shape} here; "
                    "the adapters were trained on different models",
                    adapter=src.name, module=module,
                )
            layouts.setdefault(module, layout)
            owner.setdefault(module, src.name)
    modules = sorted(layouts, key=_natural_key)
    layers = [int(m.group(1)) for m in map(LAYER_INDEX.search, modules) if m]
    return Plan(modules, layouts, max(layers) + 1 if layers else 1)


@dataclass
class MergeReport:
    """What was merged and how it went; saved as merge_report.json and rendered into the model card."""

    method: str
    pretty_name: str
    reference_url: str | None
    output: str
    base_model: str | None
    task_type: str | None
    adapters: list[dict]
    parameters: dict
    modules: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    recipe: str = ""
    base_model_on_hub: bool | None = None  # decided once, at merge time: the card links Hub ids only
    serve_for: str | None = None           # the serving profile the adapter was stored for
    serving: dict = field(default_factory=dict)  # engine -> formats.serving.Verdict of the written adapter

    def summary(self) -> dict[str, float]:
        energies = [s["retained_energy"] for s in self.modules.values() if s.get("retained_energy") is not None]
        ranks = [int(s["rank"]) for s in self.modules.values() if s.get("rank") is not None]
        out = {"modules": len(self.modules), "seconds": self.seconds}
        if energies:
            out |= {"retained_energy_min": min(energies), "retained_energy_median": statistics.median(energies)}
        if ranks:
            out |= {"rank_min": min(ranks), "rank_max": max(ranks)}
        return out

    def to_dict(self) -> dict:
        return asdict(self) | {"summary": self.summary()}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise MergeError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


def open_sources(recipe: Recipe, *, allow_pickle: bool = False, scratch: Path | None = None
                 ) -> tuple[list[AdapterSource], str | None]:
    """Resolve and open every adapter (configs and key indexes only); returns them and the shared base model.
    Full fine-tuned models (rmm's PT-SVD inputs) become temporary adapters in ``scratch``."""
    from lowrank_methods.pipeline.full_model_inputs import as_adapter_dirs
    from lowrank_methods.publish.hub import resolve_adapter

    paths = [resolve_adapter(ref, allow_pickle=allow_pickle) for ref in recipe.adapters]
    paths = as_adapter_dirs(recipe, paths, scratch)
    sources = [AdapterSource.open(path, ref.name, allow_pickle=allow_pickle) for ref, path in zip(recipe.adapters, paths)]
    return sources, check_compatible(sources, base_model=recipe.base_model or _recipe_base(recipe))


@dataclass
class Prepared:
    """A recipe whose every check passed: the opened sources, the shared base and the plan."""

    recipe: Recipe
    sources: list[AdapterSource]
    base: str | None
    plan: Plan
    gguf_base: object = None  # --for llama.cpp: the base's GGUF names (formats.gguf_lora.GgufBase)


def prepare(recipe: Recipe, *, allow_pickle: bool = False, scratch: Path | None = None) -> Prepared:
    """Every check ``merge`` can make without computing; ``validate`` is exactly this."""
    sources, base = open_sources(recipe, allow_pickle=allow_pickle, scratch=scratch)
    plan = make_plan(sources)
    recipe.check(plan.modules)
    if recipe.method.check is not None:
        for module in plan.modules:
            t = plan.t(module)
            ranks = [src.rank_alpha(module)[0] if module in src.keys else 0 for src in sources]
            try:
                recipe.method.check(recipe.params_for(module, t), recipe.weights_for(module, t), ranks)
            except MergeError as e:
                e.module = e.module or module
                raise
    recipe.check_output_fields()
    from lowrank_methods.pipeline.serving import check_servable

    ready = Prepared(recipe, sources, base, plan)
    ready.gguf_base = check_servable(ready, recipe.serve_for)
    return ready


def with_serve_for(recipe: Recipe, engine: str | None) -> Recipe:
    """``recipe`` stored for ``engine`` (``--for``): one engine, whether it comes from the flag, the recipe or both."""
    from dataclasses import replace

    from lowrank_methods.core.errors import RecipeError
    from lowrank_methods.pipeline.recipe import check_serve_for

    if engine is None or engine == recipe.serve_for:
        return recipe
    check_serve_for(engine, recipe.output, where="--for")
    if recipe.serve_for is not None:
        raise RecipeError(f"--for {engine} disagrees with the recipe's serve_for: {recipe.serve_for}; drop one of them")
    return replace(recipe, serve_for=engine)


def check_factors(ready: Prepared) -> None:
    """Read every module of every adapter through the merge's own conversion (NaN/Inf, shapes): what a merge would
    refuse while reading, without merging. Adapter-sized I/O, one module at a time."""
    for module in ready.plan.modules:
        for src in ready.sources:
            if module in src.keys:
                src.read_module(module)


def run_merge(
    recipe: Recipe,
    out: str | Path,
    *,
    device: str = "cpu",
    precision: str = "float32",
    overwrite: bool = False,
    allow_pickle: bool = False,
    quiet: bool = False,
    write_card: bool = True,
    threads: int | None = None,
    out_shard_size: int | str | None = None,
    serve_for: str | None = None,
    executor: str = "local",
) -> MergeReport:
    """Merge the recipe's adapters module by module and write the result atomically to ``out``.
    ``threads``: modules merged at once (default: the cores this process may run on).
    ``out_shard_size``: bytes per weights file of ``output: model`` (int, or "500M", "5B"; default 5B).
    ``serve_for``: store the adapter for this serving engine (``--for``; the recipe's ``serve_for`` otherwise).
    ``executor``: ``local`` (threads) or ``ray`` (Ray workers, ``pipeline/ray_executor.py``; same output bytes)."""
    from lowrank_methods.pipeline.staging import StagedOutput
    from lowrank_methods.pipeline.threads import check_threads

    recipe = with_serve_for(recipe, serve_for)
    start = time.perf_counter()
    dev = resolve_device(device)
    threads = check_threads(threads)
    check_executor(executor, dev)
    with StagedOutput(out, overwrite=overwrite, inputs=recipe.local_inputs()) as stage:
        ready = prepare(recipe, allow_pickle=allow_pickle, scratch=stage.scratch)
        report = merge_into(ready, stage, dev=dev, compute_dtype=DTYPES[precision], quiet=quiet, write_card=write_card,
                            start=start, threads=threads, executor=executor,
                            writer_options={"shard_size": out_shard_size} if out_shard_size is not None else None)
        stage.commit()
    return report


def check_executor(executor: str, dev: torch.device) -> None:
    from lowrank_methods.pipeline.ray_executor import EXECUTORS, ray_module

    if executor not in EXECUTORS:
        raise MergeError(f"unknown executor {executor!r}; use {' or '.join(EXECUTORS)}")
    if executor == "ray":
        if dev.type != "cpu":
            raise MergeError("--executor ray merges on the Ray workers' CPUs; drop --device or --executor")
        ray_module()  # installed, or one line saying how


def merge_into(ready: Prepared, stage, *, dev: torch.device, compute_dtype: torch.dtype, quiet: bool,
               write_card: bool, start: float, threads: int | None = None, executor: str = "local",
               writer_options: dict | None = None) -> MergeReport:
    """The streaming loop: every module merged (``threads`` at once on the CPU) and handed to the writer in plan
    order, which writes into ``stage.path``."""
    from lowrank_methods.pipeline.outputs import open_writer
    from lowrank_methods.pipeline.threads import device_scope, intra_op_threads, pinned_device, plan_threads

    recipe, sources, base, plan = ready.recipe, ready.sources, ready.base, ready.plan
    first = sources[0].config
    report = MergeReport(
        method=recipe.method.name, pretty_name=recipe.method.pretty_name, reference_url=recipe.method.reference_url,
        output=recipe.output, base_model=base, task_type=first.get("task_type"),
        adapters=[_describe(ref, src) for ref, src in zip(recipe.adapters, sources)],
        parameters=dict(recipe.settings), device=str(dev), recipe=recipe.text,
        base_model_on_hub=None if base is None else not Path(base.partition("@")[0]).expanduser().exists(),
        serve_for=recipe.serve_for,
    )
    out_dtype = DTYPES[recipe.dtype] if recipe.dtype else sources[0].dtype
    extras = _carried_tensors(sources)
    writer = open_writer(ready, stage, extra_keys=list(extras), dtype=out_dtype,
                         **(writer_options or {}))  # writer_options: output: model (formats/full_model.py)
    use = plan_threads(threads, dev)
    on = pinned_device(dev)  # "cuda" means the caller's current GPU, not the worker thread's default one

    def compute(module: str, stored: list) -> ModuleResult:  # in a worker thread
        with device_scope(on):
            factors = _to_factors(sources, plan, module, stored, compute_dtype)
            t = plan.t(module)
            return _merge_module(recipe, module, [f.to(on) for f in factors], recipe.weights_for(module, t),
                                 recipe.params_for(module, t))

    if executor == "ray":
        from lowrank_methods.pipeline.ray_executor import ray_merged

        read = _module_reader(sources)

        def prepare_module(module: str) -> tuple:  # on the driver: read and convert, as the local reader does
            t = plan.t(module)
            return t, _to_factors(sources, plan, module, read(module), compute_dtype), recipe.weights_for(module, t)

        merging = ray_merged(plan.modules, prepare_module, _merge_module, recipe.text, use.workers)
    else:
        merging = _merged(plan.modules, _module_reader(sources), compute, use.workers)
    try:
        with intra_op_threads(use.intra_op), closing(merging) as merged:
            results = tqdm(merged, total=len(plan.modules), desc="merging modules", unit="module", disable=quiet)
            if recipe.rank_budget is not None:  # every module's result is needed before any rank is chosen
                results = within_budget(list(results), recipe.rank_budget)
            if recipe.serve_for not in (None, "peft"):  # so is the one rank of a serving profile
                from lowrank_methods.pipeline.serving import served

                results = served(list(results), recipe.serve_for)
            for module, result in results:
                writer.add(module, plan.layouts[module], result)
                report.modules[module] = dict(result.stats)
        for key, (module, src) in extras.items():
            writer.add_extra(key, src.read_raw(key).to(out_dtype), module)
        report.seconds = time.perf_counter() - start
        writer.finish({**first, "base_model_name_or_path": base})
        if ready.gguf_base is not None:
            from lowrank_methods.formats.gguf_lora import GGUF_FILE, export_gguf

            export_gguf(stage.path, ready.gguf_base, stage.path / GGUF_FILE)
        if recipe.output == "adapter":
            from lowrank_methods.pipeline.serving import adapter_verdicts

            report.serving = {e: asdict(v) | {"ok": v.ok} for e, v in adapter_verdicts(stage.path)[1].items()}
        _write_report(stage.path, report)
        if write_card:
            from lowrank_methods.publish.card import write_card

            write_card(stage.path, report)
    except BaseException:
        writer.abort()
        raise
    return report


def within_budget(results: list[tuple[str, ModuleResult]], rank: int) -> list[tuple[str, ModuleResult]]:
    """Each module's factors truncated to the rank ``allocation.allocate_ranks`` gives it within the parameters of
    rank ``rank`` everywhere. Stats: ``rank``; ``budget_retained_energy``, the share of the method's own output
    kept; ``retained_energy`` multiplied by it (what the written adapter keeps)."""
    from lowrank_methods.core.allocation import allocate_ranks
    from lowrank_methods.core.linalg import svd_of_product

    svds = {m: svd_of_product(r.factors.B, r.factors.A) for m, r in results if r.factors is not None}
    shapes = {m: r.factors.shape for m, r in results if m in svds}
    ranks = allocate_ranks({m: s.S for m, s in svds.items()}, shapes, rank)
    out = []
    for module, result in results:
        if module in svds:
            factors, kept = svds[module].factors(ranks[module]), svds[module].retained_energy(ranks[module])
            stats = {**result.stats, "rank": ranks[module], "budget_retained_energy": kept,
                     "retained_energy": result.stats.get("retained_energy", 1.0) * kept}
            result = ModuleResult(factors, stats, result.tensors)
            _check_finite(result, "rank_budget", module)
        out.append((module, result))
    return out


def _check_finite(result: ModuleResult, what: str, module: str) -> None:
    tensors = ([result.factors.A, result.factors.B] if result.factors is not None else []) + list(result.tensors.values())
    if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
        raise ComputeError(f"{what} gave NaN or Inf here (the weights, lambda or the adapters' scales "
                           "are too large for the precision); nothing was written", module=module,
                           flag="--precision", flag_hint="try --precision float64")


def _merge_module(recipe: Recipe, module: str, factors: list[LoraFactors], weights: list[float], params) -> ModuleResult:
    """One module through the method, back on the CPU, refused unless every number in it is finite."""
    try:
        result = recipe.method(factors, weights, params, MethodContext(module)).to("cpu")
    except torch.linalg.LinAlgError as e:
        raise ComputeError(f"{recipe.method.name}: a decomposition did not converge ({short(str(e), 60)}); the "
                           "updates are degenerate or too large for the precision", module=module,
                           flag="--precision", flag_hint="try --precision float64") from e
    _check_finite(result, recipe.method.name, module)
    result.stats = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in result.stats.items()}
    return result


def _module_reader(sources: list[AdapterSource]) -> Callable[[str], list]:
    """Reads one module's stored tensors from every adapter: file I/O only, so the prefetch thread never
    competes with the merge for torch's intra-op threads (that oversubscription made small-SVD methods 3× slower)."""

    def read(module: str) -> list:
        return [src.read_stored(module) if module in src.keys else None for src in sources]

    return read


def _to_factors(sources: list[AdapterSource], plan: Plan, module: str, stored: list, dtype: torch.dtype) -> list[LoraFactors]:
    shape = plan.layouts[module].shape
    return [src.to_factors(module, *parts, dtype=dtype) if parts is not None else LoraFactors.zeros(shape, dtype)
            for src, parts in zip(sources, stored)]


def _prefetched(modules: list[str], load: Callable[[str], list]) -> Iterator[tuple[str, list]]:
    """Yield (module, what ``load`` returned) while a worker thread already reads the next module."""
    if not modules:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending = pool.submit(load, modules[0])
        try:
            for i, module in enumerate(modules):
                loaded = pending.result()
                if i + 1 < len(modules):
                    pending = pool.submit(load, modules[i + 1])
                yield module, loaded
        finally:
            pending.cancel()


def _merged(modules: list[str], load: Callable[[str], list], compute: Callable[[str, list], ModuleResult],
            workers: int) -> Iterator[tuple[str, ModuleResult]]:
    """Yield (module, ``compute(module, load(module))``) in the order of ``modules``, ``workers`` modules computed
    at once. The lookahead is bounded: at most ``workers + 1`` modules are submitted and not yet yielded (plus the
    one being read), so memory stays a few modules. A module's error is raised when its turn comes, so the
    first failing module in plan order is the one reported, whatever the thread count."""
    with closing(_prefetched(modules, load)) as reads, \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge",  # one intra-op thread each, set in the
                               initializer=torch.set_num_threads, initargs=(1,)) as pool:  # thread: MKL's is per thread
        window: deque = deque()
        try:
            for module, stored in reads:
                window.append((module, pool.submit(compute, module, stored)))
                if len(window) > workers:
                    done, future = window.popleft()
                    yield done, future.result()
            while window:
                done, future = window.popleft()
                yield done, future.result()
        finally:  # an error, an interrupt or the consumer stopping: queued modules never start
            for _, future in window:
                future.cancel()


def _carried_tensors(sources: list[AdapterSource]) -> dict[str, tuple[str, AdapterSource]]:
    """Full tensors an adapter carries besides LoRA factors (modules_to_save): taken over unchanged.

    Two adapters carrying the same tensor must carry identical values; otherwise there is no defined merge.
    """
    carried: dict[str, tuple[str, AdapterSource]] = {}
    for src in sources:
        for key in src.extra_keys:
            module = saved_module(key)
            if key in carried:
                other = carried[key][1]
                if not torch.equal(other.read_raw(key), src.read_raw(key)):
                    raise MergeError(
                        f"both {other.name!r} and {src.name!r} save their own copy of this module (modules_to_save) "
                        "with different values; there is no defined merge of them. Remove it from all but one adapter",
                        module=module,
                    )
                continue
            carried[key] = (module, src)
    return carried


def _describe(ref, src: AdapterSource) -> dict:
    ranks = sorted({src.rank_alpha(m)[0] for m in src.modules})
    scales = sorted({round(src.scale(m), 6) for m in src.modules})
    weight = ref.settings.get("weight", 1.0)
    from lowrank_methods.publish.hub import last_resolved_commit

    on_hub = not Path(ref.adapter).expanduser().exists()
    return {"name": ref.name, "source": ref.adapter, "on_hub": on_hub, "revision": ref.revision,
            "commit": last_resolved_commit(ref.adapter, ref.revision) if on_hub else None,  # pinned, for remix
            "base": ref.base, "ranks": ranks,
            "scales": scales, "rslora": bool(src.config.get("use_rslora")), "modules": len(src.modules),
            "weight": weight if isinstance(weight, (int, float)) else str(weight)}


def _recipe_base(recipe: Recipe) -> str | None:
    bases = {ref.base for ref in recipe.adapters if ref.base}
    return bases.pop() if len(bases) == 1 else None


def _write_report(path: Path, report: MergeReport) -> None:
    import json

    from lowrank_methods.publish.card import public_report  # no absolute local paths or tokens: the folder may be pushed to the Hub

    (path / "merge_report.json").write_text(json.dumps(public_report(report), indent=2, allow_nan=False) + "\n")


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]

"""What ``mergekit.merge.run_merge`` does with the plugin installed (patch 1 in ``patches.py``).

1. Check the recipe before anything is downloaded or loaded: the method name (with a suggestion), and the
   parameters (all of them for our methods; names and plain values for mergekit's own).
2. Our methods run on our engine: ``output: adapter`` (or ``bundle``) writes what ``mergekit-lowrank merge``
   writes; ``output: model`` writes ``W0 + ΔW*`` with our own full-model writer (``formats/full_model.py``, the same
   bytes as ``mergekit-lowrank merge``; ``--out-shard-size``, ``--copy-tokenizer``, ``--num-threads`` honoured), for
   any architecture. Either way the output is staged and committed as ``staging.py`` says: a previous output of ours
   is replaced (mergekit-yaml has no ``--overwrite``), nothing else ever is; SIGTERM/SIGHUP clean up like Ctrl-C;
   errors are one line.
   Over local full fine-tuned models (no adapter anywhere) our methods other than rmm, and lore always, go to
   mergekit's own planner instead, which hands each tensor group to the method's dense form (``dense.py``); the
   output is staged the same way (``mergekit_merge_staged``).
3. mergekit's ``task_arithmetic``, ``linear`` and ``ties`` over bare adapter directories only (``only_bare_adapters``)
   run as 2., through our aliases of those names: exactly what stock mergekit computes over ``base+adapter``.
4. Every other recipe goes to mergekit's own ``run_merge`` unchanged (``base+adapter`` references included).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from lowrank_methods.core.errors import MergeError

FULL_MODEL_METHODS = ("lore",)  # dense methods that only mergekit runs (its planner, loader and writer)


def run_merge(merge_config, out_path: str, options, config_source: str | None = None):
    import mergekit.merge

    from lowrank_methods.pipeline.interrupts import terminate_as_interrupt
    from lowrank_methods.mergekit_plugin.swap import original

    try:
        recipe = check(merge_config, config_source)
        if recipe is None and not is_ours(merge_config.merge_method):
            return original(mergekit.merge, "run_merge")(merge_config, out_path, options, config_source=config_source)
        with terminate_as_interrupt():
            if recipe is None:  # lore, dense forms over full models: mergekit's planner, our staging
                return mergekit_merge_staged(merge_config, config_source, out_path, options, overwrite=True)
            if recipe.output == "model":
                return _merge_to_model(recipe, merge_config, out_path, options, config_source)
            return _merge_to_adapter(recipe, out_path, options)
    except (MergeError, OSError, KeyboardInterrupt) as e:
        _fail(e)


def mergekit_merge_staged(config, text: str | None, out: str | Path, options, *, overwrite: bool) -> Path:
    """mergekit's own ``run_merge`` writing into a staged ``out`` (committed on success; on failure nothing is left)."""
    import mergekit.merge

    from lowrank_methods.mergekit_plugin.swap import original
    from lowrank_methods.pipeline.staging import StagedOutput

    inputs = tuple(Path(str(m.model.path)) for m in config.referenced_models() if Path(str(m.model.path)).exists())
    with StagedOutput(out, overwrite=overwrite, inputs=inputs) as stage:
        original(mergekit.merge, "run_merge")(config, str(stage.path), options, config_source=text)
        return stage.commit()


def check(merge_config, config_source: str | None = None):
    """Validate the recipe without reading any tensor: our ``Recipe`` for our methods, None for mergekit's."""
    from mergekit.merge_methods import registered_methods

    from lowrank_methods.pipeline.recipe import parse_recipe
    from lowrank_methods.core.method import list_methods


    name = merge_config.merge_method
    ours = {m.name for m in list_methods() if m.in_mergekit}
    if name in ours:
        recipe = parse_recipe(config_source or merge_config.to_yaml())  # every parameter checked before loading
        if dense_in_mergekit(name, model_paths(merge_config)):
            return None  # full fine-tuned models: mergekit plans them and calls our dense forms (dense.py)
        return recipe  # adapters (rmm: full models too, as PT-SVD inputs of a bundle): our engine
    if name in FACTOR_EQUIVALENTS and only_bare_adapters(merge_config):
        return parse_recipe(config_source or merge_config.to_yaml())  # our alias of that name (methods/mtc.py)
    if name not in FULL_MODEL_METHODS and not involves_adapters(merge_config):
        return None  # a stock recipe over full models: exactly mergekit's behaviour, warnings and errors included
    known = {m.spec.name: m for m in registered_methods()}
    if name not in known:
        names = sorted(set(known) | ours)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known methods: {', '.join(names)}"
        raise MergeError(f"unknown merge_method {name!r}; {hint}")
    _check_stock_parameters(known[name].spec, merge_config, strict=name in FULL_MODEL_METHODS)
    _check_adapters_have_a_base(merge_config)
    return None


def is_ours(name: str) -> bool:
    """A merge_method this package provides in mergekit's registry (lore included)."""
    from lowrank_methods.core.method import list_methods

    return name in FULL_MODEL_METHODS or name in {m.name for m in list_methods() if m.in_mergekit}


def dense_in_mergekit(method: str, paths) -> bool:
    """Does mergekit's planner run this recipe of ours (the dense forms, ``dense.py``)? ``lore`` always; our other
    methods except rmm when every model path is a local full model directory (None: a ``base+lora`` reference).
    The one rule for both CLIs (``dense_run.is_full_model_recipe`` asks it of the recipe's text)."""
    if method in FULL_MODEL_METHODS:
        return True
    return (is_ours(method) and method != "rmm" and bool(paths)
            and all(p is not None and is_full_model_dir(p) for p in paths))


def model_paths(merge_config) -> list:
    """Each referenced model's path, None for a ``base+lora`` reference."""
    return [None if ref.lora is not None else ref.model.path for ref in merge_config.referenced_models()]


def is_full_model_dir(path) -> bool:
    """A local model directory (config.json) that is not a PEFT adapter (adapter_config.json)."""
    path = Path(str(path))
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def involves_adapters(merge_config) -> bool:
    """Does the recipe read a LoRA adapter (a ``base+lora`` reference, or a bare adapter directory)?"""
    for ref in merge_config.referenced_models():
        if ref.lora is not None or Path(str(ref.model.path), "adapter_config.json").is_file():
            return True
    return False


# mergekit's methods whose result over base+adapter models is W0 plus a function of the updates alone, computed
# exactly in factor space by our aliases of the same names (methods/mtc.py, in_mergekit=False)
FACTOR_EQUIVALENTS = ("task_arithmetic", "linear", "ties")


def only_bare_adapters(merge_config) -> bool:
    """Is every model of a flat ``models:`` recipe a bare local adapter directory (adapter_config.json, no ``+``)?

    Such recipes of ``FACTOR_EQUIVALENTS`` run on our engine: stock mergekit cannot read them at all (#470), and
    ours give what it computes over ``base+adapter``. ``base+adapter`` references stay mergekit's (a full model,
    read through the direct loader), as does any recipe mixing them or full models with bare adapters (refused by
    ``_check_adapters_have_a_base``), and ``slices:``/``modules:`` recipes."""
    models = merge_config.models or []
    if not models or merge_config.slices or merge_config.modules:
        return False
    return all(m.model.lora is None and _is_adapter_dir(m.model.model.path) for m in models)


def _is_adapter_dir(path) -> bool:
    return Path(str(path), "adapter_config.json").is_file()


def _check_adapters_have_a_base(merge_config) -> None:
    """A bare adapter directory given to a mergekit method fails deep in transformers (arcee-ai/mergekit#470)."""
    for m in merge_config.models or []:
        if m.model.lora is None and _is_adapter_dir(m.model.model.path):
            base = merge_config.base_model or "BASE"
            raise MergeError(f"model {m.model} is a LoRA adapter; mergekit's {merge_config.merge_method!r} reads full "
                             f"models, so write it as {base}+{m.model}")


def _check_stock_parameters(spec, merge_config, strict: bool = False) -> None:
    """A mergekit method's parameters: ill-typed plain values and misspelled names fail (mergekit would fail
    only mid-merge, or silently ignore the typo); other unknown names are ignored by mergekit, so only warned
    about — except for a method of ours (``strict``), which refuses every name it does not take."""
    import logging

    from pydantic import TypeAdapter, ValidationError

    from lowrank_methods.core.method import _one_line

    specs = {p.name: p for p in spec.parameters}
    blocks = [("parameters", merge_config.parameters or {})]
    blocks += [(f"model {m.model}", m.parameters or {}) for m in merge_config.models or []]
    for where, params in blocks:
        for key, value in params.items():
            if key not in specs:
                close = difflib.get_close_matches(key, specs, n=1, cutoff=0.6 if strict else 0.8)
                if strict:
                    hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(specs)}"
                    raise MergeError(f"{where}: method {spec.name!r} has no parameter {key!r}; {hint}")
                if close:
                    raise MergeError(f"{where}: method {spec.name!r} has no parameter {key!r}; did you mean {close[0]!r}?")
                logging.getLogger(__name__).warning("%s: method %r ignores parameter %r (it takes %s)", where, spec.name,
                                                    key, ", ".join(specs) or "none")
                continue
            if isinstance(value, (bool, int, float, str)):
                try:
                    TypeAdapter(specs[key].value_type).validate_python(value)
                except ValidationError as e:
                    raise MergeError(f"{where}: bad value for {key!r} of method {spec.name!r}: {_one_line(e)}") from e


def _merge_to_adapter(recipe, out_path: str, options):
    """mergekit-yaml has no --overwrite: a previous output of ours is replaced, nothing else ever is."""
    from lowrank_methods.pipeline.engine import run_merge

    return run_merge(recipe, Path(out_path), device=options.device or "cpu", overwrite=True, quiet=options.quiet,
                     write_card=options.write_model_card, threads=options.num_threads)  # None: the available cores


def _merge_to_model(recipe, merge_config, out_path: str, options, config_source: str | None):
    """``W0 + ΔW*`` written by our full-model writer (``formats/full_model.py``), the same files as ``mergekit-lowrank
    merge`` writes for the recipe (mergekit's planner is not used: it cannot plan every architecture, e.g. BertModel
    in 0.1.5). mergekit's ``--out-shard-size`` and ``--copy-tokenizer/--no-copy-tokenizer`` are honoured; the output
    is always safetensors. Plus ``mergekit_config.yml``, as mergekit writes it."""
    import logging
    import time

    from lowrank_methods.pipeline.engine import DTYPES, merge_into, prepare, resolve_device
    from lowrank_methods.pipeline.staging import StagedOutput

    if not options.safe_serialization:
        logging.getLogger(__name__).warning("output: model is always written as safetensors; "
                                            "--no-safe-serialization is ignored")
    start = time.perf_counter()
    with StagedOutput(out_path, overwrite=True, inputs=recipe.local_inputs()) as stage:
        ready = prepare(recipe, scratch=stage.scratch)
        report = merge_into(ready, stage, dev=resolve_device(options.device or "cpu"), compute_dtype=DTYPES["float32"],
                            quiet=options.quiet, write_card=options.write_model_card, start=start,
                            threads=options.num_threads,  # mergekit's --num-threads/-j; None: the available cores
                            writer_options={"shard_size": options.out_shard_size,
                                            "copy_tokenizer": options.copy_tokenizer})
        (stage.path / "mergekit_config.yml").write_text(config_source or merge_config.to_yaml(), encoding="utf-8")
        stage.commit()
    return report


def _fail(err: BaseException):
    """One line inside ``mergekit-yaml`` (``Error: …``, exit 1; an interrupt: its line and 128+signal);
    elsewhere (mergekit's Python API) the exception itself."""
    import sys

    import click

    from lowrank_methods.core.errors import error_line
    from lowrank_methods.pipeline.interrupts import interrupted_line

    if click.get_current_context(silent=True) is None:
        raise err
    if isinstance(err, KeyboardInterrupt):
        line, code = interrupted_line(err)
        click.echo(line, err=True)
        sys.exit(code)
    raise click.ClickException(error_line(err)) from err

"""What ``mergekit.merge.run_merge`` does with the plugin installed (patch 1 in ``patches.py``).

1. Check the recipe before anything is downloaded or loaded: the method name (with a suggestion), and the
   parameters (all of them for our methods; names and plain values for mergekit's own).
2. Our methods run on our engine: ``output: adapter`` (or ``bundle``) writes what ``mergekit-lowrank merge``
   writes; ``output: model`` merges the factors into a small temporary adapter, then has mergekit's own
   planner and writer produce ``W0 + ΔW*`` as ``passthrough`` of ``base+<that adapter>`` through the direct
   LoRA loader (sharding, dtype, tokenizer, ``--out-shard-size``, ``--cuda`` all mergekit's). Either way the
   output is staged and committed as ``staging.py`` says: a previous output of ours is replaced (mergekit-yaml
   has no ``--overwrite``), nothing else ever is; SIGTERM/SIGHUP clean up like Ctrl-C; errors are one line.
3. Every other method goes to mergekit's own ``run_merge`` unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

from ..errors import MergeError


def run_merge(merge_config, out_path: str, options, config_source: str | None = None):
    import mergekit.merge

    from ..interrupts import terminate_as_interrupt
    from .patches import original

    try:
        recipe = check(merge_config, config_source)
        if recipe is None:
            return original(mergekit.merge, "run_merge")(merge_config, out_path, options, config_source=config_source)
        with terminate_as_interrupt():
            if recipe.output == "model":
                return _merge_to_model(recipe, merge_config, out_path, options, config_source)
            return _merge_to_adapter(recipe, out_path, options)
    except (MergeError, OSError, KeyboardInterrupt) as e:
        _fail(e)


def check(merge_config, config_source: str | None = None):
    """Validate the recipe without reading any tensor: our ``Recipe`` for our methods, None for mergekit's."""
    from mergekit.merge_methods import registered_methods

    from ..recipe import parse_recipe
    from ..registry import list_methods

    name = merge_config.merge_method
    ours = {m.name for m in list_methods() if m.in_mergekit}
    if name in ours:
        return parse_recipe(config_source or merge_config.to_yaml())
    known = {m.spec.name: m for m in registered_methods()}
    if name not in known:
        names = sorted(set(known) | ours)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known methods: {', '.join(names)}"
        raise MergeError(f"unknown merge_method {name!r}; {hint}")
    _check_stock_parameters(known[name].spec, merge_config)
    _check_adapters_have_a_base(merge_config)
    return None


def _check_adapters_have_a_base(merge_config) -> None:
    """A bare adapter directory given to a mergekit method fails deep in transformers (arcee-ai/mergekit#470)."""
    for m in merge_config.models or []:
        if m.model.lora is None and Path(m.model.model.path, "adapter_config.json").is_file():
            base = merge_config.base_model or "BASE"
            raise MergeError(f"model {m.model} is a LoRA adapter; mergekit's {merge_config.merge_method!r} reads full "
                             f"models, so write it as {base}+{m.model}")


def _check_stock_parameters(spec, merge_config) -> None:
    """A mergekit method's parameters: ill-typed plain values and misspelled names fail (mergekit would fail
    only mid-merge, or silently ignore the typo); other unknown names are ignored by mergekit, so only warned about."""
    import logging

    from pydantic import TypeAdapter, ValidationError

    from ..registry import _one_line

    specs = {p.name: p for p in spec.parameters}
    blocks = [("parameters", merge_config.parameters or {})]
    blocks += [(f"model {m.model}", m.parameters or {}) for m in merge_config.models or []]
    for where, params in blocks:
        for key, value in params.items():
            if key not in specs:
                close = difflib.get_close_matches(key, specs, n=1, cutoff=0.8)
                if close:
                    raise MergeError(f"{where}: method {spec.name!r} has no parameter {key!r}; did you mean {close[0]!r}?")
                logging.getLogger(__name__).warning("%s: method %r ignores parameter %r (it takes %s)", where, spec.name,
                                                    key, ", ".join(specs) or "none")
                continue
            if isinstance(value, (bool, int, float, str)):
                try:
                    TypeAdapter(specs[key].value_type).validate_python(value)
                except ValidationError as e:
                    raise MergeError(f"{where}: bad value for {key!r} of method {spec.name!r}: {_one_line(e)}") from None


def _merge_to_adapter(recipe, out_path: str, options):
    """mergekit-yaml has no --overwrite: a previous output of ours is replaced, nothing else ever is."""
    from ..engine import run_merge

    return run_merge(recipe, Path(out_path), device=options.device or "cpu", overwrite=True, quiet=options.quiet,
                     write_card=options.write_model_card)


def _merge_to_model(recipe, merge_config, out_path: str, options, config_source: str | None):
    """The merged factors as a small adapter in the staging area's scratch, then mergekit's own planner and writer
    produce ``W0 + ΔW*`` into the staging area, which is renamed into place."""
    import time

    import mergekit.merge
    from mergekit.config import MergeConfiguration

    from ..engine import DTYPES, _write_report, merge_into, prepare, resolve_device
    from ..staging import StagedOutput
    from .patches import original

    start = time.perf_counter()
    with StagedOutput(out_path, overwrite=True, inputs=recipe.local_inputs()) as stage:
        ready = prepare(dataclasses.replace(recipe, output="adapter", dtype="float32"), scratch=stage.scratch)
        if ready.base is None:
            raise MergeError("output: model needs the base model; set base_model in the recipe")
        adapter = stage.scratch / "merged-adapter"  # adapter-sized, never base-sized
        with StagedOutput(adapter) as inner:
            report = merge_into(ready, inner, dev=resolve_device(options.device or "cpu"), compute_dtype=DTYPES["float32"],
                                quiet=options.quiet, write_card=False, start=start)
            inner.commit()
        dense = MergeConfiguration(
            merge_method="passthrough", models=[{"model": f"{ready.base}+{adapter}"}], dtype=merge_config.dtype,
            out_dtype=merge_config.out_dtype, tokenizer_source=merge_config.tokenizer_source,
            tokenizer=merge_config.tokenizer, chat_template=merge_config.chat_template,
        )
        original(mergekit.merge, "run_merge")(dense, str(stage.path), options.model_copy(update={"write_model_card": False}))
        report.output = "model"
        _write_report(stage.path, report)
        (stage.path / "mergekit_config.yml").write_text(config_source or merge_config.to_yaml(), encoding="utf-8")
        if options.write_model_card:
            from ..card import write_card

            write_card(stage.path, report)
        stage.commit()
    return report


def _fail(err: BaseException):
    """One line inside ``mergekit-yaml`` (``Error: …``, exit 1; an interrupt: its line and 128+signal);
    elsewhere (mergekit's Python API) the exception itself."""
    import sys

    import click

    from ..errors import error_line
    from ..interrupts import interrupted_line

    if click.get_current_context(silent=True) is None:
        raise err
    if isinstance(err, KeyboardInterrupt):
        line, code = interrupted_line(err)
        click.echo(line, err=True)
        sys.exit(code)
    raise click.ClickException(error_line(err)) from err

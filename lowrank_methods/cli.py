"""`mergekit-lowrank`: merge, validate and list methods from the command line.

Every user error is printed as one line (``error: …``) with exit code 1; ``--verbose`` shows tracebacks.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from lowrank_methods.core.errors import MergeError, error_line
from lowrank_methods.formats.serving import ENGINES
from lowrank_methods.pipeline.ray_executor import EXECUTORS
from lowrank_methods.pipeline.interrupts import interrupted_line, terminate_as_interrupt


def one_line_errors(fn):
    """Every error of ours, an OSError (disk full, permissions), Ctrl-C, SIGTERM or SIGHUP becomes one line
    and a non-zero exit; --verbose shows the traceback instead. Hints name only flags this command has."""

    @functools.wraps(fn)
    def wrapper(*args, verbose: bool = False, **kwargs):
        flags = {opt for p in click.get_current_context().command.params for opt in getattr(p, "opts", ())}
        try:
            with terminate_as_interrupt():
                return fn(*args, **kwargs)
        except (MergeError, OSError) as e:
            if verbose:
                raise
            click.echo(f"error: {error_line(e, flags)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as e:
            line, code = interrupted_line(e)
            click.echo(line, err=True)
            sys.exit(code)

    return click.option("--verbose", "-v", is_flag=True, help="show full tracebacks")(wrapper)


def hub_options(fn):
    """--private/--revision/--create-pr/--commit-message, shared by `merge --push-to-hub` and `push`."""
    for option in reversed([
        click.option("--private", is_flag=True, help="create the Hub repo as private"),
        click.option("--revision", default=None, help="branch to push to (created from main if missing)"),
        click.option("--create-pr", is_flag=True, help="open a pull request against main instead of committing"),
        click.option("--commit-message", default=None, help="commit message (default: says what was merged)"),
    ]):
        fn = option(fn)
    return fn


def push_folder(out, repo_id, *, private, revision, create_pr, commit_message, quiet=False) -> None:
    from lowrank_methods.publish.hub import push

    info = push(out, repo_id, private=private, revision=revision, create_pr=create_pr, commit_message=commit_message)
    if not quiet:
        click.echo(f"opened pull request {info.pr_url}" if info.pr_url else f"pushed {out} to {info.commit_url}")


@click.group()
@click.version_option(package_name="mergekit-lowrank")
def main():
    """Merge LoRA adapters into one adapter with low-rank merge methods."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto")
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="dtype the merge is computed in")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--allow-pickle", is_flag=True, help="also read adapter_model.bin (loaded with weights_only=True)")
@click.option("--no-card", is_flag=True, help="do not write README.md")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar or summary")
@click.option("--threads", type=int, default=None, metavar="N",
              help="modules merged at once, one CPU thread each; over full models: each tensor merge's CPU threads "
                   "[default: the cores this process may use]")
@click.option("--out-shard-size", metavar="SIZE", default=None,  # output: model (formats/full_model.py)
              help="output: model: bytes per weights file, e.g. 500M, 5B (mergekit's notation) [default: 5B]")
@click.option("--for", "serve_for", type=click.Choice(ENGINES), default=None,
              help="store the adapter so this engine serves it exactly: one rank, scale 1 (llama.cpp: + adapter.gguf); "
                   "the recipe's serve_for otherwise")
@click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True,
              help="where modules (over full models: tensors) are merged: here, or on Ray workers (RAY_ADDRESS's "
                   "cluster, else a local one); the same output bytes")
@click.option("--push-to-hub", metavar="ORG/NAME", default=None,
              help="upload OUT to this Hub repo once the merge succeeded")
@hub_options
@one_line_errors
def merge(recipe, out, device, precision, overwrite, allow_pickle, no_card, quiet, threads, out_shard_size, serve_for,
          executor, push_to_hub, **hub):
    """Merge the adapters listed in RECIPE into OUT."""
    from lowrank_methods.pipeline.engine import run_merge
    from lowrank_methods.publish.hub import check_can_push
    from lowrank_methods.mergekit_plugin.dense_run import is_full_model_recipe, run_full_model_merge
    from lowrank_methods.pipeline.recipe import parse_recipe, read_recipe_text
    from lowrank_methods.pipeline.threads import check_threads

    text = read_recipe_text(recipe)
    threads = check_threads(threads)
    if out_shard_size is not None:  # a bad size fails before the merge
        from lowrank_methods.formats.full_model import parse_shard_size

        out_shard_size = parse_shard_size(out_shard_size)
    if push_to_hub:  # a missing token or a bad repo id fails before the merge, not after it
        check_can_push(push_to_hub, revision=hub["revision"], create_pr=hub["create_pr"])
    if is_full_model_recipe(text):  # lore, dense forms: full fine-tuned models, planned and written by mergekit
        if serve_for is not None:
            raise MergeError(f"--for {serve_for} stores an adapter; this recipe merges full models into a model")
        run_full_model_merge(text, out, overwrite=overwrite, device=device, quiet=quiet, write_card=not no_card,
                             threads=threads, executor=executor)
        if not quiet:
            click.echo(f"wrote {out}: full model merged by mergekit" + (" on Ray workers" if executor == "ray" else ""))
        if push_to_hub:
            push_folder(out, push_to_hub, quiet=quiet, **hub)
        return

    report = run_merge(parse_recipe(text), out, device=device, precision=precision, overwrite=overwrite,
                       allow_pickle=allow_pickle, quiet=quiet, write_card=not no_card, threads=threads,
                       out_shard_size=out_shard_size, serve_for=serve_for, executor=executor)
    if not quiet:
        s = report.summary()
        energy = f", retained energy min {s['retained_energy_min']:.4f} / median {s['retained_energy_median']:.4f}" \
            if "retained_energy_min" in s else ""
        click.echo(f"wrote {out}: {report.method} over {len(report.adapters)} adapters, {s['modules']} modules"
                   f"{energy}, {report.seconds:.1f} s")
        if report.serve_for:
            click.echo(serving_line(report))
        if report.output == "bundle":
            from lowrank_methods.formats.bundle import summary_table

            click.echo(summary_table(out))
    if push_to_hub:  # run_merge returned: OUT is complete and committed
        push_folder(out, push_to_hub, quiet=quiet, **hub)


@main.command()
@click.argument("target", metavar="RECIPE|ADAPTER", type=click.Path())
@click.option("--allow-pickle", is_flag=True, help="also accept adapter_model.bin")
@one_line_errors
def validate(target, allow_pickle):
    """Check RECIPE and its adapters (configs, headers, shapes, parameters, finite factors) without merging:
    every refusal `merge` could make before computing. Given an ADAPTER directory instead (ours or anyone's): which
    serving engines compute its ΔW as PEFT does, and why the others do not."""
    import tempfile

    from lowrank_methods.pipeline.engine import check_factors, prepare
    from lowrank_methods.mergekit_plugin.dense_run import is_full_model_recipe, mergekit_config
    from lowrank_methods.pipeline.recipe import parse_recipe, read_recipe_text

    if Path(target).is_dir():
        from lowrank_methods.pipeline.serving import adapter_verdicts
        from lowrank_methods.publish.card import span

        source, verdicts = adapter_verdicts(Path(target), allow_pickle=allow_pickle)
        ranks = [source.rank_alpha(m)[0] for m in source.modules]
        scales = [round(source.scale(m), 6) for m in source.modules]
        click.echo(f"ok: LoRA adapter, {len(source.modules)} modules, rank {span(ranks)}, scale {span(scales)}")
        for engine, verdict in verdicts.items():
            click.echo(verdict_line(verdict))
        return
    text = read_recipe_text(target)
    if is_full_model_recipe(text):
        config = mergekit_config(text)
        click.echo(f"ok: {config.merge_method} over {len(config.referenced_models())} full models (merged by mergekit)")
        return
    parsed = parse_recipe(text)
    with tempfile.TemporaryDirectory(prefix="mergekit-lowrank-validate-") as scratch:
        ready = prepare(parsed, allow_pickle=allow_pickle, scratch=Path(scratch))
        check_factors(ready)
    click.echo(f"ok: {parsed.method.name} over {len(ready.sources)} adapters, {len(ready.plan.modules)} modules, "
               f"base {ready.base or 'unknown'}")


def verdict_line(verdict) -> str:
    """``  vllm       yes (--max-lora-rank 16)`` or ``  sglang     no: …`` for one engine."""
    flag = f" (--max-lora-rank {verdict.max_lora_rank})" if verdict.ok and verdict.max_lora_rank else ""
    note = f"; {verdict.note}" if verdict.ok and verdict.note else ""
    head = f"  {verdict.engine:10s} "
    if verdict.ok:
        return f"{head}yes{flag}{note}"
    fix = "" if verdict.engine == "peft" else f" (merge with --for {verdict.engine} to fix)"
    return f"{head}no: {'; '.join(verdict.reasons)}{fix}"


def serving_line(report) -> str:
    """What the merge output is stored for and the flag the engine needs."""
    verdict = report.serving.get(report.serve_for, {})
    flag = f", serve with --max-lora-rank {verdict['max_lora_rank']}" if verdict.get("max_lora_rank") else ""
    gguf = " and adapter.gguf" if report.serve_for == "llama.cpp" else ""
    ranks = report.summary()
    padded = sum("update_rank" in stats for stats in report.modules.values())
    padding = f" ({padded} modules zero-padded to it)" if padded else ""
    return f"stored for {report.serve_for}: PEFT files{gguf} at rank {ranks.get('rank_max')}{padding}, scale 1{flag}"


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.argument("task")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@one_line_errors
def reconstruct(bundle, task, out, overwrite):
    """Write task TASK of the reversible BUNDLE (merge_method: rmm) back as a PEFT adapter in OUT."""
    from lowrank_methods.formats.bundle import ReversibleBundle
    from lowrank_methods.pipeline.staging import StagedOutput

    loaded = ReversibleBundle.load(bundle)
    adapter = loaded.rebuilt(task)  # every check before OUT (or its staging directory) is made
    loaded.check_outside(out)
    with StagedOutput(out, overwrite=overwrite) as stage:
        adapter.write(stage.path)
        stage.commit()
    error = loaded.manifest["tasks"][loaded.task_index(task)]["error"]
    click.echo(f"wrote {out}: task {task!r} rebuilt from {bundle} (relative error of ΔW {error:.3e})")


@main.command("export-gguf")
@click.argument("adapter", type=click.Path(file_okay=False))
@click.argument("base", metavar="BASE")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="replace OUT if it is a GGUF LoRA written by this tool")
@click.option("--allow-pickle", is_flag=True, help="also read adapter_model.bin (loaded with weights_only=True)")
@one_line_errors
def export_gguf_cmd(adapter, base, out, overwrite, allow_pickle):
    """Write the PEFT LoRA ADAPTER as llama.cpp's GGUF LoRA file OUT (for `llama-server -m BASE.gguf --lora OUT`).

    BASE names the tensors: the base's GGUF file (every tensor name and shape is checked against it), a model
    directory or config.json, or a Hub id (only its config.json is fetched)."""
    from lowrank_methods.pipeline.serving import export_for_llama_cpp

    done = export_for_llama_cpp(Path(adapter), base, Path(out), overwrite=overwrite, allow_pickle=allow_pickle)
    padded = f", {done.padded} modules zero-padded to it" if done.padded else ""
    click.echo(f"wrote {out}: {done.modules} modules at rank {done.rank} (alpha {done.rank}, scale 1){padded}, "
               f"{str(done.dtype).removeprefix('torch.')}")


@main.command("push")
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("repo_id", metavar="ORG/NAME")
@hub_options
@one_line_errors
def push_cmd(out, repo_id, **hub):
    """Upload the merge output OUT to the Hub repo ORG/NAME (created if missing; token from HF_TOKEN or the login)."""
    push_folder(out, repo_id, **hub)


@main.command("methods")
def methods_cmd():
    """List the merge methods."""
    from lowrank_methods.core.methods import lore
    from lowrank_methods.core.method import list_methods

    for m in list_methods():
        click.echo(f"{m.name:18s} {m.summary}")
    click.echo(f"{'lore':18s} {lore.SUMMARY}")


@main.command()
@click.argument("source", metavar="ORG/NAME[@REV]")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="change the recipe: a method parameter (rank=8), a top-level key (merge_method=mtc) or a dotted "
                   "path (models.0.parameters.weight=0.5); VALUE is YAML, null drops the key. Repeatable")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto")
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="dtype the merge is computed in")
@click.option("--dry-run", is_flag=True, help="print the recipe the remix would run, and merge nothing")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar or summary")
@one_line_errors
def remix(source, out, sets, overwrite, device, precision, dry_run, quiet):
    """Rerun the merge published at SOURCE (a Hub repo, or a local output folder) into OUT: the recipe its
    merge_report.json / card carries, with every Hub source pinned to a commit and --set applied."""
    from lowrank_methods.remix import plan_remix, run_remix

    plan = plan_remix(source, sets)
    if dry_run:
        click.echo(plan.recipe, nl=False)
        return
    if not quiet:
        for note in plan.notes:
            click.echo(note)
    report = run_remix(plan, out, overwrite=overwrite, device=device, precision=precision, quiet=quiet)
    if not quiet:
        what = f"{report.method} over {len(report.adapters)} adapters, {len(report.modules)} modules" if report \
            else "full model merged by mergekit"
        changed = f"; set {', '.join(sets)}" if sets else ""
        click.echo(f"wrote {out}: remix of {source}, {what}{changed}")


@main.command("recipes")
@one_line_errors
def recipes_cmd():
    """List the bundled recipes (recipes/*.yml) with what each does."""
    import os

    from lowrank_methods.remix import RECIPES_DIR, bundled_recipes

    found = bundled_recipes()
    width = max((len(r.name) for r in found), default=0)
    for r in found:
        click.echo(f"{r.name:{width}s}  {r.description or '(no description)'}")
    if found:
        where = os.path.relpath(RECIPES_DIR) if not os.path.relpath(RECIPES_DIR).startswith("..") else RECIPES_DIR
        click.echo(f"(in {where}; run one with: mergekit-lowrank merge {Path(where) / found[0].name} OUT)")


if __name__ == "__main__":
    main()

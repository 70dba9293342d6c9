"""`mergekit-lowrank`: merge, validate and list methods from the command line.

Every user error is printed as one line (``error: …``) with exit code 1; ``--verbose`` shows tracebacks.
"""

from __future__ import annotations

import functools
import sys

import click

from .errors import MergeError


def one_line_errors(fn):
    """Turn MergeError (and a few OS errors) into one clear line unless --verbose was given."""

    @functools.wraps(fn)
    def wrapper(*args, verbose: bool = False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (MergeError, OSError) as e:
            if verbose:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)

    return click.option("--verbose", "-v", is_flag=True, help="show full tracebacks")(wrapper)


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
@one_line_errors
def merge(recipe, out, device, precision, overwrite, allow_pickle, no_card, quiet):
    """Merge the adapters listed in RECIPE into OUT."""
    from .engine import run_merge
    from .recipe import load_recipe

    report = run_merge(load_recipe(recipe), out, device=device, precision=precision, overwrite=overwrite,
                       allow_pickle=allow_pickle, quiet=quiet, write_card=not no_card)
    if not quiet:
        s = report.summary()
        energy = f", retained energy min {s['retained_energy_min']:.4f} / median {s['retained_energy_median']:.4f}" \
            if "retained_energy_min" in s else ""
        click.echo(f"wrote {out}: {report.method} over {len(report.adapters)} adapters, {int(s['modules'])} modules"
                   f"{energy}, {report.seconds:.1f} s")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--allow-pickle", is_flag=True, help="also accept adapter_model.bin")
@one_line_errors
def validate(recipe, allow_pickle):
    """Check RECIPE and its adapters (configs, shapes, parameters) without merging."""
    from .engine import make_plan, open_sources
    from .recipe import load_recipe

    parsed = load_recipe(recipe)
    sources, base = open_sources(parsed, allow_pickle=allow_pickle)
    plan = make_plan(sources)
    parsed.check(plan.modules)
    click.echo(f"ok: {parsed.method.name} over {len(sources)} adapters, {len(plan.modules)} modules, base {base or 'unknown'}")


@main.command("methods")
def methods_cmd():
    """List the merge methods."""
    from .registry import list_methods

    for m in list_methods():
        click.echo(f"{m.name:18s} {m.summary}")


if __name__ == "__main__":
    main()

"""Rerun a merge someone shared: the recipe its output carries, sources pinned to commits, parameters changed.

Every output of ``merge`` carries its recipe (``merge_report.json``'s ``recipe``, and verbatim in the card's
"Recipe" section). ``mergekit-lowrank remix org/merged OUT`` reads it back from the Hub (or from a local output
folder), pins every Hub source to a commit, applies ``--set key=value`` overrides and merges again, so that

- without ``--set``, the remix writes the same adapter, byte for byte, as long as the sources are the same commits;
- the remix's own recipe (in its card and report) names those commits, so a remix of a remix is pinned entirely.

Which commit: the one ``merge_report.json`` records for the source (a ``commit`` field, or a ``revision`` that
already is a commit sha); a report that records none (outputs of this version of ``merge`` record only the
revision asked for) is pinned to the commit that revision points to *now*, and the remix says so.

Also here: the bundled recipes (``recipes/*.yml`` beside the package) and their one-line descriptions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lowrank_methods.core.errors import HubError, MergeError, RecipeError, one_line, short

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_BLOCK = re.compile(r"^## Recipe\s*\n+```ya?ml\n(?P<text>.*?)\n```", re.S | re.M)
MAX_REPORT_BYTES = 64 << 20  # a merge report lists every module; 64 MiB is far beyond any real one


# -- the bundled recipes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BundledRecipe:
    name: str
    path: Path
    description: str


def recipe_description(text: str) -> str:
    """The first line of the comment header a recipe starts with ('' when it has none)."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            return ""
        description = stripped.lstrip("#").strip()
        if description:
            return description
    return ""


def bundled_recipes(directory: Path = RECIPES_DIR) -> list[BundledRecipe]:
    """The recipes shipped in ``recipes/`` (a source checkout or an editable install has it), sorted by name."""
    if not directory.is_dir():
        raise MergeError(f"no bundled recipes here: {directory} does not exist (they ship with a source checkout "
                         "of mergekit-lowrank, not with the wheel)")
    return [BundledRecipe(p.name, p, recipe_description(p.read_text(encoding="utf-8", errors="replace")))
            for p in sorted(directory.glob("*.yml"))]


# -- reading a merge back --------------------------------------------------------------------------------
@dataclass
class MergedOutput:
    """A finished merge, as remix finds it: its report (which holds the recipe) and where it came from."""

    source: str              # what the user named: org/name[@revision] or a local folder
    report: dict
    recipe: str
    commit: str | None = None  # the Hub commit of the merged repo the report was read from


def load_merged(source: str) -> MergedOutput:
    """The report and recipe of the merge output ``source``: a local output folder, or a Hub repo
    ``org/name[@revision]`` (``merge_report.json``, or the card's Recipe section when the repo has no report)."""
    local = Path(source).expanduser()
    if local.is_dir():
        report = _read_report(local / "merge_report.json") if (local / "merge_report.json").is_file() else {}
        readme = local / "README.md"
        recipe = report.get("recipe") or (_recipe_from_card(readme.read_text(encoding="utf-8"), source)
                                          if readme.is_file() else "")
        if not recipe:
            raise RecipeError(f"{source} is a folder without merge_report.json or a card with a recipe; remix "
                              "takes the output of a merge (a folder, or org/name on the Hub)")
        return MergedOutput(source, report, recipe)

    from lowrank_methods.publish.hub import HUB_ID, download_file, snapshot_commit

    repo_id, _, revision = source.partition("@")
    if not HUB_ID.fullmatch(repo_id):
        raise RecipeError(f"{source!r} is neither a local merge output folder nor a Hub repo id (org/name[@revision])")
    what = f"remix {source}"
    try:
        path = download_file(repo_id, "merge_report.json", revision or None, what=what, max_bytes=MAX_REPORT_BYTES)
        report = _read_report(path)
        recipe = report.get("recipe") or ""
        if not recipe:
            raise RecipeError(f"{what}: merge_report.json of {source} holds no recipe")
    except HubError as e:
        if not getattr(e, "missing_file", False):
            raise
        path = download_file(repo_id, "README.md", revision or None, what=what, max_bytes=MAX_REPORT_BYTES)
        report, recipe = {}, _recipe_from_card(path.read_text(encoding="utf-8", errors="replace"), source)
    return MergedOutput(source, report, recipe, snapshot_commit(path.parent))


def _read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RecipeError(f"cannot read {path.name} of the merge: {short(str(e), 80)}") from e
    if not isinstance(report, dict):
        raise RecipeError(f"{path.name} of the merge is not a JSON object")
    return report


def _recipe_from_card(card: str, source: str) -> str:
    m = RECIPE_BLOCK.search(card)
    if not m or not m["text"].strip():
        raise RecipeError(f"the card (README.md) of {source} has no Recipe section; it was not written by "
                          "mergekit-lowrank merge")
    return m["text"] + "\n"


# -- the remix ---------------------------------------------------------------------------------------------
@dataclass
class Remix:
    """The recipe a remix runs, and what was done to get it (one line per note)."""

    merged: MergedOutput
    recipe: str
    notes: list[str] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)


def plan_remix(source: str, sets: list[str] | tuple[str, ...] = ()) -> Remix:
    """Read ``source``'s recipe, pin its Hub sources to commits, apply the ``key=value`` overrides; nothing merged."""
    from lowrank_methods.pipeline.recipe import load_yaml

    merged = load_merged(source)
    data = load_yaml(merged.recipe)
    if not isinstance(data, dict):
        raise RecipeError(f"the recipe of {source} is not a YAML mapping")
    stored_for = merged.report.get("serve_for")
    if stored_for and isinstance(data.get("parameters") or {}, dict) and "serve_for" not in (data.get("parameters") or {}):
        data["parameters"] = {**(data.get("parameters") or {}), "serve_for": stored_for}  # it came from --for
    apply_sets(data, sets)
    _check(data)  # a bad --set fails here, before any adapter is looked up
    notes = pin_sources(data, merged)
    at = f"{source.partition('@')[0]}@{merged.commit}" if merged.commit else source
    header = [f"# Remix of {at} (mergekit-lowrank remix): Hub sources pinned to commits."]
    header += [f"# --set {one_line(s, 120)}" for s in sets]
    text = "\n".join(header) + "\n" + _dump(data)
    _check(data)
    return Remix(merged, text, notes, list(sets))


def _dump(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _check(data: dict) -> None:
    """The recipe's own checks (method, parameters, weights), as ``merge`` makes them before reading any adapter."""
    from lowrank_methods.mergekit_plugin.dense_run import is_full_model_recipe
    from lowrank_methods.pipeline.recipe import parse_recipe

    text = _dump(data)
    if not is_full_model_recipe(text):
        parse_recipe(text)


def pin_sources(data: dict, merged: MergedOutput) -> list[str]:
    """Rewrite every Hub source of the recipe's ``models:`` as ``org/name@<commit>``; returns one note per source."""
    from lowrank_methods.publish.hub import COMMIT, HUB_ID, resolved_commit

    described = merged.report.get("adapters") or []
    notes = []
    for i, entry in enumerate(data.get("models") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            continue
        base, plus, adapter = entry["model"].rpartition("+")
        repo, _, revision = adapter.partition("@")
        if Path(repo).expanduser().is_dir():  # a local directory wins over a Hub id, as in merge
            notes.append(f"source {repo}: a local directory here, not pinned")
            continue
        if not HUB_ID.fullmatch(repo):
            raise RecipeError(f"source {repo!r} of {merged.source} was a local directory where it was merged, and "
                              "is not one here; run the remix where it exists")
        recorded = _recorded_commit(described, i, repo)
        if revision and COMMIT.fullmatch(revision):
            sha, how = revision, "pinned by the recipe"
        elif recorded:
            sha, how = recorded, "the commit merge_report.json records"
        else:
            sha = resolved_commit(repo, revision or None)
            how = (f"merge_report.json records no commit: pinned to the commit {revision or 'main'} points to now "
                   "(if it moved since the merge, the result differs)")
        entry["model"] = f"{base}{plus}{repo}@{sha}"
        notes.append(f"source {repo} pinned to {sha[:12]}: {how}")
    return notes


def _recorded_commit(described: list, index: int, repo: str) -> str | None:
    from lowrank_methods.publish.hub import COMMIT

    candidates = [described[index]] if index < len(described) else []
    candidates += [a for a in described if a not in candidates]
    for a in candidates:
        if isinstance(a, dict) and a.get("source") == repo:
            for key in ("commit", "sha", "revision"):
                value = a.get(key)
                if isinstance(value, str) and COMMIT.fullmatch(value):
                    return value
            return None
    return None


def apply_sets(data: dict, sets) -> None:
    """``key=value`` overrides, the value parsed as YAML (``rank=8``, ``rule=ta``, ``lambda=[0.5, 1]``, ``rank=null``
    to drop it). A bare key is a method parameter (``parameters.<key>``) unless it is a top-level recipe key
    (``merge_method``, ``base_model``, ``dtype``…); dotted keys reach anywhere: ``models.0.parameters.weight=0.5``."""
    from lowrank_methods.pipeline.recipe import RecipeFile, load_yaml

    top = set(RecipeFile.model_fields)
    for item in sets:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise RecipeError(f"--set {short(item)}: write KEY=VALUE, e.g. --set rank=8")
        value = load_yaml(raw) if raw.strip() else None
        path = key.split(".")
        if path[0] not in top:
            path = ["parameters", *path]
        _set_path(data, path, value, item)


def _set_path(data, path: list[str], value, item: str) -> None:
    node = data
    for depth, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_index(node, part, item)]
        elif isinstance(node, dict):
            if not isinstance(node.get(part), (dict, list)):
                if value is None:
                    return  # dropping a key that is not there
                node[part] = {}
            node = node[part]
        else:
            raise RecipeError(f"--set {short(item)}: {'.'.join(path[:depth])} is not a mapping or a list")
    last = path[-1]
    if isinstance(node, list):
        i = _index(node, last, item)
        if value is None:
            del node[i]
        else:
            node[i] = value
    elif isinstance(node, dict):
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    else:
        raise RecipeError(f"--set {short(item)}: {'.'.join(path[:-1])} is not a mapping or a list")


def _index(node: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"--set {short(item)}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def run_remix(plan: Remix, out, *, overwrite: bool = False, device: str = "cpu", precision: str = "float32",
              quiet: bool = False, threads: int | None = None):
    """Merge the remix's recipe into ``out`` exactly as ``mergekit-lowrank merge`` would; returns its MergeReport
    (None for a full-model recipe, which mergekit writes)."""
    from lowrank_methods.mergekit_plugin.dense_run import is_full_model_recipe, run_full_model_merge

    if is_full_model_recipe(plan.recipe):
        run_full_model_merge(plan.recipe, out, overwrite=overwrite, device=device, quiet=quiet, write_card=True,
                             threads=threads)
        return None
    from lowrank_methods.pipeline.engine import run_merge
    from lowrank_methods.pipeline.recipe import parse_recipe

    return run_merge(parse_recipe(plan.recipe), out, device=device, precision=precision, overwrite=overwrite,
                     quiet=quiet, threads=threads)

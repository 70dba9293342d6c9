"""The model card of a merge result (README.md): Hub metadata plus a plain-words account of the merge.

Metadata goes through ``huggingface_hub.ModelCardData`` (never hand-written YAML): ``base_model`` is the one
base, ``base_model_relation`` says adapter or merge, so the Hub's model tree and inference widgets see it.
Everything comes from the ``MergeReport`` in its public form (``public_report``: JSON-able, local paths
cut to their last component, tokens scrubbed), which is also what merge_report.json holds, so a card can be
re-rendered later from the output folder alone. The text is ``templates/model_card.md`` (Jinja, through
``ModelCard.from_template``), which holds the layout and the prose; every value it shows is computed here, and
a method's paper or link comes from its registry decorator.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lowrank_methods.core.method import Link, Paper

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
PLOT = "retained_energy.png"
LAYER = re.compile(r"\.(\d+)\.")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{30,}")
TAGS = ["lora", "peft", "merge", "mergekit", "mergekit-lowrank"]
PIPELINES = {"CAUSAL_LM": "text-generation", "SEQ_2_SEQ_LM": "text2text-generation", "SEQ_CLS": "text-classification",
             "TOKEN_CLS": "token-classification", "QUESTION_ANS": "question-answering",
             "FEATURE_EXTRACTION": "feature-extraction"}
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering"}


# -- the public report -------------------------------------------------------------------------------
def public_report(report) -> dict:
    """The report as JSON-able data fit to publish: absolute local paths cut to their directory name,
    the home directory and anything token-like removed. Idempotent; merge_report.json holds this."""
    data = report if isinstance(report, dict) else report.to_dict()
    data = json.loads(json.dumps(data, default=_jsonable))
    local = [s for s in _path_fields(data) if is_local_path(s)]
    return _scrub(data, {p: Path(p.rstrip("/\\")).name or p for p in sorted(local, key=len, reverse=True)})


def _path_fields(data: dict) -> list[str]:
    fields = [data.get("base_model")]
    for a in data.get("adapters", []):
        fields += [a.get("source"), a.get("base")]
    return [f for f in fields if isinstance(f, str)]


def is_local_path(s: str) -> bool:
    return s.startswith("~") or Path(s).is_absolute() or bool(re.match(r"[A-Za-z]:[\\/]", s))


def _scrub(value, replacements: dict[str, str]):
    if isinstance(value, dict):
        return {k: _scrub(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, replacements) for v in value]
    if isinstance(value, str):
        return scrub_text(value, replacements)
    return value


def scrub_text(text: str, replacements: dict[str, str] | None = None) -> str:
    """Replace the given local paths, then the home directory, then any token, in ``text``."""
    for path, name in (replacements or {}).items():
        text = text.replace(path, name)
    home = os.path.expanduser("~").rstrip("/\\")
    if len(home) > 1:  # as a whole path component only: /root/x, not org/rootstock
        text = re.sub(rf"(?<![\w.-]){re.escape(home)}(?=[/\\\s'\"`]|$)", "~", text)
    for secret in _tokens():
        text = text.replace(secret, "<token>")
    return TOKEN_LIKE.sub("<token>", text)


def _tokens() -> list[str]:
    """The tokens this machine would use (env and login file; never get_token(), which may go online for OIDC)."""
    found = [os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import constants

        found.append(Path(constants.HF_TOKEN_PATH).read_text().strip())
    except (ImportError, OSError, UnicodeDecodeError):
        pass
    return [t.strip() for t in found if t and len(t.strip()) >= 8]


def _jsonable(value):
    dump = getattr(value, "model_dump", None)  # pydantic settings (filters) as plain data
    return dump(exclude_none=True, by_alias=True) if dump else str(value)


# -- the card ----------------------------------------------------------------------------------------
def write_card(path: Path, report, repo_id: str | None = None) -> None:
    """README.md and the retained-energy plot for the output directory ``path``."""
    data = public_report(report)
    plot = PLOT if _plot_energy(Path(path) / PLOT, data) else None
    (Path(path) / "README.md").write_text(render_card(data, repo_id=repo_id, plot=plot), encoding="utf-8")


def render_card(report, *, repo_id: str | None = None, plot: str | None = None) -> str:
    """The card's text: ``templates/model_card.md`` filled with the YAML metadata (via ModelCardData) and the
    values ``_template_values`` computes; the template holds the layout and the prose, Python every value."""
    from huggingface_hub import ModelCard

    data = public_report(report)
    card = ModelCard.from_template(card_data(data), template_path=TEMPLATE, **_template_values(data, repo_id, plot))
    return scrub_text(str(card)).rstrip() + "\n"


def card_data(data: dict):
    from huggingface_hub import ModelCardData

    output, base, method = data.get("output", "adapter"), data.get("base_model"), data["method"]
    # a bundle is not loadable as it is (its adapters are rebuilt first), so it claims no library
    library = {"model": "transformers", "adapter": "peft"}.get(output)
    fields = {"tags": TAGS + [method] + (["transformers"] if output == "model" else [])}
    if library:
        fields["library_name"] = library
    if base and _is_hub_id(base):
        fields |= {"base_model": base.partition("@")[0], "base_model_relation": "merge" if output == "model" else "adapter"}
    if PIPELINES.get(data.get("task_type")):
        fields["pipeline_tag"] = PIPELINES[data["task_type"]]
    return ModelCardData(**fields)


# -- the template's variables, section by section (named apart from card_data's keys, which it also gets) ----
def _template_values(d: dict, repo_id: str | None, plot: str | None) -> dict:
    """Every name, link, number and table row the card shows, formatted as it shows them.
    The template only places them, so a change of wording or layout is an edit of the template alone."""
    return {**_intro_values(d, repo_id), **_method_values(d), **_usage_values(d, repo_id), **_report_values(d, plot),
            **_serving_values(d, repo_id), "recipe": d.get("recipe", "").strip()}


def _intro_values(d: dict, repo_id: str | None) -> dict:
    """What the result is (its kind, method, base model) and the source adapters' table rows."""
    base = d.get("base_model")
    return {"output": d.get("output", "adapter"), "method": d["method"], "pretty_name": d["pretty_name"],
            "repo_name": repo_id.split("/")[-1] if repo_id else None,
            "base_link": _link(base, d.get("base_model_on_hub")) if base else None,
            "adapter_count": len(d["adapters"]), "source_rows": _source_rows(d["adapters"])}


def _source_rows(adapters: list[dict]) -> list[tuple]:
    """Per source adapter: number, link, revision, ranks, LoRA scales (marked rsLoRA), recipe weight, modules."""
    return [(i, _link(a["source"], a.get("on_hub")), a.get("revision") or "", _listing(a.get("ranks", [])),
             ", ".join(f"{s:g}" for s in a.get("scales", [])) + (" (rsLoRA)" if a.get("rslora") else ""),
             a.get("weight", 1.0), a.get("modules", "")) for i, a in enumerate(adapters, 1)]


def _method_values(d: dict) -> dict:
    """The method's paper (and its BibTeX), or its link, or else the report's reference URL; its one-line summary
    and the recipe's parameters as (name, JSON value) rows."""
    paper, link, summary = _method_reference(d["method"])
    return {"paper": paper, "link": link, "reference_url": d.get("reference_url"), "summary": summary,
            "citation": paper.bibtex() if paper else None,
            "parameter_rows": [(k, json.dumps(v)) for k, v in (d.get("parameters") or {}).items()]}


def _method_reference(name: str) -> tuple[Paper | None, Link | None, str]:
    """(paper, link, summary) of method ``name`` from its registry decorator; lore runs through mergekit, outside
    the registry, so its paper comes from its module; a method this install does not know has none."""
    from lowrank_methods.core.errors import RecipeError
    from lowrank_methods.core.method import get_method

    try:
        method = get_method(name)
    except RecipeError:
        if name != "lore":
            return None, None, ""
        from lowrank_methods.core.methods.lore import PAPER

        return PAPER, None, ""
    return method.paper, method.link, method.summary


def _usage_values(d: dict, repo_id: str | None) -> dict:
    """What the usage snippets load: the Auto class, where the result is, the base model's ``from_pretrained``
    arguments, and for a bundle the adapter rebuilt from it (the first source) and where."""
    base, _, revision = (d.get("base_model") or "BASE_MODEL").partition("@")
    location = repo_id or "path/to/this/folder"
    task = d["adapters"][0]["name"] if d.get("adapters") else "TASK"
    return {"repo_id": repo_id, "location": location, "auto_class": AUTO_CLASSES.get(d.get("task_type"), "AutoModel"),
            "base_args": f'"{base}", revision="{revision}"' if revision else f'"{base}"',
            "task": task, "bundle_folder": repo_id.split("/")[-1] if repo_id else location,
            "adapter_folder": f"{task}-adapter" if d.get("output") == "bundle" else location,
            "base_is_local": d.get("base_model_on_hub", True) is False or not d.get("base_model")}


def _serving_values(d: dict, repo_id: str | None) -> dict:
    """Per serving engine (the report's verdicts of the written adapter): the command that serves it, or why that
    engine would not compute the same update, and the profile the adapter was stored for."""
    from lowrank_methods.formats.serving import serve_command

    base = (d.get("base_model") or "BASE_MODEL").partition("@")[0]
    name = (repo_id or "merged").split("/")[-1]
    location = repo_id.split("/")[-1] if repo_id else "path/to/this/folder"  # engines read a local folder
    served, refused = [], []
    for engine, v in (d.get("serving") or {}).items():
        if engine == "peft":
            continue
        if v.get("ok"):
            served.append((engine, serve_command(engine, base, location, name, v.get("max_lora_rank"),
                                                 has_gguf=v.get("note") is None)))
        else:
            refused.append((engine, "; ".join(v.get("reasons", []))))
    return {"serve_for": d.get("serve_for"), "served_rows": served, "refused_rows": refused,
            "serve_rank": next((v.get("max_lora_rank") for v in (d.get("serving") or {}).values()
                                if v.get("max_lora_rank")), None)}


def _report_values(d: dict, plot: str | None) -> dict:
    """The merge report's numbers (module count, seconds, output rank span, retained energy), the plot's file
    name, and the per-layer and per-module table rows."""
    modules: dict[str, dict] = d.get("modules") or {}
    s = d.get("summary") or {}
    return {"module_count": len(modules), "seconds": f"{d.get('seconds', 0.0):.1f}", "device": d.get("device", "cpu"),
            "rank_min": _formatted(s, "rank_min", "g"), "rank_max": _formatted(s, "rank_max", "g"),
            "energy_min": _formatted(s, "retained_energy_min", ".4f"),
            "energy_median": _formatted(s, "retained_energy_median", ".4f"),
            "layer_rows": _layer_rows(modules), "plot": plot,
            "module_rows": [(m, _num(x.get("rank")), _num(x.get("retained_energy"))) for m, x in modules.items()]}


def _layer_rows(modules: dict[str, dict]) -> list[tuple]:
    """Per decoder layer: its index, module count, rank span, min and median retained energy."""
    rows = []
    for layer, stats in by_layer(modules).items():
        ranks = [x["rank"] for x in stats if "rank" in x]
        energy = [x["retained_energy"] for x in stats if "retained_energy" in x]
        rows.append((layer, len(stats), span(ranks), _num(min(energy) if energy else None),
                     _num(statistics.median(energy) if energy else None)))
    return rows


def by_layer(modules: dict[str, dict]) -> dict[str, list[dict]]:
    """Module statistics grouped by decoder layer index (modules outside the layer stack under "other")."""
    groups: dict[str, list[dict]] = {}
    for module, stats in modules.items():
        m = LAYER.search(module)
        groups.setdefault(m.group(1) if m else "other", []).append(stats)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] == "other", int(kv[0]) if kv[0].isdigit() else 0)))


def _plot_energy(path: Path, data: dict) -> bool:
    """retained_energy.png: min and median retained energy per layer; False when there is nothing to plot."""
    layers = {int(k): [x["retained_energy"] for x in v if "retained_energy" in x]
              for k, v in by_layer(data.get("modules") or {}).items() if k.isdigit()}
    layers = {k: v for k, v in layers.items() if v}
    if not layers:
        return False
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # matplotlib is a dependency, but a card without the plot beats no card
        return False
    xs = sorted(layers)
    fig = Figure(figsize=(6, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, [min(layers[x]) for x in xs], "o-", label="min")
    ax.plot(xs, [statistics.median(layers[x]) for x in xs], "s--", label="median")
    ax.set(xlabel="layer", ylabel="retained energy", ylim=(0, 1.02), title=f"Retained energy by layer ({data['method']})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return True


def _is_hub_id(s: str) -> bool:
    return bool(HUB_ID.fullmatch(s.partition("@")[0])) and not Path(s).expanduser().exists()


def _link(source: str, on_hub: bool | None = None) -> str:
    """A Hub link for a Hub id, plain code for a local path. ``on_hub`` is what the merge itself resolved (stored in
    the report), so the card does not depend on the directory it is rendered from; old reports lack it."""
    repo = source.partition("@")[0]
    hub = _is_hub_id(source) if on_hub is None else on_hub and bool(HUB_ID.fullmatch(repo))
    return f"[{source}](https://huggingface.co/{repo})" if hub else f"`{source}`"


def _listing(values: list) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def span(values: list) -> str:
    """``4`` or ``4–32``: the range of some numbers, as the card and the CLI print it."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"


def _formatted(summary: dict, key: str, spec: str) -> str | None:
    """``summary[key]`` formatted with ``spec``; None when the merge did not report it."""
    return format(summary[key], spec) if key in summary else None


def _num(x) -> str:
    if x is None:
        return ""
    return f"{x:.4f}" if isinstance(x, float) and x != int(x) else f"{x:g}"

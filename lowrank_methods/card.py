"""The model card of a merge result (README.md), built with huggingface_hub's ModelCard."""

from __future__ import annotations

from pathlib import Path


def write_card(path: Path, report) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=report.base_model, library_name="peft",
                         tags=["lora", "peft", "merge", "mergekit", "mergekit-lowrank", report.method])
    lines = [f"# Merged LoRA adapter ({report.pretty_name})", "",
             f"Merged with `mergekit-lowrank` using **{report.pretty_name}** from {len(report.adapters)} adapters:", ""]
    lines += [f"- `{a['source']}` (rank {', '.join(map(str, a['ranks']))}, weight {a['weight']})" for a in report.adapters]
    lines += ["", "## Recipe", "", "```yaml", report.recipe.strip(), "```", ""]
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)).save(path / "README.md")

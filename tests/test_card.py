"""The model card: Hub metadata that round-trips through ModelCard, a body that tells the whole merge, no leaks."""

import json
import re
import statistics
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData

from helpers import BASE, write_adapter, write_recipe
from lowrank_methods.publish.card import PLOT, TEMPLATE, by_layer, card_data, public_report, render_card
from lowrank_methods.pipeline.engine import run_merge
from lowrank_methods.pipeline.recipe import load_recipe
from lowrank_methods.core.method import get_method, list_methods
from lowrank_methods.core.methods.lore import PAPER as LORE_PAPER

SHAPES = {f"model.layers.{i}.self_attn.{p}": (12, 8) for i in range(3) for p in ("q_proj", "v_proj")}
FAKE_TOKEN = "hf_SecretSecretSecret1234567890"
REQUIRED_TAGS = {"lora", "peft", "merge", "mergekit", "mergekit-lowrank"}


@pytest.fixture
def merge(tmp_path, monkeypatch):
    """A real mtc merge of two adapters given by absolute paths, with a fake token in the environment."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    a = write_adapter(tmp_path / "adapters" / "math-lora", SHAPES, seed=1, r=4, alpha=8)
    b = write_adapter(tmp_path / "adapters" / "code-lora", SHAPES, seed=2, r=2, alpha=2, rslora=True)
    recipe = write_recipe(tmp_path / "r.yml", "mtc", [(a, 0.75), (b, 0.25)], {"rank": 3, "lambda": 0.9})
    out = tmp_path / "out"
    report = run_merge(load_recipe(recipe), out, quiet=True)
    return out, report, tmp_path


def test_card_of_a_real_merge_round_trips_with_hub_metadata(merge):
    out, report, _ = merge
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert REQUIRED_TAGS | {"mtc"} <= set(meta["tags"])
    again = ModelCard(str(card))  # what ModelCard.validate checks offline: the YAML parses back to the same data
    assert again.data.to_dict() == meta
    ModelCardData(**meta, ignore_metadata_errors=False)
    assert card.content.startswith("---\n") and (out / "README.md").read_text() == str(card).rstrip() + "\n"


def test_card_body_tells_the_whole_merge(merge):
    out, report, _ = merge
    text = (out / "README.md").read_text()
    assert "| 1 | `math-lora` |  | 4 | 2 | 0.75 | 6 |" in text  # name, rank, scale alpha/r, weight, modules
    assert "| 2 | `code-lora` |  | 2 | 1.41421 (rsLoRA) | 0.25 | 6 |" in text  # alpha/sqrt(r)
    paper = get_method("mtc").paper
    assert f"[{paper.title}]({paper.url})" in text and "```bibtex\n@misc{" in text and paper.title in text
    assert "| `rank` | `3` |" in text and "| `lambda` | `0.9` |" in text
    assert 'PeftModel.from_pretrained(base, "path/to/this/folder")' in text
    assert f'AutoModelForCausalLM.from_pretrained("{BASE}")' in text
    recipe_block = text.split("## Recipe\n\n```yaml\n")[1].split("```")[0]
    assert recipe_block.strip() == report.recipe.strip().replace(str(out.parent / "adapters") + "/", "")
    assert f"{len(SHAPES)} modules merged in {report.seconds:.1f} s on cpu" in text


def test_merge_report_per_layer_summary_and_plot(merge):
    out, report, _ = merge
    text = (out / "README.md").read_text()
    for layer in range(3):
        energies = [s["retained_energy"] for m, s in report.modules.items() if f".{layer}." in m]
        ranks = {int(s["rank"]) for m, s in report.modules.items() if f".{layer}." in m}
        rank = str(ranks.pop()) if len(ranks) == 1 else f"{min(ranks)}–{max(ranks)}"
        assert f"| {layer} | 2 | {rank} | {min(energies):.4f} | {statistics.median(energies):.4f} |" in text
    for module, stats in report.modules.items():
        assert f"| `{module}` | {int(stats['rank'])} | {stats['retained_energy']:.4f} |" in text
    assert f"![Retained energy by layer]({PLOT})" in text
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_token_and_no_absolute_path_in_card_or_report(merge):
    out, _, tmp_path = merge
    for name in ("README.md", "merge_report.json"):
        text = (out / name).read_text()
        assert FAKE_TOKEN not in text and str(tmp_path) not in text, name
        assert not re.search(r"(^|[\s'\"`(])/(tmp|home|root|Users)/", text), name
    report = json.loads((out / "merge_report.json").read_text())
    assert [a["source"] for a in report["adapters"]] == ["math-lora", "code-lora"]
    assert public_report(report) == report  # idempotent: the card re-renders from merge_report.json


def synthetic(method="mtc", output="adapter", **extra):
    modules = {"model.layers.0.mlp.down_proj": {"rank": 4.0, "retained_energy": 0.9},
               "model.layers.1.mlp.down_proj": {"rank": 2.0, "retained_energy": 0.5},
               "model.layers.1.mlp.up_proj": {"rank": 3.0, "retained_energy": 0.7},
               "lm_head": {"rank": 1.0, "retained_energy": 1.0}}
    return {"method": method, "pretty_name": extra.pop("pretty_name", "Some Method"), "output": output,
            "reference_url": extra.pop("reference_url", None), "base_model": "org/base", "task_type": "CAUSAL_LM",
            "adapters": [{"name": "a", "source": "org/lora-a", "revision": "v1", "ranks": [8], "scales": [2.0],
                          "rslora": False, "modules": 4, "weight": 1.0}],
            "parameters": {}, "modules": modules, "seconds": 1.5, "device": "cpu", "recipe": "merge_method: x\n",
            "summary": {"modules": 4.0}, **extra}


def test_hub_sources_are_linked_with_their_revision():
    text = render_card(synthetic())
    assert "| 1 | [org/lora-a](https://huggingface.co/org/lora-a) | v1 | 8 | 2 | 1.0 | 4 |" in text


def test_by_layer_groups_and_orders():
    groups = by_layer(synthetic()["modules"])
    assert list(groups) == ["0", "1", "other"] and len(groups["1"]) == 2


def test_full_model_output_is_a_merge_for_transformers():
    card = ModelCard(render_card(synthetic(output="model"), repo_id="org/merged-model"))
    meta = card.data.to_dict()
    assert meta["base_model_relation"] == "merge" and meta["library_name"] == "transformers"
    assert meta["base_model"] == "org/base"
    assert 'AutoModelForCausalLM.from_pretrained("org/merged-model")' in card.text and "PeftModel" not in card.text


def test_bundle_output_says_it_is_reversible():
    card = ModelCard(render_card(synthetic(method="rmm", output="bundle"), repo_id="org/bundle"))
    assert "reversible bundle (RMM)" in card.text and get_method("rmm").paper.title in card.text
    assert "hf download org/bundle --local-dir bundle\nmergekit-lowrank reconstruct bundle a a-adapter\n" in card.text
    assert 'PeftModel.from_pretrained(base, "a-adapter")' in card.text
    meta = card.data.to_dict()
    assert meta["base_model_relation"] == "adapter" and "library_name" not in meta


def test_unknown_method_gets_registry_name_and_url_only():
    text = render_card(synthetic(method="brand_new", pretty_name="Brand New Merge", reference_url="https://example.org/p"))
    assert "**Brand New Merge** (`brand_new`). Reference: https://example.org/p" in text
    assert "## Citation" not in text


def test_local_base_is_not_hub_metadata():
    meta = card_data(public_report(synthetic(base_model="/abs/path/to/base"))).to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta


def test_every_method_cites_its_paper_or_links_its_definition():
    for m in list_methods():
        assert m.paper or m.link, m.name
        card = ModelCard(render_card(synthetic(method=m.name, pretty_name=m.pretty_name, reference_url=m.reference_url,
                                               output=m.output)))
        assert m.name in card.data.to_dict()["tags"] and m.reference_url in card.text
        if m.paper:
            assert m.paper.bibtex() in card.text
        else:
            assert f"as in [{m.link.text}]({m.link.url})." in card.text and "## Citation" not in card.text


def test_lore_runs_outside_the_registry_but_its_card_cites_its_paper():
    text = render_card(synthetic(method="lore", pretty_name="LoRE-Merging", output="model"))
    assert f"from [{LORE_PAPER.title}]({LORE_PAPER.url})." in text and LORE_PAPER.bibtex() in text


def test_the_space_is_staged_with_the_template(tmp_path, monkeypatch):
    """The Space imports the package from its staged copy, so the card's template must be staged with it."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "space"))
    import deploy

    assert TEMPLATE.relative_to(root).as_posix() in deploy.stage(tmp_path / "space")


def test_scrub_text_removes_home_as_a_path_only(monkeypatch):
    from lowrank_methods.publish.card import scrub_text

    monkeypatch.setenv("HOME", "/home/alice")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    text = scrub_text(f"model: /home/alice/loras/a\nother: org/home/alicea\ntoken: {FAKE_TOKEN} hf_{'x' * 34}\n")
    assert text == "model: ~/loras/a\nother: org/home/alicea\ntoken: <token> <token>\n"


def test_local_sources_stay_local_whatever_directory_renders_the_card(tmp_path, monkeypatch):
    """`adapters/x` relative to the merge's directory is decided local at merge time and stored; rendering the card
    from another directory (where `adapters/x` does not exist) must not turn it into a Hub link."""
    work = tmp_path / "work"
    a = write_adapter(work / "adapters" / "math-lora", SHAPES, seed=1)
    b = write_adapter(work / "adapters" / "code-lora", SHAPES, seed=2)
    monkeypatch.chdir(work)
    recipe = write_recipe(work / "r.yml", "mtc", [(a.relative_to(work), None), (b.relative_to(work), None)], {"rank": 2})
    run_merge(load_recipe(recipe), work / "out", quiet=True)
    data = json.loads((work / "out" / "merge_report.json").read_text())
    assert [s["on_hub"] for s in data["adapters"]] == [False, False]
    monkeypatch.chdir(tmp_path)
    body = render_card(data)
    assert "huggingface.co/adapters" not in body and "`adapters/math-lora`" in body
    assert "Output rank 2." in body and isinstance(data["summary"]["modules"], int)
    assert all(isinstance(m["rank"], int) for m in data["modules"].values())

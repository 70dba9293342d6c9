"""The three places where the plugin replaces mergekit 0.1.5 code, all installed by ``install_patches``.

mergekit has no hook for either thing the plugin needs, so each is one function swapped in place:

1. ``mergekit.merge.run_merge`` → ``route.run_merge``: checks the method name and parameters before any
   download or load, and sends recipes of our methods to our engine (stock methods go on unchanged).
2. ``mergekit.io.tasks.LoaderCache.get`` → ``base+lora`` references are read through ``DirectLoraLoader``
   (W + s·B@A per tensor) instead of ``ModelReference.merged`` (a full merged model on disk).
3. ``mergekit.merge._get_donor_model`` → a ``base+lora`` donor (tokenizer, tag-along files) is the base
   model's own directory instead of ``.merged()``, which needs ``--lora-merge-cache``.

``REPLACED`` records a hash of each replaced function's source; ``stale_patches()`` lists the ones whose
source changed, and a test fails on any. Patches must run after ``mergekit.merge`` has finished importing
(``run_yaml`` binds ``run_merge`` by ``from mergekit.merge import run_merge`` right after that).
"""

from __future__ import annotations

import hashlib
import inspect
import warnings

from lowrank_methods.mergekit_plugin.swap import original, replace

# "module:qualname" of each replaced function -> sha256 of its source in mergekit 0.1.5
REPLACED = {
    "mergekit.merge:run_merge": "4456933bae68952d5f8afa38c7ff06727261c5a6330d3b82e476f9b3817c0067",
    "mergekit.io.tasks:LoaderCache.get": "814bddf2f136ee78ba12a7bcda04594d626fd0f5142128cbebc0e12f6085bee1",
    "mergekit.merge:_get_donor_model": "349c86d95e11a7de4829befa582a969006fa207a7bc260272a7fdbb900c8a6db",
}


def install_patches() -> None:
    """Install the three patches (idempotent). Needs ``mergekit.merge`` fully imported."""
    import importlib

    from mergekit.io.tasks import LoaderCache

    from lowrank_methods.mergekit_plugin import route

    merge = importlib.import_module("mergekit.merge")  # not `import mergekit.merge`: the package attribute
    replace(merge, "run_merge", route.run_merge)      # is set only after the hook's exec_module returns
    replace(LoaderCache, "get", _loader_cache_get)
    replace(merge, "_get_donor_model", _get_donor_model)
    for name in stale_patches():
        warnings.warn(f"mergekit-lowrank: mergekit's {name} is not the 0.1.5 code this plugin patches; "
                      "results may be wrong, install mergekit==0.1.5", stacklevel=2)


def stale_patches() -> list[str]:
    """Replaced functions whose mergekit source differs from what the patches were written against."""
    import importlib

    stale = []
    for target, digest in REPLACED.items():
        module, _, qualname = target.partition(":")
        owner = importlib.import_module(module)
        *path, name = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        if source_digest(original(owner, name)) != digest:
            stale.append(target)
    return stale


def source_digest(fn) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


# -- patch 2: replaces LoaderCache.get (mergekit/io/tasks.py), which calls ModelReference.merged -------------
def _loader_cache_get(self, model):
    from mergekit.common import ModelReference

    from lowrank_methods.mergekit_plugin.loader import DirectLoraLoader, open_adapter

    if model.lora is not None and model not in self.loaders:
        base = self.get(ModelReference(model=model.model, override_architecture=model.override_architecture))
        self.loaders[model] = DirectLoraLoader(base, open_adapter(model.lora, model.model))
    return original(type(self), "get")(self, model)


# -- patch 3: replaces mergekit.merge._get_donor_model, which calls donor.merged(cache_dir=...) -------------
def _get_donor_model(merge_config, options):
    import mergekit.merge
    from mergekit.common import ModelReference

    donor = merge_config.base_model or merge_config.referenced_models()[0]
    if donor.lora is None:
        return original(mergekit.merge, "_get_donor_model")(merge_config, options)
    base = ModelReference(model=donor.model, override_architecture=donor.override_architecture)
    return donor, base.local_path(cache_dir=options.transformers_cache)

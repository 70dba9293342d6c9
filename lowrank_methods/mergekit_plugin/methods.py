"""Our methods as entries of mergekit's method registry, so mergekit knows their names, parameters and card text.

A factor method needs the LoRA factors, which mergekit's graph never hands to a method (it passes dense
tensors of one shape); ``route.run_merge`` sends ``mergekit-yaml`` recipes of our methods to our engine before
mergekit plans anything. Reached through mergekit's generic dense API instead (``merge_state_dicts``,
``merge_tensors``, any ``GroupMergeMethod`` caller), a registered method runs its full-model form on the task
vectors θ_t − θ_0 (θ_0 = 0 without a base): ``dense.py`` says what each method computes there.

Parameters: ``weight`` per non-base input (as mergekit's task-arithmetic methods), then every field of the method's
pydantic model as a shared parameter of type ``Any``, validated by that model on each call (one-line errors).
"""

from __future__ import annotations

import warnings
from typing import Any


def mergekit_method(method):
    """mergekit 0.1.5 method object describing one of our registry's methods."""
    from mergekit.merge_methods import BasePolicy, GroupMergeMethod, InputContract, MergeMethodSpec, ParameterScope
    from mergekit.merge_methods.base import ParameterSpec

    params = [ParameterSpec("weight", float, ParameterScope.NON_BASE, default=1.0,
                            description="weight of this adapter (of this model's task vector)")]
    for name, field in method.fields.items():
        extra = {} if field.is_required() else {"default": field.default}
        params.append(ParameterSpec(field.alias or name, Any, ParameterScope.SHARED, description=field.description or "",
                                    **extra))
    params.append(ParameterSpec("output", Any, ParameterScope.SHARED, default=None, description="adapter, model or bundle"))
    params.append(ParameterSpec("rank_budget", Any, ParameterScope.SHARED, default=None,
                                description="adapter output: the parameters of this rank everywhere, spread by spectrum"))
    params.append(ParameterSpec("serve_for", Any, ParameterScope.SHARED, default=None,
                                description="adapter output: peft, vllm, sglang or llama.cpp (one rank, scale 1)"))
    spec = MergeMethodSpec(name=method.name, pretty_name=method.pretty_name, reference_url=method.reference_url,
                           parameters=tuple(params), contract=InputContract(base=BasePolicy.OPTIONAL, min_non_base=1))

    class FactorMergeMethod(GroupMergeMethod):
        def __init__(self):
            self.spec = spec

        def merge_group(self, group, /, *, weight, **params):
            """The method's dense form on this group's tensors (``dense.merge_dense``)."""
            from lowrank_methods.mergekit_plugin.dense import merge_dense

            entries = group.non_base
            return merge_dense(method, [e.tensor for e in entries], weight.values_for(entries), params,
                               base=group.base.tensor if group.base is not None else None, name=group.metadata.name)

    return FactorMergeMethod()


def register_methods() -> list[str]:
    """Register every method mergekit does not already have (idempotent); returns the names added."""
    from mergekit.merge_methods import register, registered_methods

    from lowrank_methods.core.method import list_methods

    have = {m.spec.name for m in registered_methods()}
    added = []
    for method in list_methods():
        if method.in_mergekit and method.name not in have:
            register(mergekit_method(method))
            added.append(method.name)
    if "lore" not in have:
        try:
            from lowrank_methods.mergekit_plugin.lore import mergekit_method as lore_method

            register(lore_method())
            added.append("lore")
        except Exception as e:  # LoRE must never take mergekit's own methods down with it
            warnings.warn(f"mergekit-lowrank: method 'lore' not registered: {e!r}", stacklevel=2)
    return added

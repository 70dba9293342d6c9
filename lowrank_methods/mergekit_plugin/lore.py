"""LoRE-Merging as a mergekit 0.1.5 method (the math is ``core/methods/lore.py``)."""

from __future__ import annotations

from typing import Literal

from lowrank_methods.core.methods.lore import DEFAULT_TAU, PAPER, lore_merge


def mergekit_method():
    """The mergekit 0.1.5 method object named "lore"; register it with ``mergekit.merge_methods.register``.

    Base policy OPTIONAL: LoRE estimates its own base, so a configured ``base_model`` (which mergekit adds to
    the inputs) is dropped from every tensor group; it still serves mergekit as the config/tokenizer donor.
    """
    from typing import Optional

    from mergekit.merge_methods import BasePolicy, GroupMergeMethod, InputContract, MergeMethodSpec, ParameterScope
    from mergekit.merge_methods.base import ParameterSpec
    from pydantic import Field
    from typing_extensions import Annotated

    spec = MergeMethodSpec(
        name="lore",
        pretty_name="LoRE-Merging",
        reference_url=PAPER.url,
        contract=InputContract(base=BasePolicy.OPTIONAL, min_non_base=1),
        parameters=(
            ParameterSpec("weight", Annotated[float, Field(ge=0)], ParameterScope.INPUT, default=1.0,
                          description="weight of this model in θ0 and in the δ merge"),
            ParameterSpec("tau", Optional[Annotated[float, Field(ge=0)]], ParameterScope.SHARED, default=None,
                          description=f"SVT threshold τ (absolute; default {DEFAULT_TAU} unless energy is given)"),
            ParameterSpec("energy", Optional[Annotated[float, Field(gt=0, le=1)]], ParameterScope.SHARED,
                          default=None, description="set τ per matrix so kept components carry this energy"),
            ParameterSpec("iterations", Annotated[int, Field(ge=0)], ParameterScope.SHARED, default=20),
            ParameterSpec("tol", Annotated[float, Field(ge=0)], ParameterScope.SHARED, default=1e-5),
            ParameterSpec("rule", Literal["average", "ties"], ParameterScope.SHARED, default="average"),
            ParameterSpec("density", Annotated[float, Field(gt=0, le=1)], ParameterScope.SHARED, default=1.0,
                          description="TIES: fraction of entries of each δ kept"),
            ParameterSpec("lambda", float, ParameterScope.SHARED, default=1.0),
        ),
    )

    class LoreMergeMethod(GroupMergeMethod):
        def __init__(self):
            self.spec = spec

        def merge_group(self, group, /, *, weight, tau, energy, iterations, tol, rule, density, **rest):
            entries = group.non_base if group.base is not None else group.entries
            return lore_merge([e.tensor for e in entries], weight.values_for(entries), tau=tau, energy=energy,
                              iterations=iterations, tol=tol, rule=rule, density=density, lambda_=rest["lambda"],
                              name=group.metadata.name)

    return LoreMergeMethod()

"""Parameter models every method builds on: strict, frozen, finite; λ only where a method scales its result."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt
from typing_extensions import Annotated

# Output rank: int = fixed rank; float in (0, 1] = smallest rank keeping that energy fraction, per module
# (written as rank_pattern); None = exact (every numerically nonzero component).
Rank = Annotated[StrictInt, Field(ge=1)] | Annotated[float, Field(gt=0, le=1)] | None


# The largest |weight| or |lambda| a recipe may use: beyond it float32 results overflow (and no merge needs it).
MAX_MAGNITUDE = 1e6


class MethodParams(BaseModel):
    """The parameters of a method: subclass it with the method's own fields (visible to recipes, nothing else)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False)


class ScaledParams(MethodParams):
    """Parameters of a method whose merged update is scaled by a global λ."""

    lambda_: float = Field(1.0, alias="lambda", ge=-MAX_MAGNITUDE, le=MAX_MAGNITUDE,
                           description="global scale applied to the merged update")

"""Base class of every steering spec model: strict (unknown fields and non-finite numbers are errors)."""
from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

"""The suite file's schema pieces every task shares: strict sections, the task header, synthetic data."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Training data uses small seeds (0, 1, ...); evaluation sets use this one, so no
# synthetic eval image can coincide with a training image of the default runs.
SYNTH_SEED = 10_000_019


class Spec(BaseModel):
    """Suite YAML sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SyntheticData(Spec):
    """Generate the benchmark from vlp.core.synth into the public format, cached by these parameters."""

    format: Literal["synthetic"]
    n: int = Field(gt=0, description="items (per class for zero-shot, per number for counting)")
    seed: int = SYNTH_SEED
    image_size: int = Field(64, ge=16, le=1024)


class TaskSpec(Spec):
    name: str = Field(
        pattern=r"^[A-Za-z0-9_.\-]+$", max_length=100,  # it names result files: within a file name's limit
        description="unique within the suite; names the report section"
    )
    type: str

__all__ = ["SYNTH_SEED", "Spec", "SyntheticData", "TaskSpec"]

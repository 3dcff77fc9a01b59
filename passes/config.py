"""Typed options shared by the CLI and the Python API."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from passes.errors import SmoothQuantError


class Unfoldable(enum.Enum):
    """What to do with a group whose 1/s no constant can absorb."""

    SKIP = "skip"  # leave the group unsmoothed (no extra node; best for runtime fusion)
    MUL = "mul"  # insert one explicit Mul(X, 1/s) before the group's linear ops


class Precision(enum.Enum):
    INT8 = "int8"  # symmetric, [-127, 127]
    FP8 = "fp8"  # E4M3FN, saturating, opset >= 19


@dataclass(frozen=True)
class SmoothingConfig:
    alpha: float = 0.5
    unfoldable: Unfoldable = Unfoldable.SKIP

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise SmoothQuantError(f"alpha must lie in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class CalibrationConfig:
    batch_size: int = 8
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1:
            raise SmoothQuantError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class QuantizationConfig:
    precision: Precision = Precision.INT8


@dataclass(frozen=True)
class SmoothQuantConfig:
    """Everything one run needs besides its files. ``quantization=None``: smooth only."""

    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantization: QuantizationConfig | None = field(default_factory=QuantizationConfig)

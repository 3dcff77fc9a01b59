"""Typed options shared by the CLI and the Python API."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from passes.errors import SmoothQuantError


class Unfoldable(enum.Enum):
    """What to do with a group whose 1/s no constant can absorb, or only by breaking a runtime's
    fusion (GELU's scalar 0.5 under ``Target.ONNXRUNTIME``)."""

    AUTO = "auto"  # SPLIT for per-tensor Target.ONNXRUNTIME; else MUL where a fusion forbids folding, SKIP elsewhere
    SKIP = "skip"  # leave the group unsmoothed (no extra node)
    MUL = "mul"  # insert one explicit Mul(X, 1/s) before the group's linear ops
    SPLIT = "split"  # unsmoothed, its few outlier channels computed in FP beside the quantized GEMM (passes.split)


class Precision(enum.Enum):
    INT8 = "int8"  # symmetric, [-127, 127]
    FP8 = "fp8"  # E4M3FN, saturating, opset >= 19


class Target(enum.Enum):
    """The runtime whose kernels the Q/DQ placement is shaped for."""

    TENSORRT = "tensorrt"  # symmetric INT8/FP8, zero points 0 (TensorRT's explicit-quantization rules)
    ONNXRUNTIME = "onnxruntime"  # asymmetric uint8 activations, int8 weights: ORT CPU fuses every MatMul


class Granularity(enum.Enum):
    """Activation scales: one per tensor, calibrated (static, "O3"), or one per token at run time ("O1")."""

    PER_TENSOR = "per-tensor"
    PER_TOKEN = "per-token"


class WeightRounding(enum.Enum):
    """How weights are rounded onto their per-channel grid."""

    NEAREST = "nearest"  # each weight to its nearest grid point
    GPTQ = "gptq"  # error-compensating (passes.gptq): one more pass over the calibration data


class WeightStorage(enum.Enum):
    QUANTIZED = "quantized"  # int8/float8 initializer + DequantizeLinear (file ~4x smaller than fp32)
    FLOAT = "float"  # FP initializer + QuantizeLinear -> DequantizeLinear (weights stay editable)


@dataclass(frozen=True)
class SmoothingConfig:
    """``alpha``: one migration strength for every group. ``alpha_grid``: if given, each group
    gets the candidate (or no smoothing) whose quantized error on the calibration data is
    lowest (one pass over the data per candidate). ``enabled=False``: quantize unsmoothed, with
    no outlier splits either (the plain baseline).
    ``split_ratio``: with ``Unfoldable.SPLIT``, a channel is an outlier if its calibrated
    ``max|X_j|`` exceeds this many times the 99th percentile over channels.
    ``attention_values``: also smooth attention output projections, folding their 1/s into the
    value projection through P @ V (:mod:`passes.value_fold`; exact, off by default: on SmolLM2
    it helps a fixed α and hurts the α search, see the README)."""

    alpha: float = 0.5
    unfoldable: Unfoldable = Unfoldable.AUTO
    alpha_grid: tuple[float, ...] = ()
    enabled: bool = True
    split_ratio: float = 2.0
    attention_values: bool = False

    def __post_init__(self):
        for a in (self.alpha, *self.alpha_grid):
            if not 0.0 <= a <= 1.0:
                raise SmoothQuantError(f"alpha must lie in [0, 1], got {a}")
        if not self.split_ratio >= 1.0:
            raise SmoothQuantError(f"the split ratio must be >= 1, got {self.split_ratio}")


@dataclass(frozen=True)
class CalibrationConfig:
    batch_size: int = 8
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1:
            raise SmoothQuantError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class QuantizationConfig:
    """``exclude``: regular expressions searched in node names; matching linear ops stay FP.
    ``max_fp_layers``: keep up to this many linear ops in FP whose quantized output error on
    the calibration data is far above the rest (costs one more pass over the data).
    ``check``: run the TensorRT rule checker on the output (``Target.TENSORRT``) and fail on
    a violation. ``clip_grid``: search per group the ratio of the calibrated range whose
    quantized output error on the calibration data is lowest (one pass per ratio).
    ``weight_rounding``: ``GPTQ`` rounds each weight so the op's output error on the calibration
    data is small, not the weight's own. ``quantize_tied``: also smooth and quantize MatMuls
    reading ``Transpose`` of a constant (a tied LM head reading the embedding), on their own
    transposed copy (:mod:`passes.untie`)."""

    precision: Precision = Precision.INT8
    target: Target = Target.TENSORRT
    weights: WeightStorage = WeightStorage.QUANTIZED
    exclude: tuple[str, ...] = ()
    max_fp_layers: int = 0
    check: bool = True
    clip_grid: tuple[float, ...] = ()  # ratios of the calibrated range to try per group; () = max calibration
    granularity: Granularity = Granularity.PER_TENSOR
    weight_rounding: WeightRounding = WeightRounding.NEAREST
    quantize_tied: bool = False

    def __post_init__(self):
        if any(not 0.0 < r <= 1.0 for r in self.clip_grid):
            raise SmoothQuantError(f"clipping ratios must lie in (0, 1], got {self.clip_grid}")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise SmoothQuantError(f"--exclude {pattern!r} is not a regular expression: {e}") from None
        if self.max_fp_layers < 0:
            raise SmoothQuantError(f"max FP layers must be >= 0, got {self.max_fp_layers}")
        per_token = self.granularity is Granularity.PER_TOKEN
        if self.target is Target.ONNXRUNTIME and self.precision is Precision.FP8 and not per_token:
            raise SmoothQuantError("ONNX Runtime has no FP8 GEMM kernels on CPU: use --target tensorrt for fp8 "
                                   "(or --granularity per-token, lowered to float ops)")
        if per_token and (self.max_fp_layers or self.clip_grid):
            raise SmoothQuantError("--max-fp-layers and --clip search measure static per-tensor ranges: they do not "
                                   "apply to --granularity per-token")
        if self.weight_rounding is WeightRounding.GPTQ and self.weights is WeightStorage.FLOAT:
            raise SmoothQuantError("--weight-rounding gptq stores the rounded weights: it needs --weights quantized")
        if per_token and self.weights is WeightStorage.FLOAT:
            raise SmoothQuantError("--weights float applies to Q/DQ (per-tensor) placement only")

    def excluded(self, node_name: str) -> str | None:
        """The first pattern that matches ``node_name``, if any."""
        return next((p for p in self.exclude if re.search(p, node_name)), None)


@dataclass(frozen=True)
class SmoothQuantConfig:
    """Everything one run needs besides its files. ``quantization=None``: smooth only."""

    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantization: QuantizationConfig | None = field(default_factory=QuantizationConfig)

    def __post_init__(self):
        if self.smoothing.unfoldable is Unfoldable.SPLIT:
            if self.quantization is None:
                raise SmoothQuantError("--unfoldable split computes outlier channels beside a quantized GEMM: it "
                                       "needs quantization (drop --smooth-only, or pick skip or mul)")
            if self.quantization.granularity is Granularity.PER_TOKEN:
                raise SmoothQuantError("--unfoldable split needs per-tensor activation scales: a per-token scale is "
                                       "set at run time by the very outlier channels the split leaves out")

    @property
    def unfoldable(self) -> Unfoldable:
        """``smoothing.unfoldable`` with AUTO resolved: SPLIT for per-tensor ``Target.ONNXRUNTIME``
        (ONNX Runtime's CPU kernels cannot fuse a smoothing Mul), else AUTO (MUL where folding would
        break a runtime fusion, SKIP where no constant can absorb 1/s)."""
        q = self.quantization
        if self.smoothing.unfoldable is Unfoldable.AUTO and q is not None and q.target is Target.ONNXRUNTIME \
                and q.granularity is Granularity.PER_TENSOR:
            return Unfoldable.SPLIT
        return self.smoothing.unfoldable

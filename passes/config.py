"""Typed options shared by the CLI and the Python API."""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from dataclasses import dataclass, field, replace

from passes.ir.errors import SmoothQuantError


class Unfoldable(enum.Enum):
    """What to do with a group whose 1/s no constant can absorb, or only by breaking a runtime's
    fusion (GELU's scalar 0.5 under ``Target.ONNXRUNTIME``)."""

    AUTO = "auto"  # SPLIT with the α search (measured per group) or for ONNX Runtime: see SmoothQuantConfig.unfoldable
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

    AUTO = "auto"  # GPTQ where the calibration data can be read again (a list, an .npz, a folder), else nearest
    NEAREST = "nearest"  # each weight to its nearest grid point
    GPTQ = "gptq"  # error-compensating (passes.gptq): one more pass over the calibration data


class WeightStorage(enum.Enum):
    QUANTIZED = "quantized"  # int8/float8 initializer + DequantizeLinear (file ~4x smaller than fp32)
    FLOAT = "float"  # FP initializer + QuantizeLinear -> DequantizeLinear (weights stay editable)


DEFAULT_ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FAST_ALPHA = 0.8  # the one-pass path's α (--fast, or when the data cannot be read twice)


def _coerce_enums(config) -> None:
    """Enum fields given as strings (the CLI's spellings, ``"fp8"``, or member names) become members;
    anything else is refused naming the field and the choices."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        kind, value = hints.get(f.name), getattr(config, f.name)
        if not (isinstance(kind, type) and issubclass(kind, enum.Enum)) or isinstance(value, kind):
            continue
        by_text = {m.value: m for m in kind} | {m.name.lower(): m for m in kind}
        member = by_text.get(value.lower().replace("_", "-")) or by_text.get(value.lower()) \
            if isinstance(value, str) else None
        if member is None:
            raise SmoothQuantError(f"{type(config).__name__}.{f.name}: {value!r} is not one of "
                                   f"{[m.value for m in kind]} (or {kind.__name__}.<NAME>)")
        object.__setattr__(config, f.name, member)


@dataclass(frozen=True)
class SmoothingConfig:
    """``alpha``: one migration strength for every group (the one-pass path). None (the
    default): each group gets the candidate whose quantized error on the calibration data is
    lowest (:mod:`passes.search.alpha`): an α of ``alpha_grid``, no smoothing, or the outlier
    split, all measured in one more pass. ``enabled=False``: quantize unsmoothed, with no
    outlier splits either (the plain baseline).
    ``split_ratio``: a channel is an outlier if its calibrated ``max|X_j|`` exceeds this many
    times the 99th percentile over channels (the split's candidates).
    ``attention_values``: also smooth attention output projections, folding their 1/s into the
    value projection through P @ V (:mod:`passes.value_fold`; exact, off by default: on SmolLM2
    it helps a fixed α and hurts the α search, see the README)."""

    alpha: float | None = None
    unfoldable: Unfoldable = Unfoldable.AUTO
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    enabled: bool = True
    split_ratio: float = 2.0
    attention_values: bool = False

    def __post_init__(self):
        _coerce_enums(self)
        for a in ((self.alpha,) if self.alpha is not None else ()) + tuple(self.alpha_grid):
            if not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
                raise SmoothQuantError(f"alpha must be a number in [0, 1], got {a!r}")
        if self.alpha is None and not self.alpha_grid:
            raise SmoothQuantError("the α search needs candidates: give alpha_grid, or a fixed alpha")
        if not self.split_ratio >= 1.0:
            raise SmoothQuantError(f"the split ratio must be >= 1, got {self.split_ratio}")

    @property
    def searched(self) -> bool:
        """α is chosen per group by measurement (not one fixed value)."""
        return self.enabled and self.alpha is None


@dataclass(frozen=True)
class CalibrationConfig:
    """``search_tokens``: the searches (α, clipping, the FP fallback) measure candidates on the
    first this-many tokens of the calibration data (None: all of it); ranges and GPTQ use all."""

    batch_size: int = 8
    progress: bool = True
    search_tokens: int | None = 4096

    def __post_init__(self):
        if self.batch_size < 1:
            raise SmoothQuantError(f"batch size must be at least 1, got {self.batch_size}")
        if self.search_tokens is not None and self.search_tokens < 1:
            raise SmoothQuantError(f"search tokens must be at least 1 (or None: all), got {self.search_tokens}")


LINEAR_OP_TYPES = ("MatMul", "Gemm", "Conv")  # what passes.linear finds


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
    transposed copy (:mod:`passes.untie`). ``activation_shift``: for TensorRT (zero points 0) and
    INT8 (a uniform grid), quantize a one-sided activation range (post-GELU, say) as ``X - c``, ``c``
    its middle (the short side kept with slack unless it is a floor), and add ``c Σ_k W_dq[k, :]``
    after the GEMM (exact in FP), where that makes the step at least 1.25x finer
    (:meth:`passes.qdq.ActivationRange.shift`)."""

    precision: Precision = Precision.INT8
    target: Target = Target.TENSORRT
    weights: WeightStorage = WeightStorage.QUANTIZED
    exclude: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()  # of LINEAR_OP_TYPES: those ops stay FP (ModelOpt's op_types_to_exclude)
    max_fp_layers: int = 0
    check: bool = True
    clip_grid: tuple[float, ...] = ()  # ratios of the calibrated range to try per group; () = max calibration
    granularity: Granularity = Granularity.PER_TENSOR
    weight_rounding: WeightRounding = WeightRounding.AUTO
    quantize_tied: bool = False
    activation_shift: bool = True

    def __post_init__(self):
        _coerce_enums(self)
        for name in ("exclude", "exclude_op_types"):  # one string is one pattern / a comma-separated list
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,) if name == "exclude" else
                                   tuple(t.strip() for t in value.split(",") if t.strip()))
        if any(not 0.0 < r <= 1.0 for r in self.clip_grid):
            raise SmoothQuantError(f"clipping ratios must lie in (0, 1], got {self.clip_grid}")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise SmoothQuantError(f"--exclude {pattern!r} is not a regular expression: {e}") from None
        unknown = [t for t in self.exclude_op_types if t not in LINEAR_OP_TYPES]
        if unknown:
            raise SmoothQuantError(f"--exclude-op-types {','.join(unknown)}: this tool quantizes "
                                   f"{', '.join(LINEAR_OP_TYPES)} (op types are case-sensitive)")
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

    def why_kept_fp(self, node_name: str, op_type: str) -> str | None:
        """Why the user keeps this op in FP (``--exclude-op-types``, ``--exclude``), or None."""
        if op_type in self.exclude_op_types:
            return f"excluded by --exclude-op-types {op_type}"
        pattern = self.excluded(node_name)
        return None if pattern is None else f"excluded by --exclude {pattern!r}"


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
        """``smoothing.unfoldable`` with AUTO resolved:

        - per-tensor activations with the α search: SPLIT, for both targets. The search measures
          no smoothing and the split for a group no constant can absorb, and keeps the better.
          An explicit Mul (MUL) was measured worse end to end, though its own layer's error was
          lower: SmolLM2 FP8 +2.29% vs +1.17%, INT8 +2.06% vs +1.64% perplexity; MiniLM no
          different (cos 0.99832 vs 0.99831). ONNX Runtime's CPU kernels also run it as a
          separate pass over the tensor.
        - per-tensor ``Target.ONNXRUNTIME`` with one α: SPLIT;
        - otherwise AUTO: MUL where folding would break a runtime fusion, SKIP where no constant
          can absorb 1/s."""
        q = self.quantization
        if self.smoothing.unfoldable is not Unfoldable.AUTO or q is None or q.granularity is not Granularity.PER_TENSOR:
            return self.smoothing.unfoldable
        if q.target is Target.ONNXRUNTIME or self.smoothing.searched:
            return Unfoldable.SPLIT
        return Unfoldable.AUTO

    @property
    def split_ratio(self) -> float | None:
        """The outlier ratio when the α search may offer the split (per-tensor activations, and
        neither SKIP nor MUL asked for explicitly); None: no split candidate."""
        q = self.quantization
        if q is None or q.granularity is not Granularity.PER_TENSOR or self.smoothing.unfoldable in (
                Unfoldable.SKIP, Unfoldable.MUL):
            return None
        return self.smoothing.split_ratio

    def resolved(self, rereadable: bool) -> tuple[SmoothQuantConfig, list[str]]:
        """This config with its automatic choices made, and a note for each one that falls back.

        ``rereadable``: calibration data that can be read more than once is at hand (a list of
        feeds, an .npz, a folder). Without it the α search falls back to α=:data:`FAST_ALPHA`
        and GPTQ-where-possible to nearest rounding. A smooth-only run (nothing to measure the
        search against) uses α=:data:`FAST_ALPHA`; GPTQ needs weights stored quantized."""
        notes, smoothing, q = [], self.smoothing, self.quantization
        if smoothing.searched and (q is None or not rereadable):
            if q is not None:
                notes.append(f"the per-group α search reads the calibration data again, which is not at hand "
                             f"(statistics only, or a one-pass iterator): every group gets α={FAST_ALPHA:g}")
            smoothing = replace(smoothing, alpha=FAST_ALPHA)
        if q is not None and q.weight_rounding is WeightRounding.AUTO:
            gptq = rereadable and q.weights is WeightStorage.QUANTIZED
            if not gptq and q.weights is WeightStorage.QUANTIZED:
                notes.append("GPTQ weight rounding reads the calibration data again, which is not at hand: weights "
                             "are rounded to nearest")
            q = replace(q, weight_rounding=WeightRounding.GPTQ if gptq else WeightRounding.NEAREST)
        return replace(self, smoothing=smoothing, quantization=q), notes

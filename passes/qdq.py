"""Q/DQ placement pass: W8A8 (INT8 or FP8 E4M3FN) with every scale on an outer GEMM dimension.

For each linear op ``Y = X W`` (MatMul/Gemm/Conv with a constant weight)::

    X~ = DQ(Q(X, a, z), a, z)                one scale per tensor (static), from the calibrated range
    W~ = DQ(W_q, w, 0, axis=out)             w_n = max_k |W'[k, n]| / 127, per output channel
                                             W_q = clip(round(W' / w), -127, 127) as int8

so ``X~ W~ = a * w_n * ((X_q - z) W_q)``: the int32 accumulator is rescaled by a row scale
(tokens) and a column scale (output channels) only, which GEMM epilogues support.

Activations, by :class:`Target`:

- ``tensorrt``: symmetric, ``a = max|X'| / 127``, ``z = 0`` as int8 (FP8: 448, E4M3FN zero
  points, opset >= 19). After smoothing ``max|X'| = max_j(max|X_j| / s_j)``, read off the
  calibrated per-channel statistics with no second calibration pass.
- ``onnxruntime``: asymmetric uint8 over ``[lo, hi]`` (widened to hold 0):
  ``a = (hi - lo) / 255``, ``z = round(-lo / a)``; with ``lo = min_j(min_j / s_j)`` and
  ``hi = max_j(max_j / s_j)``. ORT's CPU kernels fuse u8 x s8 QDQ MatMuls into integer GEMMs.

Weights are stored quantized (int8/float8 + DQ) or, with ``WeightStorage.FLOAT``, as the FP
weight followed by Q -> DQ. Only GEMM inputs are quantized: never graph outputs, biases,
Softmax or norm inputs. Activations with zero or non-finite range stay FP and are reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from passes.config import Precision, QuantizationConfig, Target, WeightStorage
from passes.ir.errors import SmoothQuantError
from passes.gptq import gptq_round
from passes.ir.graph import GraphView, attribute
from passes.linear import LinearKind, LinearOp
from passes.ir.naming import NameFactory

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
UINT8_LEVELS = 255.0


SHIFT_GAIN = 1.25  # shift an activation when its step gets at least this much finer
SHIFT_SLACK = 2.0  # ... its short side reaching twice its calibrated extreme (unless a floor)


@dataclass(frozen=True)
class ActivationRange:
    """Calibrated range of one (smoothed) activation tensor. ``floored``: its short side is a bound
    every channel meets (after GELU, SiLU or ReLU: :func:`passes.smooth.smoothed_range`), not a
    rare extreme that held-out data may outrun."""

    lo: float
    hi: float
    floored: bool = False

    @property
    def amax(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    def scaled(self, ratio: float) -> ActivationRange:
        """The range clipped (ratio < 1) to ``[ratio lo, ratio hi]``."""
        return ActivationRange(self.lo * ratio, self.hi * ratio, self.floored)

    def valid(self) -> bool:
        return bool(np.isfinite(self.lo) and np.isfinite(self.hi) and self.amax > 0)

    def shift(self, min_gain: float = SHIFT_GAIN, slack: float | None = None) -> float:
        """The centre ``c`` of the grid for ``X - c``, quantized symmetrically with the half-width
        ``amax - |c|``: the long side of ``[lo, hi]`` as it is, the short side moved outwards by
        ``slack - 1`` times its calibrated extreme's magnitude, where that takes a step at least
        ``min_gain`` times finer than quantizing ``X`` (one-sided ranges: up to 2x); else 0.

        The slack: a symmetric grid reaches ``amax`` on both sides, and the shifted one gives that
        margin up on the short side, whose calibrated extreme rests on few values. Where the short
        side is not bounded by the function (SmolLM2's norm outputs and SiLU·up products: held-out
        text reached 1.5-1.9x the calibrated extreme, and clipping those few values cost +2%
        perplexity), doubling it leaves too little gain and the input stays unshifted; where it is
        (after GELU or ReLU: ``[-0.17, hi]``) it is not needed: ``slack`` defaults to 1 for a
        ``floored`` range (MPNet: 7 inputs shifted, cos 0.99794, against 3 and 0.99780 with the slack)
        and to :data:`SHIFT_SLACK` for the others."""
        slack = (1.0 if self.floored else SHIFT_SLACK) if slack is None else slack
        reach = (slack - 1) * min(abs(self.lo), abs(self.hi))  # outwards, whatever the sign
        lo, hi = (self.lo - reach, self.hi) if abs(self.lo) <= abs(self.hi) else (self.lo, self.hi + reach)
        half = (hi - lo) / 2
        return (hi + lo) / 2 if half > 0 and self.amax >= min_gain * half else 0.0

    def uint8_params(self) -> tuple[float, int]:
        """Asymmetric uint8 scale and zero point for ``[min(lo, 0), max(hi, 0)]``."""
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        scale = (hi - lo) / UINT8_LEVELS
        return scale, int(np.clip(np.round(-lo / scale), 0, 255))


@dataclass(frozen=True)
class QuantFormat:
    """How values of one precision are stored: the largest magnitude and the cast."""

    precision: Precision
    qmax: float
    min_opset: int

    def dtype(self) -> np.dtype:
        if self.precision is Precision.FP8:
            import ml_dtypes  # noqa: PLC0415 - ships with onnx

            return np.dtype(ml_dtypes.float8_e4m3fn)
        return np.dtype(np.int8)

    def cast(self, scaled: np.ndarray) -> np.ndarray:
        """Values already divided by their scale -> stored type (INT8: round half to even, clip)."""
        clipped = np.clip(scaled, -self.qmax, self.qmax)
        if self.precision is Precision.INT8:
            clipped = np.round(clipped)
        return clipped.astype(self.dtype())


FORMATS = {Precision.INT8: QuantFormat(Precision.INT8, INT8_MAX, 13),
           Precision.FP8: QuantFormat(Precision.FP8, FP8_E4M3_MAX, 19)}


@dataclass
class QuantReport:
    precision: Precision = Precision.INT8
    quantized: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    gptq: bool = False  # weights rounded by GPTQ (else to nearest)

    def summary(self) -> str:
        rounding = "GPTQ" if self.gptq else "nearest"
        lines = [f"quantization: {len(self.quantized)} linear ops quantized ({self.precision.name} W8A8, weights "
                 f"rounded {'by' if self.gptq else 'to'} {rounding}), {len(self.skipped)} kept in FP"]
        lines.extend(f"  kept FP  {name}: {reason}" for name, reason in self.skipped)
        return "\n".join(lines)


def per_channel_weight_scale(weight: np.ndarray, out_axis: int, qmax: float = INT8_MAX,
                             dtype: np.dtype | None = None) -> np.ndarray:
    """Symmetric scale per output channel (shape ``[N]``); all-zero channels get 1.

    Returned in ``dtype`` (default: the weight's), the type it is stored in, so that
    :func:`quantize_weight` divides by exactly the value DequantizeLinear multiplies by."""
    axes = tuple(a for a in range(weight.ndim) if a != out_axis)
    amax = np.abs(weight.astype(np.float64)).max(axis=axes)
    return np.where(amax > 0, amax / qmax, 1.0).astype(dtype or weight.dtype)


def quantize_weight(weight: np.ndarray, scale: np.ndarray, out_axis: int,
                    fmt: QuantFormat = FORMATS[Precision.INT8], hessian: np.ndarray | None = None) -> np.ndarray:
    """``weight / scale`` on ``fmt``'s grid: nearest, or (2-D weights, ``hessian`` = ``Σ xᵀx`` of
    the op's input) rounded by :func:`passes.gptq.gptq_round`."""
    if hessian is None:
        shape = [1] * weight.ndim
        shape[out_axis] = scale.size
        return fmt.cast(weight.astype(np.float64) / scale.reshape(shape))
    if weight.ndim != 2:
        raise ValueError(f"GPTQ rounding takes 2-D weights, got shape {weight.shape}")
    w_kn = weight if out_axis == 1 else weight.T
    q = gptq_round(w_kn, hessian, scale, lambda v: fmt.cast(v).astype(np.float64))
    return fmt.cast(q if out_axis == 1 else q.T)


def quantize_linear_ops(view: GraphView, linear_ops: list[LinearOp], ranges: dict[str, ActivationRange],
                        opset: int, config: QuantizationConfig = QuantizationConfig(),
                        hessians: Mapping[str, np.ndarray | None] | None = None, *,
                        progress: bool = False) -> QuantReport:
    """Insert Q/DQ for every op in ``linear_ops``; ``ranges`` is keyed by each op's current input.
    ``hessians``: per weight initializer, ``Σ xᵀx`` of its ops' inputs, for GPTQ rounding."""
    fmt = FORMATS[config.precision]
    if opset < fmt.min_opset:
        raise SmoothQuantError(f"{config.precision.name} QuantizeLinear/DequantizeLinear need opset >= "
                               f"{fmt.min_opset}, the model has {opset}")
    names = NameFactory(view.all_names())
    report = QuantReport(config.precision, gptq=hessians is not None)
    act_dq: dict[str, str] = {}
    weight_dq: dict[tuple[str, int], tuple[str, np.ndarray]] = {}
    new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (node to insert, insert before)
    after: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (node to insert, insert after)
    for op in tqdm(linear_ops, desc="rounding weights (GPTQ)", unit="op", leave=False,
                   disable=not (progress and hessians)):
        node, x = op.node, op.node.input[0]
        rng = ranges.get(x)
        if rng is None or not rng.valid():
            shown = "uncalibrated" if rng is None else f"[{rng.lo:.3g}, {rng.hi:.3g}]"
            report.skipped.append((op.name, f"activation {x!r} has range {shown} (zero, non-finite or uncalibrated)"))
            continue
        # MatMul/Gemm/Conv take one float type for X and W: the weight tells X's type.
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(view.store.proto(view.constant_source(node.input[1])).data_type))
        if dtype != np.float32 and opset < 19:
            raise SmoothQuantError(f"activation {x!r} (read by {op.name!r}) is {dtype}: QuantizeLinear takes it only "
                                   f"from opset 19, the model has {opset} (use --precision fp8, or convert the model)")
        if x not in act_dq:
            shift = 0.0
            if config.target is Target.ONNXRUNTIME:
                a, z = rng.uint8_params()
                zero_value = np.array(z, dtype=np.uint8)
            else:
                # INT8's grid is uniform: centring a one-sided range halves its step. FP8's is not:
                # it would move the values crowded near 0 to where its steps are coarse.
                if config.activation_shift and config.precision is Precision.INT8 and op.kind is not LinearKind.CONV:
                    shift = float(np.array(rng.shift(), dtype=dtype))
                a = (rng.amax - abs(shift)) / fmt.qmax  # shifted: the long side as it is
                zero_value = np.zeros((), dtype=fmt.dtype())
            scale, zero = names.scale(x), names.zero_point(x)
            if not (np.isfinite(a) and a > 0 and np.isfinite(np.array(a, dtype=dtype))):
                raise SmoothQuantError(f"activation {x!r}: scale {a!r} is not finite and positive in {dtype}")
            view.set_initializer(scale, np.array(a, dtype=dtype))
            view.set_initializer(zero, zero_value)
            q_in = x
            if shift:  # X - c, symmetric: the GEMM's output gets c Σ_k W back below
                q_in, c_name = names.shifted(x), names.shift(x)
                view.set_initializer(c_name, np.array(shift, dtype=dtype))
                new_nodes.append((helper.make_node("Sub", [x, c_name], [q_in], name=names.shift_node(x)), node))
            q_out, dq_out = names.quantized(x), names.dequantized(x)
            new_nodes.append((helper.make_node("QuantizeLinear", [q_in, scale, zero], [q_out], name=names.q_node(x)),
                              node))
            new_nodes.append((helper.make_node("DequantizeLinear", [q_out, scale, zero], [dq_out],
                                               name=names.dq_node(x)), node))
            act_dq[x] = (dq_out, shift)
        source = view.constant_source(node.input[1])
        key = (source, op.weight_out_axis)
        if key not in weight_dq:
            weight_dq[key] = _quantize_weight_input(view, names, source, op.weight_out_axis, fmt, config.weights,
                                                    new_nodes, node, (hessians or {}).get(source))
        (dq_x, shift), (dq_w, sums) = act_dq[x], weight_dq[key]
        node.input[0], node.input[1] = dq_x, dq_w
        if shift:
            after.append((_shift_correction(view, names, node, shift, sums, dtype), node))
        report.quantized.append(op.name)
    view.insert(new_nodes)
    view.insert(after, after=True)
    view.rebuild()
    view.drop_unused_initializers()
    return report


def _shift_correction(view: GraphView, names: NameFactory, node: onnx.NodeProto, shift: float, sums: np.ndarray,
                      dtype: np.dtype) -> onnx.NodeProto:
    """``node`` reads DQ(Q(X - c)): its output gets ``c Σ_k W_dq[k, :]`` (``sums``; times Gemm's alpha)
    added back, so the result is X W_dq as without the shift. Returns the Add, to go right after ``node``."""
    correction = shift * sums * attribute(node, "alpha", 1.0)
    y = node.output[0]
    raw, c_name = names.unshifted(y), names.shift_correction(y)
    view.set_initializer(c_name, correction.astype(dtype))
    node.output[0] = raw
    return helper.make_node("Add", [raw, c_name], [y], name=names.shift_correction_node(y))


def _quantize_weight_input(view: GraphView, names: NameFactory, source: str, axis: int, fmt: QuantFormat,
                           storage: WeightStorage, new_nodes: list, before: onnx.NodeProto,
                           hessian: np.ndarray | None = None) -> tuple[str, np.ndarray]:
    """Per-output-channel weight Q/DQ; returns the dequantized tensor the linear op reads, and that
    tensor's sums over its input axes (one per output channel)."""
    w = view.store.array(source)
    w_scale = per_channel_weight_scale(w, axis, fmt.qmax)
    if not (np.isfinite(w_scale).all() and (w_scale > 0).all()):
        raise SmoothQuantError(f"weight {source!r}: its per-channel scales are not all finite and positive "
                               f"(min {np.min(w_scale):.3g}, max {np.max(w_scale):.3g}); nothing was written")
    s_name, z_name = names.scale(source), names.zero_point(source)
    view.set_initializer(s_name, w_scale)
    view.set_initializer(z_name, np.zeros(w_scale.size, dtype=fmt.dtype()))
    dq_out, q_name = names.dequantized(source), names.quantized(source)
    q = quantize_weight(w, w_scale, axis, fmt, hessian if storage is WeightStorage.QUANTIZED else None)
    # Σ over the input axes of the dequantized weight, per output channel (for a shifted activation)
    sums = q.astype(np.float64).sum(axis=tuple(a for a in range(w.ndim) if a != axis)) * w_scale.astype(np.float64)
    if storage is WeightStorage.QUANTIZED:
        view.set_initializer(q_name, q)
    else:
        new_nodes.append((helper.make_node("QuantizeLinear", [source, s_name, z_name], [q_name],
                                           name=names.q_node(source), axis=axis), before))
    new_nodes.append((helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_out],
                                       name=names.dq_node(source), axis=axis), before))
    return dq_out, sums

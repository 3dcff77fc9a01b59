"""NumPy references for the runtime kernels: what every GPU kernel (and CPU test) is checked against.

Semantics (shared with the ``com.smoothquant`` custom ops, see :mod:`plugins.schema`)::

    per-token quantize     a_m = max_k |x[m, k] * v[k]| / qmax   (v: optional unfolded smoothing vector,
                                                                  a_m = 1 where the row is all zero)
                           q[m, k] = sat(x[m, k] * v[k] / a_m)   INT8: round half to even, clip [-127, 127]
                                                                  FP8: E4M3FN, clip [-448, 448], round to nearest
    W8A8 GEMM              y[m, n] = (Σ_k q[m, k] w[n, k]) * a_m * b_n (+ bias[n])
                                                                  (int32 accumulation for INT8, fp32 for FP8;
                                                                  w is stored [N, K], b per output channel)
    norm + quantize        h = RMSNorm(x) * γ  or  LayerNorm(x) * γ + β, then per-token quantize of h
"""

from __future__ import annotations

import enum

import numpy as np

INT8_MAX = 127.0
FP8_MAX = 448.0


class QType(enum.Enum):
    INT8 = "int8"
    FP8 = "fp8"  # E4M3FN

    @property
    def qmax(self) -> float:
        return INT8_MAX if self is QType.INT8 else FP8_MAX


def _fp8_dtype():
    import ml_dtypes  # noqa: PLC0415 - ships with onnx

    return ml_dtypes.float8_e4m3fn


def cast(values: np.ndarray, qtype: QType) -> np.ndarray:
    """Already-scaled values to the stored type (saturating)."""
    clipped = np.clip(values, -qtype.qmax, qtype.qmax)
    if qtype is QType.INT8:
        return np.rint(clipped).astype(np.int8)
    return clipped.astype(np.float32).astype(_fp8_dtype())


def quantize_per_token(x: np.ndarray, qtype: QType, smooth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``x`` [M, K] -> (q [M, K], scale [M] float32)."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {x.shape}")
    v = x.astype(np.float32)
    if smooth is not None:
        if smooth.shape != (x.shape[1],):
            raise ValueError(f"smoothing vector has shape {smooth.shape}, expected ({x.shape[1]},)")
        v = v * smooth.astype(np.float32)
    amax = np.abs(v).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(qtype.qmax), 1.0).astype(np.float32)
    return cast(v / scale[:, None], qtype), scale


def quantize_per_channel(w: np.ndarray, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``w`` [N, K] -> (q [N, K], scale [N]): symmetric per output channel."""
    return quantize_per_token(w, qtype)


def w8a8_gemm(q: np.ndarray, x_scale: np.ndarray, wq: np.ndarray, w_scale: np.ndarray,
              bias: np.ndarray | None = None) -> np.ndarray:
    """``q`` [M, K], ``wq`` [N, K] (int8 or float8) -> y [M, N] float64 (exact accumulation)."""
    if q.shape[1] != wq.shape[1]:
        raise ValueError(f"K mismatch: activations {q.shape}, weights {wq.shape}")
    acc = q.astype(np.float64) @ wq.astype(np.float64).T
    y = acc * x_scale.astype(np.float64)[:, None] * w_scale.astype(np.float64)[None, :]
    return y if bias is None else y + bias.astype(np.float64)[None, :]


def rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * gamma


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x = x.astype(np.float64)
    mu = x.mean(axis=1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def norm_quantize(x: np.ndarray, gamma: np.ndarray, qtype: QType, beta: np.ndarray | None = None,
                  eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """RMSNorm (``beta`` None) or LayerNorm, then per-token quantize."""
    h = rms_norm(x, gamma, eps) if beta is None else layer_norm(x, gamma, beta, eps)
    return quantize_per_token(h.astype(np.float32), qtype)


def silu_mul_quantize(gate_up: np.ndarray, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """SwiGLU ``silu(g) * u`` of ``[g | u]`` (``gate_up`` [M, 2I]), then per-token quantize."""
    g, u = np.split(gate_up.astype(np.float64), 2, axis=1)
    return quantize_per_token((g / (1 + np.exp(-g)) * u).astype(np.float32), qtype)

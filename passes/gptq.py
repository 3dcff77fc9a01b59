"""Error-compensating weight rounding (GPTQ, Frantar et al. 2022) on a fixed per-channel grid.

Rounding each weight to its nearest grid point minimises ``|W~ - W|`` but not the output
error the model sees. For a linear op ``Y = X W`` (``W``: ``[K, N]``) and calibration rows
``x`` of X, the output error is::

    E = Σ_x |x (W~ - W)|²  =  Σ_n (W~_n - W_n)ᵀ H (W~_n - W_n),      H = Σ_x xᵀ x   ([K, K])

(one quadratic form per output column n, all sharing H). GPTQ rounds the input rows of W one
at a time and, after rounding row i with error ``δ = W_i - W~_i``, moves the rows not yet
rounded by the least-squares correction ``W_j -= δ (H⁻¹)_ij / (H⁻¹)_ii``, so the later
rows absorb what row i lost. With ``U`` the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``)
the correction for every later row at once is ``W_{i+1:} -= U_{i,i+1:}ᵀ δ / U_ii``.

Details:

- the grid is fixed before rounding: ``W~_kn = scale_n * q_kn`` with the op's per-output-channel
  ``scale`` (the outer GEMM dimension), so the result is an ordinary W8 weight;
- rows are rounded in order of decreasing ``H_ii`` ("act order"; free here, as the scales
  do not depend on the order);
- ``H += damp * mean(diag H) * I`` keeps H invertible (retried with 10x, 100x, 1000x the
  damping if rounding left it indefinite); rows whose input is always zero
  (``H_ii = 0``) are rounded to nearest and move nothing;
- rows are processed in blocks: inside a block corrections go row by row, the rows after the
  block get the block's corrections as one matrix product.

Exact FP inputs are used for H (the standard choice); the activation quantization is not
modelled.
"""

from __future__ import annotations

import numpy as np

DAMP = 0.01
BLOCK = 32  # rows corrected one at a time per block; 32 vs 128: same result, half the time on a 576 x 49152 weight


def _inverse_lower(lower: np.ndarray) -> np.ndarray:
    """``L⁻¹`` of a lower-triangular ``L``, by halves, matrix products only (about a third of the
    work of a general solve)::

        [[A, 0], [C, B]]⁻¹ = [[A⁻¹, 0], [-B⁻¹ C A⁻¹, B⁻¹]]
    """
    k = lower.shape[0]
    if k <= 96:
        return np.tril(np.linalg.inv(lower))
    h = k // 2
    a, b = _inverse_lower(lower[:h, :h]), _inverse_lower(lower[h:, h:])
    out = np.zeros_like(lower)
    out[:h, :h], out[h:, h:] = a, b
    out[h:, :h] = -(b @ lower[h:, :h]) @ a
    return out


def inverse_cholesky_upper(hessian: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper ``U`` with ``(H + λI)⁻¹ = UᵀU``, ``λ = damp * mean(diag H)``; H ``[K, K]`` symmetric PSD.

    With ``J`` the order-reversing permutation and ``J H J = L Lᵀ`` (one Cholesky factorization),
    ``H⁻¹ = J L⁻ᵀ L⁻¹ J = UᵀU`` for ``U = J L⁻¹ J``, which is upper triangular."""
    h = np.array(hessian, dtype=np.float64)
    k = h.shape[0]
    h[np.diag_indices(k)] += damp * max(float(np.mean(np.diag(h))), np.finfo(np.float64).tiny)
    lower = np.linalg.cholesky(h[::-1, ::-1])
    return np.ascontiguousarray(_inverse_lower(lower)[::-1, ::-1])


def gptq_round(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray, quantize, *,
               damp: float = DAMP, block: int = BLOCK) -> np.ndarray:
    """Grid values ``q`` (``[K, N]``, float64, ``W~ = q * scale``) for ``weight`` ``[K, N]``.

    ``hessian``: ``[K, K]``, ``Σ xᵀx`` over calibration rows of the op's input.
    ``scale``: ``[N]`` per-output-channel step, positive. ``quantize``: maps values already
    divided by the scale to grid values (rounding and clipping, e.g. ``QuantFormat.cast``).
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be [K, N], got shape {weight.shape}")
    k, n = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a [{k}, {n}] weight, got {hessian.shape}")
    if scale.shape != (n,):
        raise ValueError(f"scale must be [{n}] for a [{k}, {n}] weight, got {scale.shape}")
    step = scale.astype(np.float64)
    h = np.array(hessian, dtype=np.float64)
    live = np.diag(h) > 0
    h[~live, :] = 0.0
    h[:, ~live] = 0.0
    h[~live, ~live] = 1.0  # a dead input moves nothing and is moved by nothing
    order = np.argsort(-np.diag(h), kind="stable")
    w = weight.astype(np.float64)[order]
    for attempt in range(4):  # float32 sums can leave H barely indefinite: damp harder
        try:
            u = inverse_cholesky_upper(h[np.ix_(order, order)], damp * 10 ** attempt)
            break
        except np.linalg.LinAlgError:
            if attempt == 3:
                raise ValueError(f"the [{k}, {k}] second-moment matrix is not positive definite even with "
                                 f"damping {damp * 1000:g}") from None
    q = np.empty_like(w)
    for start in range(0, k, block):
        stop = min(start + block, k)
        wb = w[start:stop].copy()
        deltas = np.empty_like(wb)
        for i in range(stop - start):
            row = start + i
            q[row] = quantize(wb[i] / step)
            delta = (wb[i] - q[row] * step) / u[row, row]
            wb[i + 1:] -= np.outer(u[row, row + 1:stop], delta)
            deltas[i] = delta
        w[stop:] -= u[start:stop, stop:].T @ deltas
    out = np.empty_like(q)
    out[order] = q
    return out

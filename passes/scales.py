"""SmoothQuant's per-channel scale, as a pure function.

For input channel j of a group of linear ops sharing activation X::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

where max|W_j| is taken over every output channel of every weight in the group.
Then ``X' = X / s`` and ``W'_j = s_j W_j`` give ``X' W' = X W`` exactly (in exact arithmetic).
alpha=0 leaves activations alone (s = 1/max|W_j|), alpha=1 moves all of X's range into W.
A channel whose activation or weight maximum is zero (dead channel) gets s_j = 1.
"""

from __future__ import annotations

import numpy as np

MIN_SCALE = 1e-5
MAX_SCALE = 1e5


def smoothing_scales(act_amax: np.ndarray, weight_amax: np.ndarray, alpha: float) -> np.ndarray:
    """Scale vector ``s`` (float64, shape ``[C]``) from per-channel maxima of X and W."""
    act_amax = np.asarray(act_amax, dtype=np.float64)
    weight_amax = np.asarray(weight_amax, dtype=np.float64)
    if act_amax.ndim != 1 or weight_amax.ndim != 1:
        raise ValueError(f"expected 1-D maxima, got shapes {act_amax.shape} and {weight_amax.shape}")
    if act_amax.shape != weight_amax.shape:
        raise ValueError(f"activation has {act_amax.shape[0]} channels, weight has {weight_amax.shape[0]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if not (np.all(np.isfinite(act_amax)) and np.all(np.isfinite(weight_amax))):
        raise ValueError("maxima must be finite")
    if np.any(act_amax < 0) or np.any(weight_amax < 0):
        raise ValueError("maxima must be non-negative")
    live = (act_amax > 0) & (weight_amax > 0)
    s = np.ones_like(act_amax)
    s[live] = act_amax[live] ** alpha / weight_amax[live] ** (1.0 - alpha)
    return np.clip(s, MIN_SCALE, MAX_SCALE)

import numpy as np
import pytest

from passes.scales import MAX_SCALE, MIN_SCALE, smoothing_scales


def test_formula_matches_definition():
    act = np.array([1.0, 100.0, 4.0])
    w = np.array([0.5, 0.25, 2.0])
    for alpha in (0.0, 0.3, 0.5, 0.8, 1.0):
        np.testing.assert_allclose(smoothing_scales(act, w, alpha), act**alpha / w ** (1 - alpha))


def test_balances_ranges_at_half():
    act, w = np.array([100.0, 1.0]), np.array([1.0, 1.0])
    s = smoothing_scales(act, w, 0.5)
    np.testing.assert_allclose(act / s, w * s)  # alpha=0.5 equalizes max|X/s| and max|sW|


def test_dead_channels_get_one_and_result_is_finite():
    s = smoothing_scales(np.array([0.0, 3.0, 2.0]), np.array([1.0, 0.0, 1.0]), 0.5)
    assert s[0] == 1.0 and s[1] == 1.0 and np.all(np.isfinite(s))


def test_clamped():
    s = smoothing_scales(np.array([1e30, 1e-30]), np.array([1e-30, 1e30]), 0.5)
    assert s[0] == MAX_SCALE and s[1] == MIN_SCALE


@pytest.mark.parametrize("act, w, alpha, message", [
    (np.ones(3), np.ones(4), 0.5, "channels"),
    (np.ones((3, 1)), np.ones(3), 0.5, "1-D"),
    (np.ones(3), np.ones(3), 1.5, "alpha"),
    (np.array([1.0, np.inf]), np.ones(2), 0.5, "finite"),
    (np.array([1.0, -1.0]), np.ones(2), 0.5, "non-negative"),
])
def test_shape_and_value_checks(act, w, alpha, message):
    with pytest.raises(ValueError, match=message):
        smoothing_scales(act, w, alpha)

"""Calibration memory does not grow with the number of samples (fresh process per run)."""

from bench.calib_memory import measure


def test_peak_rss_1000_vs_10_samples():
    small = measure("calibrate", 10, seq_len=256, batch=8)
    large = measure("calibrate", 1000, seq_len=256, batch=8)
    assert large["peak_rss_mb"] <= 1.10 * small["peak_rss_mb"], (small, large)

"""Calibrators: run the FP model in ONNX Runtime and gather per-channel activation statistics."""

from calibrators.data import CalibrationData, InputSpec, model_inputs
from calibrators.calibrate import Calibration, calibrate, collect_channel_stats
from calibrators.minmax import StatTarget
from calibrators.stats import ChannelStats

__all__ = ["Calibration", "CalibrationData", "ChannelStats", "InputSpec", "StatTarget", "calibrate",
           "collect_channel_stats", "model_inputs"]

"""Calibrators: run the FP model in ONNX Runtime and gather per-channel activation statistics."""

from calibrators.data import CalibrationData, InputSpec, model_inputs
from calibrators.minmax import StatTarget, collect_channel_stats
from calibrators.stats import ChannelStats

__all__ = ["CalibrationData", "ChannelStats", "InputSpec", "StatTarget", "collect_channel_stats", "model_inputs"]

"""SmoothQuant for ONNX: graph passes and the pipeline that runs them.

Public API::

    from passes import smoothquant, SmoothQuantConfig, SmoothingConfig, CalibrationConfig
"""

from passes.config import (CalibrationConfig, Precision, QuantizationConfig, SmoothingConfig, SmoothQuantConfig,
                           Unfoldable)
from passes.errors import SmoothQuantError
from passes.fold import SmoothingReport
from passes.pipeline import SmoothQuantResult, smoothquant

__all__ = ["CalibrationConfig", "Precision", "QuantizationConfig", "SmoothingConfig", "SmoothQuantConfig",
           "SmoothQuantError", "SmoothQuantResult", "SmoothingReport", "Unfoldable", "smoothquant"]

"""SmoothQuant for ONNX: graph passes and the pipeline that runs them.

Public API::

    from passes import run_smoothquant, SmoothQuantConfig, SmoothingConfig, CalibrationConfig

Names load on first use, so submodules (and :mod:`calibrators`) import without cycles.
"""

from __future__ import annotations

import importlib
import importlib.metadata

try:
    __version__ = importlib.metadata.version("smoothquant-onnx")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "CalibrationConfig": "passes.config",
    "Precision": "passes.config",
    "QuantizationConfig": "passes.config",
    "SmoothingConfig": "passes.config",
    "SmoothQuantConfig": "passes.config",
    "Granularity": "passes.config",
    "Target": "passes.config",
    "Unfoldable": "passes.config",
    "WeightRounding": "passes.config",
    "WeightStorage": "passes.config",
    "SmoothQuantError": "passes.ir.errors",
    "SmoothingReport": "passes.fold",
    "SmoothQuantResult": "passes.pipeline",
    "run_smoothquant": "passes.pipeline",
}

__all__ = sorted(_EXPORTS)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'passes' has no attribute {name!r}")

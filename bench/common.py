"""What the accuracy benches share: quantize a model once per setting, timing each run."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from passes import SmoothQuantConfig, run_smoothquant


def quantize_each(model: Path, settings: Sequence[tuple[str, SmoothQuantConfig]],
                  only: str | None = None) -> Iterator[tuple[str, Path, float]]:
    """(label, quantized model, seconds) per setting whose label contains ``only``; each output
    lives in a temporary folder until the next setting runs."""
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in settings:
            if only and only not in label:
                continue
            start = time.perf_counter()
            out = run_smoothquant(model, Path(tmp) / "q.onnx", config=config).written[0]
            yield label, out, time.perf_counter() - start
            print(f"done: {label}", flush=True)

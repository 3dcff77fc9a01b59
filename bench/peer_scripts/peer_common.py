"""What the peer scripts share (each runs in a peer's own venv; this file sits beside them, on
their ``sys.path``): peak RSS, the calibration set, the JSON line they print."""

import json
import time
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load_arrays(calib_path: str) -> dict[str, np.ndarray]:
    with np.load(calib_path) as z:
        return {k: z[k] for k in z.files}


def batches(calib_path: str, size: int = 8) -> list[dict[str, np.ndarray]]:
    arrays = load_arrays(calib_path)
    n = next(iter(arrays.values())).shape[0]
    return [{k: v[i:i + size] for k, v in arrays.items()} for i in range(0, n, size)]


def report(start: float, **extra) -> None:
    """The one JSON line the benchmark reads: seconds since ``start``, peak RSS, and ``extra``."""
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                      **extra}))

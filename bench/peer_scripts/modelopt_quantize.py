"""Runs inside ModelOpt's own virtual environment (nvidia-modelopt[onnx], onnxruntime CPU):

    python modelopt_quantize.py MODEL.onnx CALIB.npz OUT.onnx [--mode int8|fp8] [--method max|entropy] [--external-data]

``modelopt.onnx.quantization.quantize`` with CPU calibration (``calibration_eps=["cpu"]``), its
default calibration method unless ``--method`` names one, and the non-quantized parts kept fp32 (``high_precision_dtype="fp32"``;
its fp16 default makes every comparison on a CPU a comparison of fp16 emulation). Calibration
inputs: the whole .npz at once. Prints one JSON line: seconds, peak RSS MB, version.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    model_path, calib_path, out_path = sys.argv[1:4]
    mode = sys.argv[sys.argv.index("--mode") + 1] if "--mode" in sys.argv else "int8"
    method = sys.argv[sys.argv.index("--method") + 1] if "--method" in sys.argv else None
    start = time.perf_counter()
    import modelopt
    from modelopt.onnx.quantization import quantize

    with np.load(calib_path) as z:
        calib = {k: z[k] for k in z.files}
    quantize(model_path, quantize_mode=mode, calibration_data=calib, calibration_eps=["cpu"], calibration_method=method,
             high_precision_dtype="fp32", output_path=out_path, log_level="WARNING",
             use_external_data_format="--external-data" in sys.argv)
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                      "modelopt": modelopt.__version__}))


if __name__ == "__main__":
    main()

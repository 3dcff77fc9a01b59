"""Runs inside its own virtual environment (onnxruntime + neural-compressor 3.7.1, numpy<2):

    python ort_smoothquant.py MODEL.onnx CALIB.npz OUT.onnx [--alpha 0.5]

ONNX Runtime's quantize_static with its SmoothQuant option (implemented by neural-compressor),
QDQ, MatMul only, uint8 asymmetric activations, int8 symmetric per-channel weights, batches of 8.
Prints one JSON line: seconds, peak RSS MB.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Reader(CalibrationDataReader):
    def __init__(self, path):
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        n = next(iter(arrays.values())).shape[0]
        self.it = iter([{k: v[i:i + 8] for k, v in arrays.items()} for i in range(0, n, 8)])

    def get_next(self):
        return next(self.it, None)


def main() -> None:
    model, calib, out = sys.argv[1:4]
    alpha = float(sys.argv[sys.argv.index("--alpha") + 1]) if "--alpha" in sys.argv else 0.5
    start = time.perf_counter()
    quantize_static(model, out, Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    extra_options={"WeightSymmetric": True, "SmoothQuant": True, "SmoothQuantAlpha": alpha,
                                   "SmoothQuantFolding": True})
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}))


if __name__ == "__main__":
    main()

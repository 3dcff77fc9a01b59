"""Runs inside its own virtual environment (onnxruntime + neural-compressor 3.7.1, numpy<2):

    python ort_smoothquant.py MODEL.onnx CALIB.npz OUT.onnx [--alpha 0.5]

ONNX Runtime's quantize_static with its SmoothQuant option (implemented by neural-compressor),
QDQ, MatMul only, uint8 asymmetric activations, int8 symmetric per-channel weights, batches of 8.
Prints one JSON line: seconds, peak RSS MB.
"""

import sys
import time

from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from peer_common import batches, report


class Reader(CalibrationDataReader):
    def __init__(self, path):
        self.it = iter(batches(path))

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
    report(start)


if __name__ == "__main__":
    main()

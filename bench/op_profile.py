"""Where ONNX Runtime CPU spends its time, per op type, for several models on the same batch.

    python -m bench.op_profile A.onnx B.onnx ... --data EVAL.npz [--batch 8] [--rounds 20] [--json OUT.json]

Each model runs in its own session (default graph optimizations, so the op types are the
fused kernels ORT actually runs) with ORT's profiler on; rounds alternate between the models.
The table gives milliseconds per run for each op type (summed over its nodes, averaged over
rounds after one warm-up), largest first, one column per model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort

from calibrators.data import CalibrationData


def profiled_session(model: Path, prefix: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def op_times(profile: Path, rounds: int) -> dict[str, float]:
    """ms per run per op type from an ORT profile (node events; the warm-up run dropped)."""
    events = json.loads(profile.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= first_end:
            totals[e["args"]["op_name"]] += e["dur"] / 1000.0 / rounds
    return dict(totals)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--data", required=True, help="inputs (.npz); the first batch is used")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args(argv)
    feed = next(iter(CalibrationData(args.data, args.batch).batches()))
    with tempfile.TemporaryDirectory() as tmp:
        sessions = [profiled_session(m, str(Path(tmp) / f"m{i}")) for i, m in enumerate(args.models)]
        for s in sessions:
            s.run(None, feed)  # warm-up
        for _ in range(args.rounds):
            for s in sessions:
                s.run(None, feed)
        tables = [op_times(Path(s.end_profiling()), args.rounds) for s in sessions]
    ops = sorted({op for t in tables for op in t}, key=lambda op: -max(t.get(op, 0.0) for t in tables))
    names = [m.stem[:22] for m in args.models]
    print(f"{'op type (ms per run)':<28}" + "".join(f"{n:>24}" for n in names))
    for op in ops:
        print(f"{op:<28}" + "".join(f"{t.get(op, 0.0):>24.2f}" for t in tables))
    print(f"{'total':<28}" + "".join(f"{sum(t.values()):>24.2f}" for t in tables))
    if args.json:
        Path(args.json).write_text(json.dumps({str(m): t for m, t in zip(args.models, tables)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

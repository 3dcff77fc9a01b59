"""A seeded fuzzer for the command line: random small graphs, random corruptions, four properties.

Each case builds a model from random blocks (LayerNorm or a decomposed RMSNorm, linear layers with
and without bias, weights shared between layers, GELU/ReLU/SiLU, residual adds, an ``If`` or a
``Loop`` whose body reads an outer activation and weight), in float32 or float16, at a random opset, inline or with
external data, with calibration data; then maybe corrupts the model, its data or the output paths, and runs
``python -m passes.smoothquant`` in-process with random flags. Properties:

1. never a traceback: ``main`` returns an exit code (0, 1 or 2) and raises nothing;
2. never exit 0 with an invalid output: it loads in ONNX Runtime and, with ``--smooth-only``, matches
   the input model within 1e-4 (fp16 models: 1e-2) on fresh random inputs;
3. never an input changed (sha256 of every file there before the run);
4. nothing partial: on failure no new file, on success no temporary left.

``tests/test_fuzz.py`` runs a bounded number of cases in CI; ``python -m bench.fuzz --cases N``
runs many more and prints what it found.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from passes.smoothquant import main

MODES = (["--smooth-only"], ["--fast"], [], ["--target", "onnxruntime", "--fast"], ["--precision", "fp8", "--fast"],
         ["--granularity", "per-token", "--target", "onnxruntime", "--fast"], ["--smooth-only", "--alpha", "0.9"])
CORRUPTIONS = ("none", "none", "none", "truncate_model", "flip_model", "truncate_data", "nan_data", "dtype_data",
               "shape_data", "missing_input", "out_is_input", "out_is_data", "stats_is_calib", "out_is_dir",
               "empty_data", "bad_length")


@dataclass
class Case:
    seed: int
    mode: list[str]
    corruption: str
    code: int | None = None
    error: str = ""
    problems: list[str] = field(default_factory=list)


class _Builder:
    def __init__(self, rng: np.random.Generator, k: int, dtype=np.float32):
        self.rng, self.k, self.dtype = rng, k, dtype
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def const(self, value: np.ndarray, stem: str = "c") -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(value.astype(self.dtype), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        return out

    def norm(self, x: str, opset: int) -> str:
        gamma = self.const(self.rng.uniform(0.5, 2.0, self.k) * np.where(self.rng.random(self.k) < 0.1, 20, 1), "g")
        if opset >= 17 and self.rng.random() < 0.6:
            return self.node("LayerNormalization", [x, gamma, self.const(self.rng.normal(size=self.k), "b")], axis=-1)
        sq = self.node("Mul", [x, x])
        mean = self.node("ReduceMean", [sq], axes=[-1], keepdims=1) if opset < 18 else \
            self.node("ReduceMean", [sq, self._axes()], keepdims=1)
        rms = self.node("Sqrt", [self.node("Add", [mean, self.const(np.array(1e-5))])])
        return self.node("Mul", [self.node("Div", [x, rms]), gamma])

    def _axes(self) -> str:
        name = self.name("axes")
        self.inits.append(numpy_helper.from_array(np.array([-1], np.int64), name))
        return name

    def linear(self, x: str, n: int, weight: str | None = None) -> tuple[str, str]:
        w = weight or self.const(self.rng.normal(0, 0.3, (self.k, n)), "w")
        y = self.node("MatMul", [x, w])
        if self.rng.random() < 0.5:
            y = self.node("Add", [y, self.const(self.rng.normal(size=n), "bias")])
        return y, w

    def act(self, x: str) -> str:
        kind = self.rng.integers(3)
        if kind == 0:
            return self.node("Relu", [x])
        if kind == 1:
            return self.node("Mul", [x, self.node("Sigmoid", [x])])
        half = self.node("Mul", [x, self.const(np.array(0.5))])
        erf = self.node("Erf", [self.node("Div", [x, self.const(np.array(1.4142135))])])
        return self.node("Mul", [half, self.node("Add", [erf, self.const(np.array(1.0))])])


def random_model(rng: np.random.Generator, folder: Path) -> tuple[Path, int]:
    """The model file (inline or with external data ``model.weights``) and its width."""
    k = int(rng.choice([8, 16]))
    opset = int(rng.choice([13, 17, 18, 19, 21]))
    half = rng.random() < 0.2
    elem, b = (TensorProto.FLOAT16, _Builder(rng, k, np.float16)) if half else (TensorProto.FLOAT, _Builder(rng, k))
    x, shared, with_if = "x", None, rng.random() < 0.4
    for _ in range(int(rng.integers(1, 4))):
        h = b.norm(x, opset)
        y1, w = b.linear(h, k, shared if shared and rng.random() < 0.5 else None)
        shared = shared or w
        if rng.random() < 0.5:
            y2, _ = b.linear(h, k)
            y1 = b.node("Add", [y1, b.act(y2)])
        x = b.node("Add", [x, y1])
    outputs = [helper.make_tensor_value_info(x, elem, None)]
    inputs = [helper.make_tensor_value_info("x", elem, ["n", 4, k])]
    if with_if and rng.random() < 0.5:  # an If whose then-branch reads h and the shared weight
        then = helper.make_graph([helper.make_node("MatMul", [h, shared], ["t_out"], name="then_mm")], "then", [],
                                 [helper.make_tensor_value_info("t_out", elem, None)])
        other = helper.make_graph([helper.make_node("Identity", [h], ["e_out"], name="else_id")], "else", [],
                                  [helper.make_tensor_value_info("e_out", elem, None)])
        cond = b.node("Greater", [b.node("ReduceMax", ["x"], keepdims=0), b.const(np.array(0.0))])
        b.nodes.append(helper.make_node("If", [cond], ["z"], then_branch=then, else_branch=other, name="branch"))
        outputs.append(helper.make_tensor_value_info("z", elem, None))
    elif with_if:  # a Loop whose body reads h and the shared weight, two iterations
        body = helper.make_graph(
            [helper.make_node("MatMul", [h, shared], ["step"], name="body_mm"),
             helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")], "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("step", elem, None)])
        trips = b.name("trips")
        b.inits.append(numpy_helper.from_array(np.array(2, np.int64), trips))
        b.nodes.append(helper.make_node("Loop", [trips, ""], ["z"], body=body, name="loop"))
        z = helper.make_tensor_value_info("z", elem, None)
        z.type.tensor_type.shape.dim.add().dim_param = "t"
        outputs.append(z)
    for vi in outputs:  # the checker wants a shape on graph outputs
        vi.type.tensor_type.shape.dim.add().dim_param = "a"
        vi.type.tensor_type.shape.dim.add().dim_param = "b"
        vi.type.tensor_type.shape.dim.add().dim_param = "c"
    graph = helper.make_graph(b.nodes, "fuzz", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    path = folder / "model.onnx"
    if rng.random() < 0.4 and not half:
        onnx.save(model, str(path), save_as_external_data=True, location="model.weights", size_threshold=256)
    else:
        onnx.save(model, str(path))
    return path, k


def _feed(rng: np.random.Generator, k: int, dtype=np.float32) -> dict:
    return {"x": (rng.normal(size=(int(rng.integers(1, 4)), 4, k)) + rng.choice([-0.5, 0.5])).astype(dtype)}


def _state(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.iterdir())}


def _corrupt(kind: str, rng: np.random.Generator, folder: Path, model: Path, calib: Path, args: list[str]) -> list[str]:
    data = folder / "model.weights"
    if kind == "truncate_model":
        raw = model.read_bytes()
        model.write_bytes(raw[: int(len(raw) * rng.uniform(0.1, 0.9))])
    elif kind == "flip_model":
        raw = bytearray(model.read_bytes())
        for i in rng.integers(0, len(raw), 8):
            raw[i] ^= 0xFF
        model.write_bytes(bytes(raw))
    elif kind == "truncate_data" and data.exists():
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif kind == "bad_length" and data.exists():
        proto = onnx.load(str(model), load_external_data=False)
        entry = next(e for t in proto.graph.initializer for e in t.external_data if e.key == "length")
        entry.value = str(int(entry.value) - 4)
        onnx.save(proto, str(model))
    elif kind in ("nan_data", "dtype_data", "shape_data", "missing_input", "empty_data"):
        with np.load(calib) as z:
            arrays = {k: z[k] for k in z.files}
        if kind == "nan_data":
            arrays["x"].flat[int(rng.integers(arrays["x"].size))] = np.nan
        elif kind == "dtype_data":
            arrays["x"] = arrays["x"].astype(np.float64)
        elif kind == "shape_data":
            arrays["x"] = arrays["x"][..., :-1]
        elif kind == "missing_input":
            arrays.pop("x")
            arrays["y"] = np.zeros(3, np.float32)
        else:
            arrays["x"] = arrays["x"][:0]
        np.savez(calib, **arrays)
    elif kind == "out_is_input":
        return ["-o", str(model)]
    elif kind == "out_is_data" and data.exists():
        return ["-o", str(data)]
    elif kind == "stats_is_calib":
        return ["--stats-out", str(calib)]
    elif kind == "out_is_dir":
        (folder / "outdir.onnx").mkdir()
        return ["-o", str(folder / "outdir.onnx")]
    return []


def _exact(model: Path, out: Path, rng: np.random.Generator, k: int, dtype) -> float:
    feed = _feed(rng, k, dtype)
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feed)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)
    return max(float(np.abs(r.astype(np.float64) - g).max() / max(np.abs(r).max(), 1e-6)) for r, g in zip(ref, got))


def run_case(seed: int, folder: Path) -> Case:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model, k = random_model(rng, folder)
    dtype = np.float16 if onnx.load(str(model), load_external_data=False).graph.input[0].type.tensor_type.elem_type \
        == TensorProto.FLOAT16 else np.float32
    calib = folder / "model.calib.npz"
    np.savez(calib, x=np.concatenate([_feed(rng, k, dtype)["x"] for _ in range(int(rng.integers(1, 4)))]))
    case = Case(seed, MODES[int(rng.integers(len(MODES)))], CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))])
    extra = _corrupt(case.corruption, rng, folder, model, calib, case.mode)
    out = folder / "out.onnx"
    args = [str(model), "-q", "--calib", str(calib), *case.mode, *(extra if "-o" in extra else ["-o", str(out), *extra])]
    before = _state(folder)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            case.code = main(args)
    except SystemExit as e:
        case.code = e.code if isinstance(e.code, int) else 2
    except BaseException:  # noqa: BLE001 - a traceback is exactly what the fuzzer looks for
        case.problems.append("traceback: " + traceback.format_exc().strip().splitlines()[-1])
        return case
    case.error = next((ln for ln in stderr.getvalue().splitlines() if ln.startswith("error:")), "")
    after = _state(folder)
    changed = [n for n, h in before.items() if after.get(n) != h]
    if changed:
        case.problems.append(f"inputs changed or removed: {changed}")
    new = sorted(set(after) - set(before))
    leftovers = [n for n in new if n.startswith(".")]
    if leftovers:
        case.problems.append(f"temporary files left: {leftovers}")
    if case.code != 0:
        if [n for n in new if not n.startswith(".")]:
            case.problems.append(f"exit {case.code} but wrote {new}")
        if case.code == 1 and len([ln for ln in stderr.getvalue().splitlines() if ln.startswith("error:")]) != 1:
            case.problems.append("exit 1 without exactly one error line")
        return case
    try:
        err = _exact(model, out, rng, k, dtype)
    except Exception as e:  # noqa: BLE001
        case.problems.append(f"exit 0 but the output does not run: {type(e).__name__}: {str(e).splitlines()[0]}")
        return case
    if "--smooth-only" in case.mode and err > (1e-4 if dtype == np.float32 else 1e-2):
        case.problems.append(f"--smooth-only output differs from the input model by {err:.2e}")
    return case

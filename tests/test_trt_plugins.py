"""The TensorRT plugins under TensorRT's own Python plugin layer (tensorrt-cu12-bindings 10.8 to 11.4).

The models are what ``--granularity per-token --target tensorrt`` writes; the driver
(:mod:`tests.trt_driver`) imports and builds each plugin node as TensorRT's ONNX parser and builder do,
over the real ``tensorrt.plugin`` package (:mod:`tests.trt_harness`, :mod:`tests.trt_standin` for what
that package needs of the compiled core). On NumPy 2 (this environment) and NumPy 1.26. The AOT
kernels are compiled to PTX for sm_90 by Triton on the CPU; running them needs a GPU (``--run``).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from passes.config import Granularity, Precision, Target
from passes.pipeline import run_smoothquant
from plugins import schema, tiles
from plugins.onnx_reference import CUSTOM_OPS
from test_quant_options import config
from trt_harness import VERSIONS, numpy1, run_driver

HAVE_TRITON = importlib.util.find_spec("triton") is not None
_TRT_TYPE = {TensorProto.FLOAT: "FLOAT", TensorProto.FLOAT16: "HALF", TensorProto.BFLOAT16: "BF16",
             TensorProto.INT8: "INT8", TensorProto.FLOAT8E4M3FN: "FP8"}
K1, N1, N2 = 32, 48, 16


def two_layer_model(path):
    """x [batch, seq, 32] -> MatMul + bias -> Relu -> MatMul -> y [batch, seq, 16]."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(0, 0.2, (K1, N1)).astype(np.float32), rng.normal(size=N1).astype(np.float32)
    w2 = rng.normal(0, 0.2, (N1, N2)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             helper.make_node("Relu", ["h1"], ["h2"], name="act"),
             helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N2])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    feeds = [{"x": rng.normal(size=(2, 8, K1)).astype(np.float32)} for _ in range(2)]
    return feeds


def plugin_spec(model: onnx.ModelProto) -> dict:
    """The plugin nodes with what TensorRT's parser sees of them: attributes by ONNX type, tensor types
    and shapes (activations from the graph input's symbolic dims, propagated by the ops' semantics)."""
    inits = {t.name: t for t in model.graph.initializer}
    tensors = {vi.name: (vi.type.tensor_type.elem_type,
                         [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim])
               for vi in model.graph.input}
    for t in inits.values():
        tensors[t.name] = (t.data_type, list(t.dims))
    nodes = []
    for node in model.graph.node:
        if node.domain != schema.DOMAIN:
            first = tensors[node.input[0]]
            tensors[node.output[0]] = first  # elementwise ops between the linear layers
            continue
        x_type, x_shape = tensors[node.input[0]]
        if node.op_type == schema.QUANTIZE_PER_TOKEN:
            qtype = helper.get_attribute_value(next(a for a in node.attribute if a.name == "qtype")).decode()
            q = TensorProto.FLOAT8E4M3FN if qtype == "fp8" else TensorProto.INT8
            outs = [(q, x_shape), (TensorProto.FLOAT, x_shape[:-1] + [1])]
        else:
            out_dtype = helper.get_attribute_value(next(a for a in node.attribute if a.name == "out_dtype"))
            outs = [(out_dtype, x_shape[:-1] + [tensors[node.input[2]][1][0]])]
        for name, t in zip(node.output, outs):
            tensors[name] = t
        attrs = [{"name": a.name, "type": onnx.AttributeProto.AttributeType.Name(a.type),
                  "value": (a.s.decode() if a.type == onnx.AttributeProto.STRING else helper.get_attribute_value(a))}
                 for a in node.attribute]
        nodes.append({"op": node.op_type, "domain": node.domain, "attrs": attrs,
                      "inputs": [{"name": i, "dtype": _TRT_TYPE[tensors[i][0]], "shape": tensors[i][1]}
                                 for i in node.input],
                      "outputs": [{"name": o, "dtype": _TRT_TYPE[tensors[o][0]], "shape": tensors[o][1]}
                                  for o in node.output]})
    return {"nodes": nodes}


def reference_values(model: onnx.ModelProto, path, x: np.ndarray) -> dict:
    """Every tensor of the plugin nodes at one input, by ``onnx.reference`` with the custom ops (for
    ``--run``); 1-byte codes saved as int8."""
    names = sorted({t for n in model.graph.node if n.domain == schema.DOMAIN for t in (*n.input, *n.output)})
    got = ReferenceEvaluator(model, new_ops=CUSTOM_OPS).run(names, {"x": x})
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    arrays = {n: (inits[n] if n in inits else v) for n, v in zip(names, got)}
    dtypes = {n: "FP8" for n, a in arrays.items() if a.dtype.itemsize == 1 and a.dtype != np.int8}
    np.savez(path, **{n: (a.view(np.int8) if a.dtype.itemsize == 1 else a) for n, a in arrays.items()})
    return {"values": str(path), "value_dtypes": dtypes}


@pytest.fixture(scope="module", params=list(Precision), ids=lambda p: p.value)
def spec(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"trt_{request.param.value}")
    feeds = two_layer_model(tmp / "m.onnx")
    cfg = config(granularity=Granularity.PER_TOKEN, target=Target.TENSORRT, precision=request.param)
    run_smoothquant(tmp / "m.onnx", tmp / "pt.onnx", calib=feeds, config=cfg)
    model = onnx.load(str(tmp / "pt.onnx"))
    x = np.random.default_rng(1).normal(size=(3, 5, K1)).astype(np.float32)  # the driver's SIZES
    x[1, 2] *= 40  # one loud token
    path = tmp / "spec.json"
    path.write_text(json.dumps({**plugin_spec(model), **reference_values(model, tmp / "values.npz", x)}))
    return request.param, path


def _checked(run) -> dict:
    assert run.returncode == 0, f"{run.stderr[-3000:]}\nreport: {json.dumps(run.report)[:1500]}"
    return run.report


def _fitting(precision: Precision, version: str) -> list[int]:
    """The tactics W8A8Linear [48 x 32] should offer: none without AOT, else the tiles whose kernel fits."""
    if version == VERSIONS[0]:
        return []
    if not HAVE_TRITON:
        pytest.skip("Triton compiles the AOT kernels whose tiles W8A8Linear offers as tactics (pip install triton)")
    from plugins import aot

    return [t for t in tiles.tactics() if aot.linear_kernel(N1, K1, precision is Precision.FP8, "fp32",
                                                            tiles.tactic_tile(t), arch=90)[0].shared <= 48 * 1024]


def _expected_fields(precision: Precision) -> list[dict]:
    qtype = list(np.frombuffer(precision.value.encode() + b"\0", np.int8))
    return [{"qtype": ["CHAR", qtype]}, {"out_dtype": ["INT32", [TensorProto.FLOAT]]}]


@pytest.mark.parametrize("version", VERSIONS)
def test_jit_plugins_import_register_and_build(spec, version):
    """Every version: import, registration, creation from parser-style fields, output types and shapes
    for dynamic batch and sequence, a format combination matching the network, the tactics, and the
    JIT engine's serialized fields (NUL and all) re-creating the same plugin."""
    precision, path = spec
    tactics = _fitting(precision, version)
    report = _checked(run_driver(version, path, "jit"))
    assert report["registered"] == [f"{schema.PLUGIN_NAMESPACE}::{schema.QUANTIZE_PER_TOKEN}",
                                    f"{schema.PLUGIN_NAMESPACE}::{schema.W8A8_LINEAR}"]
    assert report["field_names"] == {"QuantizePerToken": [["qtype", "CHAR"]], "W8A8Linear": [["out_dtype", "INT32"]]}
    nodes = report["nodes"]
    assert [n["op"] for n in nodes] == [schema.QUANTIZE_PER_TOKEN, schema.W8A8_LINEAR] * 2
    for node, fields in zip(nodes, _expected_fields(precision) * 2):
        assert node["fields"] == fields  # exactly as the parser encodes them
        assert node["kind"] == "_TemplateJITPlugin" if version >= "10.9" else node["kind"].startswith("_Template")
        assert node["combinations"] == 1
    assert [n["tactics"] for n in nodes] == [[], tactics] * 2
    assert nodes[0]["serialized"] == {"qtype": list(np.frombuffer(precision.value.encode() + b"\0", np.int8))}
    assert report["aot_available"] is (version != "10.8.0.43")


def test_numpy1(spec):
    """The same on NumPy 1.26 (the plugin layer converts fields with NumPy; 10.16 and older with
    ``int(array)``), for the oldest and newest supported versions."""
    precision, path = spec
    for version in (VERSIONS[0], VERSIONS[-1]):
        report = _checked(run_driver(version, path, "jit", numpy_dir=numpy1()))
        assert report["numpy"].startswith("1.26")
        assert [n["fields"] for n in report["nodes"]] == _expected_fields(precision) * 2


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton compiles the AOT kernels (pip install triton)")
@pytest.mark.parametrize("version", VERSIONS[1:])
def test_aot_launch_parameters_and_kernels(spec, version):
    """AOT: for every tactic, the PTX (sm_90, compiled by Triton on this CPU) has the entry TensorRT will
    launch, taking exactly its arguments in its order (input pointers, extra int32 scalars, output
    pointers), and the launch expressions evaluate, at batch 3 x seq 5, to the grid, block and shared
    memory of that kernel."""
    from plugins import aot

    precision, path = spec
    report = _checked(run_driver(version, path, "aot"))
    fp8, m = precision is Precision.FP8, 3 * 5
    quantize, linear = report["nodes"][0], report["nodes"][1]
    assert quantize["kind"] == linear["kind"] == "_TemplateAOTPlugin"
    [qk] = quantize["kernels"]
    kernel, grid = aot.quantize_kernel("fp32", K1, fp8, arch=90)
    assert (qk["name"], qk["params"], qk["scalars"], qk["target"]) == (kernel.name, ["u64"] * 3, [], "sm_90a")
    assert qk["launch"] == {"grid_x": grid(m), "grid_y": 1, "grid_z": 1, "block_x": kernel.threads, "block_y": 1,
                            "block_z": 1, "shared_mem": kernel.shared}
    assert [k["tactic"] for k in linear["kernels"]] == _fitting(precision, version) == [2, 3, 4, 5]
    for k in linear["kernels"]:
        kernel, grid = aot.linear_kernel(N1, K1, fp8, "fp32", tiles.tactic_tile(k["tactic"]), arch=90)
        # q, x_scale, w, w_scale, bias pointers; M as int32; y pointer
        assert (k["name"], k["params"], k["scalars"]) == (kernel.name, ["u64"] * 5 + ["u32", "u64"], [m])
        assert k["launch"]["grid_x"] == grid(m) and k["launch"]["block_x"] == kernel.threads
        assert k["launch"]["shared_mem"] == kernel.shared <= tiles.DEFAULT_SHARED_LIMIT


def _cuda() -> bool:
    if not HAVE_TRITON or importlib.util.find_spec("cupy") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU with Triton and CuPy")
@pytest.mark.parametrize("impl", ["jit", "aot"])
def test_plugins_run_on_a_gpu_as_tensorrt_runs_them(spec, impl):
    """The built plugins executed: JIT through ``enqueue`` with device buffers (FP8 codes included),
    AOT by launching ``get_kernel``'s PTX with ``get_launch_params``' values, every tactic; each node's
    outputs against ``onnx.reference`` with the custom ops."""
    precision, path = spec
    report = _checked(run_driver(VERSIONS[-1], path, impl, run=True))
    runs = report["run"]
    assert len(runs) == (4 if impl == "jit" else 2 + 2 * len(_fitting(precision, VERSIONS[-1])))
    for r in runs:
        assert all(e < (1e-2 if "_q" in name else 1e-3) for name, e in r["errors"].items()), r


def test_jit_buffers_of_every_type(spec):
    """tensorrt.plugin.Tensor refuses FP8 and BF16 in ``__cuda_array_interface__`` (NumPy has no such
    types): the JIT kernels would fail on an FP8 model's codes. plugins.trt_jit describes any buffer."""
    report = _checked(run_driver(VERSIONS[-1], spec[1], "jit", interface=True))
    got = report["interface"]
    for name in ("FP8", "BF16"):
        assert got[name]["tensorrt"].startswith("ValueError") and "not supported" in got[name]["tensorrt"]
    for name, size, typestr in (("FP8", 1, "|i1"), ("BF16", 2, "<i2"), ("HALF", 2, "<i2"), ("FLOAT", 4, "<i4"),
                                ("INT8", 1, "|i1")):
        ours = got[name]["ours"]
        assert (ours["shape"], ours["typestr"], ours["data"]) == ([3, 5, 32], typestr, [1 << 20, False])
        assert ours["strides"] == [160 * size, 32 * size, size]
    assert got["HALF"]["tensorrt"]["strides"] == got["HALF"]["ours"]["strides"]  # same layout as TensorRT's own

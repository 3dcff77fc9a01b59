"""Plays TensorRT's part for the project's plugins, over TensorRT's real ``tensorrt.plugin`` package.

Run by :mod:`tests.trt_harness` in a fresh interpreter whose ``tensorrt`` package is the wheel's
pure Python over :mod:`tests.trt_standin`::

    python tests/trt_driver.py SPEC.json {aot,jit} [--run]

``SPEC.json`` lists the plugin nodes of a model written by ``--granularity per-token --target
tensorrt`` (op, domain, attributes with their ONNX types, input and output types and shapes). For
each node the driver does what TensorRT does, in TensorRT's order, and checks every answer:

1. **ONNX parser** (onnx-tensorrt ``onnxOpImporters.cpp``, ``FallbackPluginImporter`` and
   ``loadFields``; ``importerUtils.cpp``, ``createPlugin``): the creator is looked up as
   ``(op_type, plugin_version or "1", plugin_namespace)``, then with the node's domain as namespace;
   the fields are the node attributes named in the creator's ``field_names``, encoded by the
   attribute's ONNX type: INT as one ``kINT32`` (``attrs.get<int32_t>``), FLOAT as one ``kFLOAT32``,
   STRING as ``kCHAR`` bytes *with the terminating NUL* (``copyField`` appends ``'\\0'``), INTS/FLOATS
   as arrays. A quick-plugin creator is called with the op type as name and a creation request: the
   node's ``aot`` attribute (STRICT), else the network's ``PREFER_AOT/JIT_PYTHON_PLUGINS`` flag
   (what ``passes.build_engine`` sets). TensorRT < 10.9 has no request argument.
2. **Builder** (``NvInferRuntime.h``, ``IPluginV3OneBuild``; ``pyPlugin.cpp`` call sequence):
   ``get_output_data_types(types, ranks)``, ``get_output_shapes(DimsExprs, [], IExprBuilder)`` with
   symbolic batch and sequence sizes, ``get_supported_format_combinations(in_out, nb_inputs)`` (a
   flat list; its length must be a multiple of the I/O count and one combination must match the
   network's types, or the build fails), ``configure_plugin``, ``get_valid_tactics`` (0 is passed to
   ``set_tactic`` when no custom tactic is advertised), then per tactic for AOT
   ``get_launch_params(...)`` and ``get_kernel(in, out)``; the PTX entry must take exactly the
   arguments TensorRT passes (input pointers, extra int32 scalars, output pointers), and the launch
   expressions are evaluated at concrete sizes.
3. **Engine serialization** (JIT): ``get_fields_to_serialize`` is fed back to the creator at the
   runtime phase, and the re-created plugin must compute the same output types.
4. ``--run`` (needs CUDA, torch and Triton): the JIT plugin's ``enqueue`` on real device buffers,
   and the AOT kernel from ``get_kernel`` launched through the CUDA driver with the evaluated grid,
   block, shared memory and extra arguments; both against :mod:`plugins.reference`.

Prints one JSON report on stdout; exits 1 with the failing check's message on stderr.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np

SIZES = {"batch": 3, "seq": 5}  # the run-time sizes every symbolic dimension is evaluated at
PROFILE = {"batch": (1, 2, 4), "seq": (1, 8, 16)}  # min, opt, max of the optimization profile
ONNX_INT, ONNX_FLOAT, ONNX_STRING, ONNX_INTS, ONNX_FLOATS = "INT", "FLOAT", "STRING", "INTS", "FLOATS"


class CheckFailed(Exception):
    pass


def check(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def load_fields(trt, attrs: dict, creator):
    """onnx-tensorrt ``loadFields``: the creator's declared fields, encoded by the ONNX attribute's type."""
    fields = []
    for declared in creator.field_names:
        if declared.name not in attrs:
            continue  # the parser warns and leaves it out
        kind, value = attrs[declared.name]
        if kind == ONNX_INT:
            fields.append(trt.PluginField(declared.name, np.array([value], np.int64).astype(np.int32),
                                          trt.PluginFieldType.INT32))
        elif kind == ONNX_FLOAT:
            fields.append(trt.PluginField(declared.name, np.array([value], np.float32), trt.PluginFieldType.FLOAT32))
        elif kind == ONNX_STRING:
            raw = np.frombuffer(value.encode() + b"\0", np.int8)
            fields.append(trt.PluginField(declared.name, raw, trt.PluginFieldType.CHAR))
        elif kind == ONNX_INTS:
            fields.append(trt.PluginField(declared.name, np.array(value, np.int32), trt.PluginFieldType.INT32))
        elif kind == ONNX_FLOATS:
            fields.append(trt.PluginField(declared.name, np.array(value, np.float32), trt.PluginFieldType.FLOAT32))
        else:
            raise CheckFailed(f"attribute {declared.name}: type {kind} is unsupported as a plugin field")
    return trt.PluginFieldCollection(fields)


def create_plugin(trt, node: dict, impl: str):
    attrs = {a["name"]: (a["type"], a["value"]) for a in node["attrs"]}
    name = node["op"]
    version = attrs.get("plugin_version", (ONNX_STRING, "1"))[1]
    namespace = attrs.get("plugin_namespace", (ONNX_STRING, ""))[1]
    registry = trt.get_plugin_registry()
    creator = registry.get_creator(name, version, namespace) or registry.get_creator(name, version, node["domain"])
    check(creator is not None, f"{name}: plugin not found as ({name!r}, {version!r}, {namespace!r}) or in "
                               f"namespace {node['domain']!r}")
    fields = load_fields(trt, attrs, creator)
    if not hasattr(trt, "QuickPluginCreationRequest"):
        return creator.create_plugin(name, namespace, fields, trt.TensorRTPhase.BUILD), fields, creator
    request = trt.QuickPluginCreationRequest
    if "aot" in attrs:
        req = request.STRICT_AOT if attrs["aot"][1] else request.STRICT_JIT
    else:
        req = request.PREFER_AOT if impl == "aot" else request.PREFER_JIT
    return creator.create_plugin(name, namespace, fields, trt.TensorRTPhase.BUILD, req), fields, creator


def _symbol(name: str, trt):
    return trt.IDimensionExpr(symbol=name)


def dims_exprs(trt, shape: list, builder):
    exprs = trt.DimsExprs(len(shape))
    for i, d in enumerate(shape):
        exprs[i] = builder.constant(d) if isinstance(d, int) else _symbol(d, trt)
    return exprs


def concrete(shape: list, sizes: dict) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else sizes[d] for d in shape)


def dynamic_desc(trt, tensor: dict, dtype=None):
    desc = trt.DynamicPluginTensorDesc()
    desc.desc.type = dtype if dtype is not None else getattr(trt.DataType, tensor["dtype"])
    desc.desc.format = trt.TensorFormat.LINEAR
    desc.desc.dims = trt.Dims([d if isinstance(d, int) else -1 for d in tensor["shape"]])
    desc.min, desc.opt, desc.max = (trt.Dims([d if isinstance(d, int) else PROFILE[d][i] for d in tensor["shape"]])
                                    for i in range(3))
    return desc


def plugin_desc(trt, tensor: dict, sizes: dict):
    desc = trt.PluginTensorDesc()
    desc.type, desc.format = getattr(trt.DataType, tensor["dtype"]), trt.TensorFormat.LINEAR
    desc.dims = trt.Dims(concrete(tensor["shape"], sizes))
    return desc


def ptx_entry(ptx: str, name: str) -> list[str]:
    """The entry's parameter types in order (``u64`` pointers, ``u32`` scalars)."""
    match = re.search(rf"\.entry\s+{re.escape(name)}\s*\(([^)]*)\)", ptx, re.S)
    check(match is not None, f"kernel entry {name!r} is not in the PTX TensorRT would load")
    return [p.split()[1].lstrip(".") for p in match.group(1).split(",") if p.strip()]


def build(trt, node: dict, impl: str) -> tuple[dict, object, dict]:
    """The report, the configured plugin, and per tactic the AOT kernel (name, PTX, launch values)."""
    plugin, fields, creator = create_plugin(trt, node, impl)
    op, ins, outs = node["op"], node["inputs"], node["outputs"]
    report = {"op": op, "fields": {f.name: [f.type.name, f.data.tolist()] for f in fields},
              "kind": type(plugin).__name__}
    check(plugin.get_num_outputs() == len(outs), f"{op}: {plugin.get_num_outputs()} outputs, the node has {len(outs)}")
    in_types = [getattr(trt.DataType, t["dtype"]) for t in ins]
    out_types = plugin.get_output_data_types(in_types, [len(t["shape"]) for t in ins])
    check([t.name for t in out_types] == [t["dtype"] for t in outs],
          f"{op}: output types {[t.name for t in out_types]}, the model says {[t['dtype'] for t in outs]}")
    builder = trt.IExprBuilder()
    shapes = plugin.get_output_shapes([dims_exprs(trt, t["shape"], builder) for t in ins], [], builder)
    got = [[e.evaluate(SIZES) for e in s] for s in shapes]
    check(got == [list(concrete(t["shape"], SIZES)) for t in outs],
          f"{op}: output shapes at {SIZES} are {got}, the model says {[t['shape'] for t in outs]}")
    in_out = [dynamic_desc(trt, t) for t in ins + outs]
    flat = plugin.get_supported_format_combinations(in_out, len(ins))
    n_io = len(ins) + len(outs)
    check(len(flat) > 0 and len(flat) % n_io == 0,
          f"{op}: get_supported_format_combinations returned {len(flat)} descriptors for {n_io} I/O: "
          f"TensorRT finds no format combination and the build fails")
    combos = [[(d.type.name, d.format.name) for d in flat[i:i + n_io]] for i in range(0, len(flat), n_io)]
    wanted = [(t["dtype"], "LINEAR") for t in ins + outs]
    check(wanted in combos, f"{op}: no supported combination matches the network's {wanted}: {combos}")
    report["combinations"] = len(combos)
    plugin.configure_plugin(in_out[:len(ins)], in_out[len(ins):])
    tactics = plugin.get_valid_tactics()
    check(all(isinstance(t, int) and t > 0 for t in tactics) and len(set(tactics)) == len(tactics),
          f"{op}: custom tactics must be unique positive integers, got {tactics}")
    report["tactics"] = sorted(tactics)
    report["kernels"], kernels = [], {}
    for tactic in tactics or [0]:
        plugin.set_tactic(tactic)
        if hasattr(plugin, "get_launch_params"):
            launch, ptx = aot_launch(trt, plugin, node, tactic, builder, in_out)
            report["kernels"].append(launch)
            kernels[tactic] = (launch, ptx)
    if not hasattr(plugin, "get_launch_params"):  # JIT: the engine stores these fields
        serialized = plugin.get_fields_to_serialize()
        again = creator.create_plugin(op, node_namespace(node), serialized, trt.TensorRTPhase.RUNTIME,
                                      *_jit_request(trt))
        check([t.name for t in again.get_output_data_types(in_types, [len(t["shape"]) for t in ins])]
              == [t["dtype"] for t in outs], f"{op}: the plugin re-created from its serialized fields differs")
        report["serialized"] = {f.name: f.data.tolist() for f in serialized}
    plugin.clone()
    return report, plugin, kernels


def node_namespace(node: dict) -> str:
    return next((a["value"] for a in node["attrs"] if a["name"] == "plugin_namespace"), "")


def _jit_request(trt) -> tuple:
    return (trt.QuickPluginCreationRequest.STRICT_JIT,) if hasattr(trt, "QuickPluginCreationRequest") else ()


def aot_launch(trt, plugin, node: dict, tactic: int, builder, in_out) -> dict:
    op, ins, outs = node["op"], node["inputs"], node["outputs"]
    launch, extra = trt.KernelLaunchParamsSetter(), trt.SymExprsSetter()
    plugin.get_launch_params([dims_exprs(trt, t["shape"], builder) for t in ins], in_out, len(ins), launch, extra,
                             builder)
    name, ptx = plugin.get_kernel([plugin_desc(trt, t, SIZES) for t in ins], [plugin_desc(trt, t, SIZES) for t in outs])
    check(isinstance(name, str) and isinstance(ptx, bytes), f"{op}: get_kernel must return (str, bytes)")
    params = ptx_entry(ptx.decode(), name)
    n_extra = extra.nbSymExprs
    check(len(params) == len(ins) + n_extra + len(outs),
          f"{op} tactic {tactic}: the PTX entry takes {len(params)} parameters, TensorRT passes "
          f"{len(ins)} inputs + {n_extra} scalars + {len(outs)} outputs")
    values = {}
    for key in ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem"):
        sym = getattr(launch, key)
        check(sym is not None and sym.type == trt.PluginArgType.INT, f"{op}: launch parameter {key} is not set")
        values[key] = sym.expr.evaluate(SIZES)
    scalars = []
    for i in range(n_extra):
        sym = extra[i]
        check(sym.dtype == trt.PluginArgDataType.INT32, f"{op}: extra argument {i} is {sym.dtype}, not INT32")
        scalars.append(sym.expr.evaluate(SIZES))
    target = re.search(r"\.target\s+(\S+)", ptx.decode())
    return {"tactic": tactic, "name": name, "params": params, "launch": values, "scalars": scalars,
            "target": target.group(1) if target else None}, ptx


def tensor_interface(trt, trtp) -> dict:
    """A ``tensorrt.plugin.Tensor`` made as ``enqueue`` makes one, per type the plugins see: its own
    ``__cuda_array_interface__`` and :func:`plugins.trt_jit.cuda_array_interface`."""
    from plugins.trt_jit import cuda_array_interface  # noqa: PLC0415

    out = {}
    for dtype in (trt.fp8, trt.bfloat16, trt.float16, trt.float32, trt.int8):
        desc = trt.PluginTensorDesc()
        desc.dims, desc.type, desc.format = trt.Dims((3, 5, 32)), dtype, trt.TensorFormat.LINEAR
        t = trtp.Tensor()
        t.dtype, t.shape, t.format, t.scale = desc.type, trtp.Shape(desc), desc.format, desc.scale
        t.data_ptr, t._stream, t._read_only, t.strides = 1 << 20, 7, True, trt.Dims((160, 32, 1))
        t._immutable = True
        try:
            theirs = t.__cuda_array_interface__
        except ValueError as e:
            theirs = f"ValueError: {e}"
        out[dtype.name] = {"tensorrt": theirs, "ours": cuda_array_interface(t)}
    return out


def main(argv: list[str]) -> int:
    spec_path, impl = argv[0], argv[1]
    import tensorrt as trt  # noqa: PLC0415 - the stand-in core under NVIDIA's package
    import tensorrt.plugin as trtp  # noqa: PLC0415

    import plugins.trt_plugins as ours  # noqa: PLC0415 - registers through trtp's decorators

    spec = json.loads(open(spec_path).read())
    report = {"tensorrt": trt.__version__, "numpy": np.__version__, "aot_available": ours.AOT,
              "registered": sorted(f"{c.plugin_namespace}::{c.name}" for c in trt.get_plugin_registry().all_creators),
              "field_names": {c.name: [(f.name, f.type.name) for f in c.field_names]
                              for c in trt.get_plugin_registry().all_creators},
              "nodes": []}
    try:
        built = [build(trt, node, impl) for node in spec["nodes"]]
        report["nodes"] = [b[0] for b in built]
        if "--interface" in argv:
            report["interface"] = tensor_interface(trt, trtp)
        if "--run" in argv:
            from trt_run import run_on_gpu  # noqa: PLC0415 - torch with CUDA, Triton, CuPy

            report["run"] = run_on_gpu(trt, spec, impl, [(node, b[1], b[2]) for node, b in zip(spec["nodes"], built)])
    except CheckFailed as e:
        print(json.dumps(report, default=str))
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

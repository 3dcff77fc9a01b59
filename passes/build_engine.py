"""``python -m passes.build_engine MODEL.onnx -o MODEL.plan``: a TensorRT engine from a Q/DQ model.

The network is strongly typed (precisions come from the Q/DQ nodes and the model's own
types, not from builder flags) and is read by TensorRT's ONNX parser from the file, so
external data is resolved beside the model. Dynamic inputs need an optimization profile,
``--profile NAME:MIN,OPT,MAX`` with shapes written ``1x128``. A timing cache file is read
if present and written back after the build. ``--plugins LIB.so`` loads plugin libraries
(repeatable); ``--python-plugins MODULE`` imports a module that registers ``tensorrt.plugin``
ops. The equivalent ``trtexec`` command is printed before the build.

Everything before the build (the TensorRT rule check, profile validation against the
model's inputs, the trtexec command) runs without TensorRT; the build itself needs the
``tensorrt`` package and an NVIDIA GPU. Exit codes: 0 built, 1 failure, 2 usage.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from passes.check_trt import check_model
from passes.ir.atomic import atomic_write
from passes.ir.errors import SmoothQuantError
from passes.ir.onnx_io import LoadedModel, load_model
from passes.ir.paths import check_outputs, model_files
from plugins import schema

PLUGINS_MODULE = "plugins.trt_plugins"

INSTALL_HINT = ("TensorRT's Python package is not installed: pip install 'smoothquant-onnx[tensorrt]' "
                "(or pip install tensorrt --extra-index-url https://pypi.nvidia.com) on a machine with an NVIDIA GPU")


@dataclass(frozen=True)
class Profile:
    """Shapes of one dynamic input for an optimization profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> Profile:
        """``NAME:MIN,OPT,MAX`` with each shape like ``1x128`` (input names may contain ':')."""
        name, sep, shapes = text.rpartition(":")
        parts = shapes.split(",")
        if not sep or not name or len(parts) != 3:
            raise SmoothQuantError(f"--profile {text!r}: expected NAME:MIN,OPT,MAX, e.g. input_ids:1x1,8x128,32x512")
        try:
            dims = [tuple(int(d) for d in p.lower().split("x")) for p in parts]
        except ValueError:
            raise SmoothQuantError(f"--profile {text!r}: shapes are integers joined by 'x', e.g. 8x128") from None
        return cls(name, *dims)

    def trtexec(self) -> tuple[str, str, str]:
        return tuple(f"{self.name}:{'x'.join(map(str, s))}" for s in (self.min, self.opt, self.max))


class PluginImpl(enum.Enum):
    """Which implementation of a Python plugin that has both TensorRT builds into the engine."""

    AOT = "aot"  # compiled kernels embedded in the engine: it runs without Python (TensorRT >= 10.9)
    JIT = "jit"  # the Python impl functions, called at run time (TensorRT >= 10.6)


@dataclass(frozen=True)
class EngineConfig:
    profiles: tuple[Profile, ...] = ()
    timing_cache: Path | None = None
    plugins: tuple[Path, ...] = ()  # shared libraries with IPluginV2/V3 creators
    python_plugins: tuple[str, ...] = ()  # modules registering tensorrt.plugin ops
    workspace_mib: int | None = None
    check: bool = True  # run the TensorRT rule checker first
    plugin_impl: PluginImpl = PluginImpl.AOT


@dataclass
class EngineResult:
    engine: Path
    trtexec: str
    timing_cache: Path | None = None
    messages: list[str] = field(default_factory=list)


def model_input_shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Graph inputs (initializers excluded) -> dims, symbolic dims as their names (or '?')."""
    inits = {t.name for t in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return shapes


def validate_profiles(model: onnx.ModelProto, profiles: Sequence[Profile], where: str) -> None:
    """Every dynamic input has a profile; every profile names an input, has its rank, keeps its fixed
    dims and satisfies ``1 <= min <= opt <= max``."""
    shapes = model_input_shapes(model)
    given = {p.name: p for p in profiles}
    for p in profiles:
        if p.name not in shapes:
            raise SmoothQuantError(f"{where}: --profile names {p.name!r}, but the inputs are {sorted(shapes)}")
        dims = shapes[p.name]
        for label, shape in (("min", p.min), ("opt", p.opt), ("max", p.max)):
            if len(shape) != len(dims):
                raise SmoothQuantError(f"{where}: input {p.name!r} has rank {len(dims)} ({dims}), the {label} "
                                       f"shape {shape} has rank {len(shape)}")
            for axis, (d, s) in enumerate(zip(dims, shape)):
                if isinstance(d, int) and d > 0 and s != d:
                    raise SmoothQuantError(f"{where}: input {p.name!r} axis {axis} is fixed at {d}, the {label} "
                                           f"shape says {s}")
        if not all(1 <= a <= b <= c for a, b, c in zip(p.min, p.opt, p.max)):
            raise SmoothQuantError(f"{where}: --profile {p.name!r} needs 1 <= min <= opt <= max on every axis")
    dynamic = [n for n, dims in shapes.items() if any(not isinstance(d, int) or d <= 0 for d in dims)]
    missing = [n for n in dynamic if n not in given]
    if missing:
        described = ", ".join(f"{n} {shapes[n]}" for n in missing)
        example = ",".join("x".join(str(d) if isinstance(d, int) and d > 0 else str(v) for d in shapes[missing[0]])
                           for v in (1, 8, 64))
        raise SmoothQuantError(f"{where}: inputs with dynamic dims need an optimization profile ({described}): "
                               f"pass --profile NAME:MIN,OPT,MAX for each, e.g. --profile {missing[0]}:{example}")


def trtexec_command(model: Path, engine: Path, config: EngineConfig) -> str:
    args = ["trtexec", f"--onnx={model}", f"--saveEngine={engine}", "--stronglyTyped"]
    if config.profiles:
        for flag, i in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{flag}=" + ",".join(p.trtexec()[i] for p in config.profiles))
    if config.timing_cache is not None:
        args.append(f"--timingCacheFile={config.timing_cache}")
    if config.workspace_mib is not None:
        args.append(f"--memPoolSize=workspace:{config.workspace_mib}M")
    args += [f"--staticPlugins={lib}" for lib in config.plugins]
    command = " ".join(shlex.quote(a) for a in args)
    if config.python_plugins:
        command += "  # Python plugins (" + ", ".join(config.python_plugins) + ") load only through the Python API"
    return command


def import_tensorrt():
    """The ``tensorrt`` module, or a SmoothQuantError with the install hint."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        raise SmoothQuantError(INSTALL_HINT) from None


def import_plugin_modules(modules: Sequence[str]) -> None:
    """Import each module (its ``tensorrt.plugin`` decorators register its ops); a failure is one line."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any import-time failure of a plugin module
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise SmoothQuantError(f"--python-plugins {module}: importing it failed ({type(e).__name__}: {detail})"
                                   ) from None


def network_flags(trt, impl: PluginImpl, python_plugins: bool) -> int:
    """``Builder.create_network`` flags. Strongly typed on TensorRT 10 (11 always is: the flag is
    deprecated and ignored there, so it is not set); with Python plugins, the AOT or JIT preference
    TensorRT needs for a plugin that has both (``PREFER_*_PYTHON_PLUGINS``, TensorRT >= 10.9).
    Enum values differ between 10.x and 11.x (NvInfer.h), so they are read from ``trt``."""
    flag = trt.NetworkDefinitionCreationFlag
    flags = 0
    if int(trt.__version__.split(".")[0]) < 11:
        flags |= 1 << flag.STRONGLY_TYPED.value
    if python_plugins:
        prefer = "PREFER_AOT_PYTHON_PLUGINS" if impl is PluginImpl.AOT else "PREFER_JIT_PYTHON_PLUGINS"
        if hasattr(flag, prefer):
            flags |= 1 << getattr(flag, prefer).value
        elif impl is PluginImpl.AOT:
            raise SmoothQuantError(f"TensorRT {trt.__version__} has no AOT Python plugins (10.9 or newer does): "
                                   f"use --plugin-impl jit")
    return flags


def prepare(model: str | os.PathLike | LoadedModel, engine: str | os.PathLike,
            config: EngineConfig = EngineConfig()) -> tuple[LoadedModel, str]:
    """Everything up to the build, without TensorRT: load, rule check, profiles, trtexec command."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    check_outputs({"engine file": Path(engine), "timing cache": config.timing_cache},
                  model_files(loaded.proto, loaded.path) + list(config.plugins))
    if config.check:
        report = check_model(loaded)
        if not report.ok:
            raise SmoothQuantError(f"{loaded.path}: TensorRT would not build this model as quantized:\n"
                                   + "\n".join(f"  {v}" for v in report.violations))
    validate_profiles(loaded.proto, config.profiles, str(loaded.path))
    for lib in config.plugins:
        if not Path(lib).is_file():
            raise SmoothQuantError(f"{lib}: plugin library not found")
    return loaded, trtexec_command(loaded.path, Path(engine), config)


def build_engine(model: str | os.PathLike, engine: str | os.PathLike,
                 config: EngineConfig = EngineConfig()) -> EngineResult:
    """Parse ``model`` with TensorRT's ONNX parser and write a serialized engine to ``engine``."""
    loaded, command = prepare(model, engine, config)
    return build_prepared(loaded, engine, config, command)


def build_prepared(loaded: LoadedModel, engine: str | os.PathLike, config: EngineConfig,
                   command: str) -> EngineResult:
    """The TensorRT part of :func:`build_engine`, for a model :func:`prepare` accepted."""
    trt = import_tensorrt()
    engine = Path(engine)
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    registry = trt.get_plugin_registry()
    for lib in config.plugins:
        registry.load_library(str(lib))
    modules = list(config.python_plugins)
    if any(n.domain == schema.DOMAIN for n in loaded.proto.graph.node) and PLUGINS_MODULE not in modules:
        modules.append(PLUGINS_MODULE)  # per-token models need our plugins
    import_plugin_modules(modules)
    builder = trt.Builder(logger)
    flags = network_flags(trt, config.plugin_impl, bool(modules))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(loaded.path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = err.node_name() if hasattr(err, "node_name") else err.node()
            errors.append(f"  node {node}: {err.desc()}")
        raise SmoothQuantError(f"{loaded.path}: TensorRT's ONNX parser failed:\n" + "\n".join(errors))
    build = builder.create_builder_config()
    if config.workspace_mib is not None:
        build.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    if config.profiles:
        profile = builder.create_optimization_profile()
        for p in config.profiles:
            profile.set_shape(p.name, p.min, p.opt, p.max)
        build.add_optimization_profile(profile)
    if config.timing_cache is not None:
        cached = config.timing_cache.read_bytes() if config.timing_cache.is_file() else b""
        build.set_timing_cache(build.create_timing_cache(cached), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, build)
    if serialized is None:
        raise SmoothQuantError(f"{loaded.path}: TensorRT could not build an engine (see its log above)")
    _write_atomic(engine, memoryview(serialized))
    if config.timing_cache is not None:
        _write_atomic(config.timing_cache, memoryview(build.get_timing_cache().serialize()))
    return EngineResult(engine, command, config.timing_cache)


def _write_atomic(path: Path, data) -> None:
    with atomic_write(path) as (tmp,):
        tmp.write_bytes(data)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by this command and ``python -m passes.smoothquant --engine``."""
    p.add_argument("--profile", action="append", default=[], metavar="NAME:MIN,OPT,MAX",
                   help="optimization profile for a dynamic input, shapes like 1x128 (repeatable)")
    p.add_argument("--timing-cache", help="timing cache file: read if present, written after the build")
    p.add_argument("--plugins", action="append", default=[], metavar="LIB.so", help="plugin library to load")
    p.add_argument("--python-plugins", action="append", default=[], metavar="MODULE",
                   help="module that registers tensorrt.plugin ops (e.g. plugins.trt_plugins)")
    p.add_argument("--workspace-mib", type=int, help="builder workspace limit in MiB")
    p.add_argument("--plugin-impl", choices=[i.value for i in PluginImpl], default=PluginImpl.AOT.value,
                   help="Python plugins: embed compiled kernels in the engine (aot, default; runs without Python) "
                        "or call the Python implementation at run time (jit)")


def engine_config_from_args(args: argparse.Namespace, check: bool = True) -> EngineConfig:
    return EngineConfig(profiles=tuple(Profile.parse(p) for p in args.profile),
                        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                        plugins=tuple(Path(p) for p in args.plugins), python_plugins=tuple(args.python_plugins),
                        workspace_mib=args.workspace_mib, check=check, plugin_impl=PluginImpl(args.plugin_impl))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m passes.build_engine", description=__doc__.splitlines()[0])
    p.add_argument("model", help="ONNX model with Q/DQ nodes (e.g. the output of python -m passes.smoothquant)")
    p.add_argument("-o", "--output", help="engine file (default: MODEL.plan)")
    add_engine_arguments(p)
    p.add_argument("--no-check", action="store_true", help="skip the TensorRT rule checker")
    p.add_argument("--print-only", action="store_true", help="check and print the trtexec command; build nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    output = Path(args.output) if args.output else Path(args.model).with_suffix(".plan")
    try:
        config = engine_config_from_args(args, check=not args.no_check)
        loaded, command = prepare(args.model, output, config)
        print(f"trtexec equivalent: {command}", flush=True)
        if args.print_only:
            return 0
        result = build_prepared(loaded, output, config, command)
    except SmoothQuantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {result.engine}" + (f" and timing cache {result.timing_cache}" if result.timing_cache else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

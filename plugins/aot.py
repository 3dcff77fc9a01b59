"""Ahead-of-time kernels for the TensorRT plugins: PTX compiled from the Triton kernels.

TensorRT >= 10.9 can embed a Python plugin's compiled kernel in the engine and launch it
itself, so the engine runs without Python (``tensorrt.plugin.aot_impl``). It launches the
kernel by name with a grid, a block and dynamic shared memory given as symbolic expressions,
and with its arguments in one fixed order::

    input pointers (in op order), extra scalar arguments (int32), output pointers

The kernels here have exactly that ABI and reuse the bodies of :mod:`plugins.triton_kernels`:

``QuantizePerToken``  ``(x, q, scale)``; K, the precision and the tile are compile-time
                      constants; one program per row (``grid_x = numel(x) / K``).
``W8A8Linear``        ``(q, x_scale, w, w_scale, bias, M, y)``; N, K, precision and tile are
                      compile-time constants (the weight is constant), M is the one extra
                      scalar; ``grid_x = cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)``.

This module does not import TensorRT: :func:`quantize_kernel` and :func:`linear_kernel` return
an :class:`AotKernel` (name, PTX, threads per block, shared memory) and the grid as a function
of the sizes, which :mod:`plugins.trt_plugins` turns into ``trtp.KernelLaunchParams`` and
``trtp.SymIntExprs``, and which the GPU tests launch through the CUDA driver (CuPy) with the
same arguments in the same order, as TensorRT would.

Tiles and tactics: :mod:`plugins.tiles` (no Triton needed there). The kernels are compiled for the
current GPU, or for ``sm_$SMOOTHQUANT_AOT_ARCH`` when set: Triton needs no GPU for that, which is how
the plugin tests check the PTX on a CPU machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import triton
import triton.language as tl

from plugins.ptx import strip_unused_trailing_params
from plugins.tiles import DEFAULT_SHARED_LIMIT, LARGE_TILES, LINEAR_TACTICS, SMALL_TILES, Tile, tactic_tile
from plugins.triton_kernels import _gemm_tile, _quantize_rows, row_tile

ARCH_ENV = "SMOOTHQUANT_AOT_ARCH"  # e.g. 90: compile for sm_90 instead of the current device

__all__ = ["ARCH_ENV", "AotKernel", "DEFAULT_SHARED_LIMIT", "LARGE_TILES", "LINEAR_TACTICS", "SMALL_TILES", "Tile",
           "driver_launch", "linear_kernel", "quantize_kernel", "tactic_tile"]


@dataclass(frozen=True)
class AotKernel:
    name: str
    ptx: str
    threads: int  # per block (block_x)
    shared: int  # dynamic shared memory, bytes


@triton.jit
def _quantize_rows_aot(x_ptr, q_ptr, scale_ptr, K: tl.constexpr, IS_FP8: tl.constexpr, BLOCK: tl.constexpr):
    _quantize_rows(x_ptr, x_ptr, q_ptr, scale_ptr, K, K, False, IS_FP8, BLOCK)


@triton.jit
def _w8a8_linear_aot(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, M, c_ptr,
                     N: tl.constexpr, K: tl.constexpr, IS_FP8: tl.constexpr, PRECISE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    _gemm_tile(tl.program_id(0), a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, K, K, N,
               True, IS_FP8, PRECISE, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def quantize_kernel(x_type: str, k: int, fp8: bool, arch: int | None = None) -> tuple[AotKernel, Callable[[int], int]]:
    """``x_type``: ``fp16``, ``bf16`` or ``fp32``. Returns the kernel and ``grid(rows)``."""
    block, warps = row_tile(k)
    kernel = _compile(_quantize_rows_aot, {"x_ptr": f"*{x_type}", "q_ptr": "*fp8e4nv" if fp8 else "*i8",
                                           "scale_ptr": "*fp32"},
                      {"K": k, "IS_FP8": fp8, "BLOCK": block}, warps, 1, arch)
    return kernel, lambda rows: rows


def linear_kernel(n: int, k: int, fp8: bool, out_type: str, tile: Tile = LINEAR_TACTICS[0], *, precise: bool = False,
                  arch: int | None = None) -> tuple[AotKernel, Callable[[int], int]]:
    """``out_type``: ``fp16``, ``bf16`` or ``fp32``. Returns the kernel and ``grid(M)`` (M an int,
    or the symbolic size TensorRT's ``aot_impl`` sees)."""
    operand = "*fp8e4nv" if fp8 else "*i8"
    kernel = _compile(_w8a8_linear_aot,
                      {"a_ptr": operand, "a_scale_ptr": "*fp32", "b_ptr": operand, "b_scale_ptr": "*fp32",
                       "bias_ptr": "*fp32", "M": "i32", "c_ptr": f"*{out_type}"},
                      {"N": n, "K": k, "IS_FP8": fp8, "PRECISE": precise, "BLOCK_M": tile.block_m,
                       "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k, "GROUP_M": 8},
                      tile.warps, tile.stages, arch)
    # + // * only: the same expression serves an int M and TensorRT's symbolic one
    return kernel, lambda m: (m + tile.block_m - 1) // tile.block_m * triton.cdiv(n, tile.block_n)


def _compile(fn, signature: dict[str, str], constexprs: dict, warps: int, stages: int, arch: int | None) -> AotKernel:
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415

    names = list(fn.arg_names)
    full = {name: signature.get(name, "constexpr") for name in names}
    pointers = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t.startswith("*")}
    source = triton.compiler.ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=pointers)
    arch = arch if arch is not None else int(os.environ.get(ARCH_ENV) or 0) or None
    target = GPUTarget("cuda", arch, 32) if arch is not None else None  # None: the current device's
    compiled = triton.compile(source, target=target, options={"num_warps": warps, "num_stages": stages})
    meta = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, scratch, 0):
            raise ValueError(f"{fn.__name__} needs {scratch}={getattr(meta, scratch)}: TensorRT cannot provide it")
    ptx = strip_unused_trailing_params(compiled.asm["ptx"], meta.name, len(signature))
    return AotKernel(meta.name, ptx, meta.num_warps * 32, meta.shared)


def driver_launch(kernel: AotKernel, grid: int, args, stream: int = 0) -> None:
    """Launch ``kernel`` through the CUDA driver (CuPy) as TensorRT's AOT launcher does: PTX loaded
    with ``cuModuleLoadData``, ``args`` (torch tensors as pointers, ints as int32) in ABI order, a
    1-D grid, ``threads`` per block, ``shared`` bytes of dynamic shared memory (opted in above
    48 KiB). For tests and benchmarks on a GPU without TensorRT."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    function = _loaded(kernel)
    values = tuple(np.uint64(a.data_ptr()) if hasattr(a, "data_ptr") else np.int32(a) for a in args)
    function((grid,), (kernel.threads,), values, shared_mem=kernel.shared,
             stream=cupy.cuda.ExternalStream(stream) if stream else None)


_MODULES: dict[tuple[str, str], object] = {}


def _loaded(kernel: AotKernel):
    import cupy  # noqa: PLC0415

    key = (kernel.name, kernel.ptx)
    if key not in _MODULES:
        module = cupy.cuda.function.Module()
        module.load(kernel.ptx.encode())
        function = module.get_function(kernel.name)
        if kernel.shared > DEFAULT_SHARED_LIMIT:
            driver = cupy.cuda.driver
            driver.funcSetAttribute(function.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, kernel.shared)
        _MODULES[key] = (module, function)
    return _MODULES[key][1]

